"""The `cpu` backend (neuslice._C) against `reference`: odd shapes, both layouts, per-token labels,
dtypes, non-contiguous inputs, thread counts, and bit-identical frozen entries; every test once per
instruction-set build of the kernels this CPU runs (base, avx2, avx512: csrc/cpu/isa.h)."""
from __future__ import annotations

import pytest
import torch

from neuslice import NonFiniteError, ops
from neuslice.ops import _dispatch, reference
from op_cases import (EXTRAS, K, acc_cases, acc_id, extra_args, kept_stats, make_labels, make_ref, make_valid,
                      make_x, new_stats, poison_padding)
from tolerances import ACCUMULATE, MASKED_UPDATE, assert_close

pytestmark = pytest.mark.skipif(_dispatch.import_error("cpu") is not None,
                                reason=f"cpu backend unavailable: {_dispatch.import_error('cpu')}")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _isas():
    try:
        from neuslice import _C
    except ImportError:
        return ["none"]
    return list(_C.cpu_isas())


@pytest.fixture(autouse=True, params=_isas(), ids=lambda isa: f"isa={isa}")
def cpu_isa(request):
    """Each test runs the kernels of one instruction-set build; the default choice is restored after."""
    if request.param == "none":
        yield None
        return
    from neuslice import _C
    before = _C.cpu_isa()
    assert _C.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _C.set_cpu_isa(before)


def _run_both(force_backend, x, g, r, labels, cl, acc, valid=None, extra=""):
    n = x.shape[-1] if (cl and x.dim() == 3) else x.shape[1]
    got, want = kept_stats(new_stats(n, acc), extra), kept_stats(new_stats(n, acc), extra)
    force_backend("cpu")
    ops.accumulate_(x, g, r, labels, cl, *got, valid, -100)
    reference.accumulate_(x, g, r, labels, cl, *want, valid, -100)
    return [t for t in got if t is not None], [t for t in want if t is not None]


@pytest.mark.parametrize("case", list(acc_cases()), ids=acc_id)
def test_accumulate_matches_reference(force_backend, case):
    shape, cl, pt, with_g, ref, extra = case
    x = make_x(shape, cl, torch.float32)
    g = make_x(shape, cl, torch.float32, seed=7) if with_g else None
    r = make_ref(ref, shape, cl, torch.float32)
    labels, valid = extra_args(x, g, make_labels(shape[0], shape[2], pt), cl, extra, r=r)
    got, want = _run_both(force_backend, x, g, r, labels, cl, torch.float32, valid, extra)
    for a, b in zip(got, want):
        assert_close(a, b, ACCUMULATE, torch.float32, case[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
def test_accumulate_dtypes(force_backend, dtype, cl):
    shape = (9, 123, 7)
    x, g = make_x(shape, cl, dtype), make_x(shape, cl, dtype, seed=5)
    r = torch.randn(123, dtype=dtype)  # a [N] reference, broadcast over positions
    acc = reference.acc_dtype(dtype)
    got, want = _run_both(force_backend, x, g, r, make_labels(9, 7, False), cl, acc)
    for a, b in zip(got, want):
        assert_close(a, b, ACCUMULATE, dtype)


@pytest.mark.parametrize("n", [37, 2100], ids=["short rows", "rows over 8 KiB"])
@pytest.mark.parametrize("ref_layout", ["[N, S]", "[S, N].t()"])
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
def test_accumulate_contiguous_x_with_a_shared_ref_of_either_layout(force_backend, cl, ref_layout, n):
    """Contiguous x and g with a shared ref in either layout: unit stride along the axis the kernel walks (n
    channels-last, s channels-first) takes the contiguous-load path, the other layout the strided one (the
    engine passes channels-last refs as [S, N].t()); channels-last rows over 8 KiB take the 4-row schedule."""
    shape = (6, n, 5)
    x, g = make_x(shape, cl, torch.float32), make_x(shape, cl, torch.float32, seed=4)
    r = torch.randn(n, 5) if ref_layout == "[N, S]" else torch.randn(5, n).t()
    got, want = _run_both(force_backend, x, g, r, make_labels(6, 5, False), cl, torch.float32)
    for a, b in zip(got, want):
        assert_close(a, b, ACCUMULATE, torch.float32)


@pytest.mark.parametrize("ref", ["shared", "sample"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("cl,pt", [(False, False), (True, False), (True, True)], ids=["cf", "cl", "cl-tok"])
def test_accumulate_non_contiguous(force_backend, cl, pt, masked, ref):
    shape = (6, 37, 5)
    x = make_x(shape, cl, torch.float32, contiguous=False)
    g = make_x(shape, cl, torch.float32, contiguous=False, seed=4)
    # [N, S] as a transposed view, or per sample as a view with a non-unit inner stride
    r = torch.randn(5, 37).t() if ref == "shared" else make_ref("sample", shape, cl, torch.float32, contiguous=False)
    labels = make_labels(6, 5, pt, contiguous=False)
    valid = None
    if masked:  # a strided valid view, padding poisoned, some labels ignored (in place: still strided)
        valid = make_valid(6, 5, pt, contiguous=False)
        assert not valid.is_contiguous()
        for t in (x, g, r if ref == "sample" else None):
            poison_padding(t, valid, cl)
        labels[::3] = -100
    assert not x.is_contiguous() and not labels.is_contiguous() and not r.is_contiguous()
    got, want = _run_both(force_backend, x, g, r, labels, cl, torch.float32, valid)
    for a, b in zip(got, want):
        assert_close(a, b, ACCUMULATE, torch.float32)


def test_accumulate_transposed_layout_view(force_backend):
    # Channels-first data stored channels-last in memory (a permuted view): strides, no copy.
    x = torch.randn(8, 11, 64).transpose(1, 2)   # logical [B, N=64, S=11]
    g = torch.randn(8, 11, 64).transpose(1, 2)
    got, want = _run_both(force_backend, x, g, None, torch.arange(8) % K, False, torch.float32)
    for a, b in zip(got, want):
        assert_close(a, b, ACCUMULATE, torch.float32)


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape,cl,pt", [((64, 300, 1), False, False), ((40, 70, 9), True, False),
                                         ((30, 50, 6), False, False), ((4, 90, 16), True, True)])
def test_accumulate_thread_counts_agree(force_backend, threads, shape, cl, pt, extra):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, g = make_x(shape, cl, torch.float32), make_x(shape, cl, torch.float32, seed=9)
        if shape[2] == 1:
            x, g = x.squeeze(-1), g.squeeze(-1)
        labels, valid = extra_args(x, g, make_labels(shape[0], shape[2], pt), cl, extra)
        got, want = _run_both(force_backend, x, g, None, labels, cl, torch.float32, valid, extra)
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(got, want):
        assert_close(a, b, ACCUMULATE, torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_g,with_r", [(False, None), (True, None), (True, "shared"), (True, "sample")])
@pytest.mark.parametrize("shape,cl,pt", [((256, 33, 1), False, False), ((128, 20, 5), False, False),
                                         ((128, 20, 5), True, False), ((32, 33, 8), True, True),
                                         ((64, 4100, 1), False, False)])  # > one 4096-column block
def test_accumulate_per_thread_scratch_with_classes_one_thread_never_sees(
        force_backend, threads, with_g, with_r, shape, cl, pt):
    # Batches large against few classes take the per-thread private scratch schedule. That scratch
    # is not zeroed up front: each class's first rows are written, not added, and a class absent
    # from a thread's half of the batch must still contribute zeros. Labels here put classes 0 and
    # 1 only in the first half of the batch and class 3 only in the second; 2 and 4 never occur,
    # and the statistics start non-zero so an overwrite instead of an add would show.
    b = shape[0]
    half = torch.tensor([0, 1]).repeat(b // 4)
    second = torch.full((b // 2,), 3)
    labels = torch.cat([half, second])
    n, s = shape[1], shape[2]
    if pt:
        labels = labels[:, None].expand(b, s).contiguous()
    x = make_x(shape, cl, torch.float32)
    g = make_x(shape, cl, torch.float32, seed=7) if with_g else None
    r = make_ref(with_r, shape, cl, torch.float32)
    got = [t + 0.5 for t in new_stats(n)]
    want = [t.clone() for t in got]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        force_backend("cpu")
        ops.accumulate_(x, g, r, labels, cl, *got)
    finally:
        torch.set_num_threads(prev)
    reference.accumulate_(x, g, r, labels, cl, *want)
    for a, w in zip(got, want):
        assert_close(a, w, ACCUMULATE, torch.float32)
    assert torch.equal(got[0][[2, 4]], torch.full((2,), 0.5))  # classes never seen: untouched


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("where", ["x", "grad", "ref", "ref per sample", "x overflow"])
@pytest.mark.parametrize("row", [0, 97, 255])
@pytest.mark.parametrize("pt", [False, True])
def test_accumulate_per_thread_scratch_rejects_non_finite(force_backend, threads, where, row, pt):
    # On one thread the rows schedule decides finiteness from the values it stores (no scan of the
    # scratch); on two, a scan after the reduction does. Either way: the error, and nothing changed.
    b, n, s = (64, 40, 4) if pt else (256, 40, 1)
    x = torch.randn(b, s, n) if pt else torch.randn(b, n)
    g, r = torch.randn_like(x), torch.randn(n, s) if pt else torch.randn(n)
    if where == "ref per sample":
        r = torch.randn_like(x)
    labels = torch.randint(0, 3, (b, s) if pt else (b,), generator=torch.Generator().manual_seed(3))
    target = {"x": x, "grad": g, "ref": r, "ref per sample": r, "x overflow": x}[where]
    value = 3e38 if where == "x overflow" else float("nan")   # (3e38)^2 overflows act_sq
    target.view(-1)[(row * target.numel()) // 256] = value   # row 0, 97 or 255 of 256
    stats = [t.uniform_() for t in new_stats(n)]
    before = [t.clone() for t in stats]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        force_backend("cpu")
        with pytest.raises(NonFiniteError, match="non-finite value in " + ("x" if where.startswith("x") else "grad")):
            ops.accumulate_(x, g, r, labels, pt, *stats)
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(a, w) for a, w in zip(stats, before))


def test_accumulate_many_classes_uses_neuron_tiles(force_backend):
    # Per-token labels over many classes make private per-thread scratch too large: the kernel
    # switches to neuron tiles of one shared scratch. Same results either way.
    x, g = torch.randn(2, 300, 40), torch.randn(2, 300, 40)
    labels = torch.randint(0, 500, (2, 300))
    n = 40
    got = [torch.zeros(500)] + [torch.zeros(500, n) for _ in range(4)]
    want = [t.clone() for t in got]
    force_backend("cpu")
    ops.accumulate_(x, g, None, labels, True, *got)
    reference.accumulate_(x, g, None, labels, True, *want)
    for a, b in zip(got, want):
        assert_close(a, b, ACCUMULATE, torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,cl,pt", [((9, 33, 7), False, False), ((9, 33, 7), True, False),
                                         ((6, 20, 5), True, True), ((40, 17, 1), False, False)])
def test_accumulate_expanded_per_sample_ref_is_the_shared_ref(force_backend, threads, shape, cl, pt):
    # A per-sample ref expand()ed from a shared one (batch stride 0) is read in place through the
    # shared path: bit-identical statistics, no copy.
    b, n, s = shape
    x, g = make_x(shape, cl, torch.float32), make_x(shape, cl, torch.float32, seed=7)
    shared = torch.randn(n, s)
    per_sample = (shared.t() if cl else shared).expand(x.shape) if s > 1 else shared.t().expand(b, n)
    if s == 1:
        x, g = x.reshape(b, n), g.reshape(b, n)
    assert per_sample.shape == x.shape and per_sample.stride(0) == 0
    labels = make_labels(b, s, pt)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        force_backend("cpu")
        a, e = new_stats(n), new_stats(n)
        ops.accumulate_(x, g, shared, labels, cl, *a)
        ops.accumulate_(x, g, per_sample, labels, cl, *e)
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(u, v) for u, v in zip(a, e))


def test_accumulate_per_sample_ref_is_each_samples_own(force_backend):
    # Two samples of one class, identical x and g, references that differ: the deeplift terms are
    # each sample's own |sum_s (x - r_b) * g|, which no shared reference gives.
    x = torch.tensor([[[1.0, 2.0]], [[1.0, 2.0]]])               # [B=2, N=1, S=2]
    g = torch.tensor([[[1.0, 1.0]], [[1.0, 1.0]]])
    r = torch.tensor([[[0.0, 0.0]], [[3.0, 3.0]]])
    force_backend("cpu")
    st = new_stats(1, k=1)
    ops.accumulate_(x, g, r, torch.tensor([0, 0]), False, *st)
    assert st[4].item() == pytest.approx(abs(1 + 2) + abs(-2 - 1))
    assert st[3].item() == pytest.approx(3 + 3)


def test_accumulate_adds_onto_existing_statistics(force_backend):
    x, g = torch.randn(10, 6, 3), torch.randn(10, 6, 3)
    labels = torch.arange(10) % K
    st = new_stats(6)
    force_backend("cpu")
    ops.accumulate_(x[:5], g[:5], None, labels[:5], False, *st)
    ops.accumulate_(x[5:], g[5:], None, labels[5:], False, *st)
    want = new_stats(6)
    reference.accumulate_(x, g, None, labels, False, *want)
    for a, b in zip(st, want):
        assert_close(a, b, ACCUMULATE, torch.float32)


# ------------------------------------------------------------------ select


def _scores(r, n, seed=0, dtype=torch.float32, ties=False):
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(r, n, generator=gen) ** 3
    if ties:
        s = torch.randint(0, 4, (r, n), generator=gen).float()
    s[0, : n // 3] = 0  # a row with zeros
    if r > 1:
        s[1] = 0        # an all-zero row
    return s.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r,n", [(1, 1), (3, 7), (5, 97), (4, 123), (2, 5000)])
@pytest.mark.parametrize("theta", [0.01, 0.5, 0.9, 0.99, 1.0])
def test_select_matches_reference(force_backend, dtype, r, n, theta):
    s = _scores(r, n, dtype=dtype)
    force_backend("cpu")
    assert torch.equal(ops.select(s, theta), reference.select(s, theta))


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_select_topk_matches_reference(force_backend, ratio, ties):
    s = _scores(6, 333, ties=ties)
    force_backend("cpu")
    got = ops.select_topk(s, ratio)
    assert torch.equal(got, reference.select_topk(s, ratio))
    assert (got.sum(1) == reference.topk_count(ratio, 333)).all()


@pytest.mark.parametrize("theta", [0.3, 0.9, 1.0])
def test_select_ties_take_lower_index_first(force_backend, theta):
    s = _scores(8, 200, ties=True)
    force_backend("cpu")
    assert torch.equal(ops.select(s, theta), reference.select(s, theta))


def test_select_non_contiguous_and_negative_zero(force_backend):
    s = _scores(7, 64).t().contiguous().t()[:, ::2]   # column-major and strided
    s[2, 3] = -0.0
    force_backend("cpu")
    assert torch.equal(ops.select(s, 0.8), reference.select(s, 0.8))
    assert torch.equal(ops.select_topk(s, 0.2), reference.select_topk(s, 0.2))


# ------------------------------------------------------------------ masked updates


def _param_case(shape, per_weight, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).to(dtype)
    mask_shape = shape if per_weight else shape[:1]
    mask = torch.rand(mask_shape, generator=gen) > 0.5
    return p, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (97, 3), (13, 4, 3, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_weight", [False, True], ids=["row", "weight"])
def test_masked_adamw_matches_reference_and_freezes(force_backend, dtype, shape, per_weight):
    p0, mask = _param_case(shape, per_weight, dtype)
    p1, p2 = p0.clone(), p0.clone()
    m1, v1 = torch.zeros_like(p0), torch.zeros_like(p0)
    m2, v2 = m1.clone(), v1.clone()
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        g = torch.randn(shape, generator=gen).to(dtype)
        g[~mask] = float("nan")  # frozen gradients are never read by the cpu kernel
        force_backend("cpu")
        ops.masked_adamw_(p1, g, m1, v1, mask, 1e-2, 0.9, 0.999, 1e-8, 0.05, step)
        reference.masked_adamw_(p2, torch.nan_to_num(g), m2, v2, mask, 1e-2, 0.9, 0.999, 1e-8, 0.05, step)
    full = mask if per_weight else mask.view(-1, *[1] * (len(shape) - 1)).expand(shape)
    for a, b in ((p1, p2), (m1, m2), (v1, v2)):
        assert_close(a[full], b[full], MASKED_UPDATE, dtype)
    assert torch.equal(p1[~full], p0[~full])
    assert not m1[~full].any() and not v1[~full].any()


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01), (0.0, 0.1)])
@pytest.mark.parametrize("per_weight", [False, True], ids=["row", "weight"])
def test_masked_sgd_matches_torch_and_freezes(force_backend, momentum, wd, per_weight):
    shape = (17, 5)
    p0, mask = _param_case(shape, per_weight, torch.float32)
    p, buf = p0.clone(), torch.zeros(shape)
    tp = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([tp], lr=0.05, momentum=momentum, weight_decay=wd)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        g = torch.randn(shape, generator=gen)
        force_backend("cpu")
        ops.masked_sgd_(p, g, buf, mask, 0.05, momentum, wd)
        tp.grad = g.clone()
        opt.step()
    full = mask if per_weight else mask.view(-1, 1).expand(shape)
    assert_close(p[full], tp.detach()[full], MASKED_UPDATE, torch.float32)
    assert torch.equal(p[~full], p0[~full]) and not buf[~full].any()


def test_masked_adamw_matches_torch_adamw(force_backend):
    p0, mask = _param_case((64, 32), False, torch.float32)
    p, m, v = p0.clone(), torch.zeros(64, 32), torch.zeros(64, 32)
    tp = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([tp], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02)
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 6):
        g = torch.randn(64, 32, generator=gen)
        force_backend("cpu")
        ops.masked_adamw_(p, g, m, v, mask, 3e-3, 0.8, 0.95, 1e-6, 0.02, step)
        tp.grad = g.clone()
        opt.step()
    assert_close(p[mask], tp.detach()[mask], MASKED_UPDATE, torch.float32)
    assert torch.equal(p[~mask], p0[~mask])


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_select_backend_on_empty_scores(shape):
    """The cpu backend called directly (the front door returns early on empty scores): an empty tensor's
    data pointer is null, which the kernel once took for a missing output and refused (status 32)."""
    from neuslice.ops import _backend_cpu
    s = torch.rand(shape)
    assert _backend_cpu.select(s, 0.5).shape == shape
    assert _backend_cpu.select_topk(s, 0.5).shape == shape
