"""The ``cuda`` backend (csrc/cuda + neuslice/_native_cuda.py).

Everywhere: the CUDA sources are compiled into ``_C`` whenever nvcc is on the PATH, the CPU
backends keep working in that build, the ``cuda`` backend refuses CPU tensors with a clear reason,
and its scratch plan is sane. On a GPU (``@pytest.mark.gpu``, skipped without one): the backend
against ``reference`` over odd shapes, both layouts, per-token labels, dtypes, non-contiguous
inputs and every kernel path, plus non-finite rejection, bad labels and the select tie rule.
"""
from __future__ import annotations

import shutil

import pytest
import torch

import neuslice
from neuslice.ops import _dispatch
from neuslice import ops
from neuslice.ops import reference as ref_ops
from neuslice._errors import BackendError, NonFiniteError

from tolerances import ACCUMULATE, assert_close

try:
    from neuslice import _C
except ImportError:  # pragma: no cover - the build-check test below reports it
    _C = None

STATS = ("count", "act_sum", "act_sq", "taylor_sum", "deeplift_sum")
needs_cuda_build = pytest.mark.skipif(_C is None or not _C.cuda_compiled, reason="_C built without CUDA")


def _stats(k: int, n: int, dtype=torch.float32, device="cpu"):
    return [torch.zeros(k, dtype=dtype, device=device)] + [
        torch.zeros(k, n, dtype=dtype, device=device) for _ in range(4)]


# ---------------------------------------------------------------------------------------------
# everywhere

def test_cuda_compiled_whenever_nvcc_is_present():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on the PATH")
    info = neuslice.backend_info()
    assert info["c_extension"], info["c_extension_error"]
    assert info["cuda_compiled"], "nvcc is on the PATH but neuslice._C has no CUDA kernels"
    assert info["cuda_runtime_version"] and info["cuda_runtime_version"] >= 11000
    for name in ("accumulate_cuda", "accumulate_cuda_scratch_bytes", "select_cumulative_cuda",
                 "select_topk_cuda", "cuda_device_count"):
        assert hasattr(_C, name), name
    assert info["backends"]["cuda"] is None  # the backend module imports


@needs_cuda_build
def test_device_count_is_safe_without_a_gpu():
    n = _C.cuda_device_count()
    assert n >= 0
    if not torch.cuda.is_available():
        assert n == 0


@needs_cuda_build
def test_cpu_backends_still_work_in_a_cuda_build():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 3, generator=g)
    gr = torch.randn(5, 7, 3, generator=g)
    labels = torch.tensor([0, 2, 2, 1, 0])
    got, want = _stats(3, 7), _stats(3, 7)
    assert _dispatch.choose("accumulate_", (x, gr, None, labels, False, *got)) == "cpu"
    ops.accumulate_(x, gr, None, labels, False, *got)
    ref_ops.accumulate_(x, gr, None, labels, False, *want)
    for name, a, b in zip(STATS, got, want):
        assert_close(a, b, ACCUMULATE, torch.float32, msg=name)
    scores = torch.rand(4, 9, generator=g)
    assert torch.equal(ops.select(scores, 0.9), ref_ops.select(scores, 0.9))
    assert torch.equal(ops.select_topk(scores, 0.3), ref_ops.select_topk(scores, 0.3))


@needs_cuda_build
@pytest.mark.parametrize("op", ["accumulate_", "select", "select_topk"])
def test_cuda_backend_refuses_cpu_tensors(op, force_backend):
    if op == "accumulate_":
        args = (torch.randn(2, 3), None, None, torch.tensor([0, 1]), False, *_stats(2, 3))
    else:
        args = (torch.rand(2, 3), 0.5)
    reason = _dispatch.refusals(op, args)["cuda"]
    assert reason is not None and "CUDA tensors only" in reason and "cpu" in reason
    force_backend("cuda")
    with pytest.raises(BackendError, match="CUDA tensors only"):
        _dispatch.choose(op, args)


@needs_cuda_build
def test_cuda_backend_does_not_take_masked_updates():
    p = torch.zeros(3, 2)
    args = (p, p, p, torch.ones(3, dtype=torch.bool), 0.1, 0.0, 0.0)
    assert "does not implement" in _dispatch.refusals("masked_sgd_", args)["cuda"]


@needs_cuda_build
@pytest.mark.parametrize("shape,cl,labels_shape,has_g,planes", [
    ((128, 256, 196), False, (128,), True, 4),   # conv, one warp per row, direct
    ((128, 256, 196), False, (128,), False, 2),  # activation statistics only
    ((1024, 4096), False, (1024,), True, 4),     # linear, S = 1
    ((8, 512, 3072), True, (8,), True, 4),       # transformer: positions split, sums buffer
    ((8, 512, 3072), True, (8, 512), True, 4),   # per-token labels
    ((2, 3, 5000), False, (2,), True, 4),        # long rows, few of them: split rows
])
def test_scratch_plan(shape, cl, labels_shape, has_g, planes):
    from neuslice.ops import _backend_cuda as _native_cuda
    k = 10
    x = torch.empty(shape)
    b = shape[0]
    n = shape[-1] if (cl and len(shape) == 3) else shape[1]
    s = 1 if len(shape) == 2 else (shape[1] if cl else shape[2])
    labels = torch.zeros(labels_shape, dtype=torch.long)
    lcount = b * s if len(labels_shape) == 2 else b
    nbytes = _native_cuda.scratch_bytes(x, x if has_g else None, None, labels, cl, *_stats(k, n))
    partials = 4 * planes * min(k, lcount) * n
    assert nbytes >= partials + 4 * (3 * k + 2 * lcount)
    assert nbytes % 256 == 0
    # Never the size of x: bounded by the partials plus one [3, L, N] buffer of per-row sums.
    assert nbytes <= partials + 4 * 3 * lcount * n + 4 * (3 * k + 2 * lcount) + 9 * 256


@needs_cuda_build
def test_scratch_plan_and_args_take_a_per_sample_ref():
    """A per-sample ref changes no scratch size (it is read in place, never staged)."""
    from neuslice.ops import _backend_cuda as _native_cuda
    x = torch.empty(8, 512, 64)                                   # channels-last [B, S, N]
    labels = torch.zeros(8, dtype=torch.long)
    stats = _stats(10, 64)
    shared = torch.empty(64, 512)
    per_sample = torch.empty(8, 512, 64)
    assert (_native_cuda.scratch_bytes(x, x, per_sample, labels, True, *stats)
            == _native_cuda.scratch_bytes(x, x, shared, labels, True, *stats))


def test_ref_relaid_for_the_channels_last_kernels_only_when_shared():
    """Channels-last: a shared ref ([N, S], or expand()ed per sample) whose n is not the unit-stride axis
    is re-laid n-fastest (N*S elements); the expanded one stays expanded (batch stride 0). A true
    per-sample ref (the size of x) is never copied."""
    from neuslice.ops._backend_cuda import _ref_for_kernel
    shared = torch.randn(7, 5)                                    # [N, S], s-fastest
    r = _ref_for_kernel(shared, True, 5)
    assert r.stride(0) == 1 and torch.equal(r, shared)
    expanded = shared.t().expand(3, 5, 7)                         # [B, S, N], batch stride 0, n stride 5
    r = _ref_for_kernel(expanded, True, 5)
    assert r.shape == expanded.shape and r.stride(0) == 0 and r.stride(2) == 1 and torch.equal(r, expanded)
    own = torch.randn(3, 7, 5).transpose(1, 2)                    # per sample, n stride 5
    assert _ref_for_kernel(own, True, 5) is own
    assert _ref_for_kernel(expanded, False, 5) is expanded        # channels-first walks s
    assert _ref_for_kernel(own.transpose(1, 2), False, 5).data_ptr() == own.data_ptr()


# ---------------------------------------------------------------------------------------------
# on a GPU

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _inputs(b, n, s, cl, dtype, *, per_token=False, has_g=True, ref_kind=None, k=5, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, s, n) if cl else (b, n, s)
    if noncontig:  # every second element of the last dim
        shape = shape[:-1] + (2 * shape[-1],)

    def make(scale):
        t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        t = t.to(dtype)
        return t[..., ::2] if noncontig else t

    x = make(1.0).relu() + 0.1   # post-ReLU-like activations
    gr = make(0.5) if has_g else None
    r = None
    if ref_kind == "ns":
        r = (torch.rand(n, s, generator=g, dtype=torch.float64) * 0.2).to(dtype)
    elif ref_kind == "n":
        r = (torch.rand(n, generator=g, dtype=torch.float64) * 0.2).to(dtype)
    elif ref_kind == "sample":  # per sample: x's shape and layout (per token, each token its own)
        r = make(0.2)
    labels = torch.randint(0, k, (b, s) if per_token else (b,), generator=g)
    return x, gr, r, labels


def _to(dev, *ts):
    return [None if t is None else t.to(dev) for t in ts]


def _assert_stats_match(got, x, gr, r, labels, cl, valid=None, ignore_index=-100):
    """got (cuda stats, None for one not kept) against reference on the same inputs; where a long sum
    misses the table, the error must stay within 2x that of the reference's own float32 sum (both
    against float64)."""
    acc = ref_ops.acc_dtype(x.dtype)
    k, n = got[0].shape[0], x.shape[-1] if (cl and x.dim() == 3) else x.shape[1]
    keep = [t is not None for t in got]
    want = [t if kept else None for t, kept in zip(_stats(k, n, acc, x.device), keep)]
    ref_ops.accumulate_(x, gr, r, labels, cl, *want, valid, ignore_index)
    exact = [t if kept else None for t, kept in zip(_stats(k, n, torch.float64, x.device), keep)]
    d = [None if t is None else t.double() for t in (x, gr, r)]
    ref_ops.accumulate_(d[0], d[1], d[2], labels, cl, *exact, valid, ignore_index)
    for name, a, w, e in zip(STATS, got, want, exact):
        if a is None:
            continue
        try:
            assert_close(a, w, ACCUMULATE, x.dtype, msg=name)
        except AssertionError:
            err_got = (a.double() - e).abs().max().item()
            err_ref = (w.double() - e).abs().max().item()
            assert err_got <= 2 * err_ref + 1e-12, f"{name}: error {err_got} vs the reference's {err_ref}"


def _run_cuda(x, gr, r, labels, cl, k, n):
    from neuslice.ops import _backend_cuda as _native_cuda
    dev = torch.device("cuda")
    xd, gd, rd, ld = _to(dev, x, gr, r, labels)
    got = _stats(k, n, ref_ops.acc_dtype(x.dtype), dev)
    args = (xd, gd, rd, ld, cl, *got)
    assert _native_cuda.refuse("accumulate_", args) is None
    _native_cuda.accumulate_(*args)
    return got, (xd, gd, rd, ld)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,s,cl", [
    (1, 1, 1, False), (7, 97, 1, False), (123, 33, 1, True),     # S = 1 (linear)
    (5, 7, 3, False), (6, 13, 15, False),                          # short channels-first runs (cols)
    (9, 31, 196, False), (3, 97, 49, False), (33, 5, 123, False),  # channels-first rows, unaligned
    (2, 3, 5000, False),                                           # rows split over positions
    (4, 97, 7, True), (3, 123, 300, True),                         # channels-last, direct / split
    (2, 1030, 64, True),                                           # many neurons, ragged last group
    (128, 100, 20, False),                                         # rows, several samples per warp
    (1000, 1000, 1, False), (1100, 1024, 2, True),                 # cols, several samples per thread
])
def test_accumulate_matches_reference(dtype, b, n, s, cl):
    x, gr, r, labels = _inputs(b, n, s, cl, dtype)
    got, dev_in = _run_cuda(x, gr, r, labels, cl, 5, n)
    _assert_stats_match(got, *dev_in, cl)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,s", [(3, 97, 7), (2, 64, 123), (1, 5, 1), (64, 512, 128),
                                   (2, 9, 40000)])  # > 8192 tokens: the grid-wide label sort
@pytest.mark.parametrize("ref_kind", [None, "n", "ns", "sample"])
def test_accumulate_per_token_and_ref(dtype, b, n, s, ref_kind):
    x, gr, r, labels = _inputs(b, n, s, True, dtype, per_token=True, ref_kind=ref_kind, k=7)
    got, dev_in = _run_cuda(x, gr, r, labels, True, 7, n)
    _assert_stats_match(got, *dev_in, True)


@pytest.mark.gpu
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("b,n,s", [(5, 33, 196), (2, 7, 3000), (4, 97, 9)])
@pytest.mark.parametrize("ref_kind", ["n", "ns", "sample"])
def test_accumulate_ref_both_layouts(cl, b, n, s, ref_kind):
    x, gr, r, labels = _inputs(b, n, s, cl, torch.float32, ref_kind=ref_kind)
    got, dev_in = _run_cuda(x, gr, r, labels, cl, 5, n)
    _assert_stats_match(got, *dev_in, cl)


@pytest.mark.gpu
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("has_g", [False, True])
def test_accumulate_noncontiguous_and_no_grad(cl, has_g):
    x, gr, r, labels = _inputs(6, 37, 50, cl, torch.float32, has_g=has_g, noncontig=True)
    got, dev_in = _run_cuda(x, gr, r, labels, cl, 5, 37)
    _assert_stats_match(got, *dev_in, cl)
    if not has_g:
        assert not got[3].any() and not got[4].any()


@pytest.mark.gpu
@pytest.mark.parametrize("s", [64, 3000])
def test_accumulate_grad_misaligned_with_x(s):
    """g's rows start one element off x's 16-byte phase: the rows kernel must not vectorise them."""
    x, _, _, labels = _inputs(4, 6, s, False, torch.float32)
    g = torch.randn(4, 6, s + 1, generator=torch.Generator().manual_seed(5))[..., 1:]
    assert g.stride(2) == 1 and not g.is_contiguous()
    got, dev_in = _run_cuda(x, g, None, labels, False, 5, 6)
    _assert_stats_match(got, *dev_in, False)


@pytest.mark.gpu
def test_accumulate_nhwc_conv_activation():
    """A channels_last-memory-format conv output viewed as [B, N, S]: n is the unit-stride axis."""
    g = torch.Generator().manual_seed(3)
    x4 = torch.randn(6, 40, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
    g4 = torch.randn(6, 40, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
    x, gr = x4.flatten(2), g4.flatten(2)
    assert x.stride(1) == 1
    labels = torch.randint(0, 4, (6,), generator=g)
    got, dev_in = _run_cuda(x, gr, None, labels, False, 4, 40)
    _assert_stats_match(got, *dev_in, False)


@pytest.mark.gpu
def test_accumulate_adds_into_existing_statistics_and_counts():
    x, gr, r, labels = _inputs(10, 16, 20, False, torch.float32, k=3)
    dev = torch.device("cuda")
    xd, gd, ld = _to(dev, x, gr, labels)
    got = [t + 1.5 for t in _stats(3, 16, device=dev)]
    want = [t.clone() for t in got]
    from neuslice.ops import _backend_cuda as _native_cuda
    _native_cuda.accumulate_(xd, gd, None, ld, False, *got)
    ref_ops.accumulate_(xd, gd, None, ld, False, *want)
    for name, a, w in zip(STATS, got, want):
        assert_close(a, w, ACCUMULATE, torch.float32, msg=name)
    assert torch.equal(got[0].cpu(), torch.bincount(labels, minlength=3).float() + 1.5)


def _mask_inputs(b, n, s, cl, x, gr, labels, *, per_token, pattern, seed=11):
    """valid [B, S] of ``pattern`` (right padding, left padding, holes), a sample with no valid position
    (per-sample labels, B > 1), ignored labels, and NaN written into padding of x and grad."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "right":
        lengths = torch.randint(1, s + 1, (b,), generator=g)
        valid = torch.arange(s)[None, :] < lengths[:, None]
    elif pattern == "left":
        lengths = torch.randint(1, s + 1, (b,), generator=g)
        valid = torch.arange(s)[None, :] >= (s - lengths)[:, None]
    else:
        valid = torch.rand(b, s, generator=g) < 0.6
    if b > 1 and not per_token:
        valid[1] = False
    ignore = torch.rand(labels.shape, generator=g) < 0.2
    labels = labels.masked_fill(ignore, -100)
    xv = x.unsqueeze(-1) if x.dim() == 2 else (x.transpose(1, 2) if cl else x)
    pad = (~valid).nonzero()
    for bb, ss in pad[:8].tolist():
        xv[bb, :, ss] = float("nan")
        if gr is not None:
            (gr.unsqueeze(-1) if gr.dim() == 2 else (gr.transpose(1, 2) if cl else gr))[bb, :, ss] = float("nan")
    return valid, labels


@pytest.mark.gpu
@pytest.mark.parametrize("keep", ["all", "avg", "taylor", "deeplift"])
@pytest.mark.parametrize("pattern", ["right", "left", "holes"])
@pytest.mark.parametrize("b,n,s,cl,per_token", [
    (7, 97, 1, False, False), (1000, 1000, 1, False, False),       # S = 1 (cols)
    (6, 13, 15, False, False),                                      # short channels-first runs (cols)
    (9, 31, 196, False, False), (128, 100, 20, False, False),       # channels-first rows
    (2, 3, 5000, False, False),                                     # rows split over positions
    (4, 97, 7, True, False), (3, 123, 300, True, False),            # channels-last, direct / split
    (3, 97, 7, True, True), (2, 9, 40000, True, True),              # per token (grid-wide sort too)
])
def test_accumulate_valid_ignore_and_kept_statistics(keep, pattern, b, n, s, cl, per_token):
    """valid, ignore_index and statistics left out (None) against the reference: padding (holding
    NaN) never read, ignored labels and samples without a valid position not counted."""
    from neuslice.ops import _backend_cuda as _native_cuda
    x, gr, r, labels = _inputs(b, n, s, cl, torch.float32, per_token=per_token, ref_kind="ns" if s > 1 else "n")
    if s == 1 and not per_token:
        x, gr = x.reshape(b, n), gr.reshape(b, n)
    valid, labels = _mask_inputs(b, n, s, cl, x, gr, labels, per_token=per_token, pattern=pattern)
    dev = torch.device("cuda")
    xd, gd, rd, ld, vd = _to(dev, x, gr, r, labels, valid)
    kept = {"all": (1, 1, 1, 1, 1), "avg": (1, 1, 0, 0, 0), "taylor": (1, 1, 1, 1, 0),
            "deeplift": (1, 0, 0, 0, 1)}[keep]
    got = [t if k else None for t, k in zip(_stats(5, n, device=dev), kept)]
    args = (xd, gd, rd, ld, cl, *got, vd, -100)
    assert _native_cuda.refuse("accumulate_", args) is None
    _native_cuda.accumulate_(*args)
    _assert_stats_match(got, xd, gd, rd, ld, cl, vd, -100)
    counted = (ld != -100) & (vd if per_token else vd.any(1))
    assert torch.equal(got[0].cpu(), torch.bincount(labels[counted.cpu()], minlength=5).float())


@pytest.mark.gpu
@pytest.mark.parametrize("keep", ["all", "deeplift", "taylor"])
@pytest.mark.parametrize("b,n,s,cl,per_token", [
    (7, 97, 1, False, False),                                       # S = 1 (cols), ref [B, N]
    (6, 13, 15, False, False), (9, 31, 196, False, False),          # cols, rows
    (2, 3, 5000, False, False),                                     # rows split over positions
    (4, 97, 7, True, False), (3, 123, 300, True, False),            # channels-last, direct / split
    (3, 97, 7, True, True), (2, 9, 40000, True, True),              # per token (grid-wide sort too)
])
def test_accumulate_per_sample_ref_with_valid_and_ignore(keep, b, n, s, cl, per_token):
    """A per-sample ref (x's shape) on every kernel path, padding holding NaN in x, grad and ref (never
    read), ignored labels; with taylor kept alone the ref is NaN throughout (never read either)."""
    from neuslice.ops import _backend_cuda as _native_cuda
    x, gr, r, labels = _inputs(b, n, s, cl, torch.float32, per_token=per_token, ref_kind="sample")
    if s == 1 and not per_token:
        x, gr, r = x.reshape(b, n), gr.reshape(b, n), r.reshape(b, n)
    valid, labels = _mask_inputs(b, n, s, cl, x, gr, labels, per_token=per_token, pattern="holes")
    rv = r.unsqueeze(-1) if r.dim() == 2 else (r.transpose(1, 2) if cl else r)
    rv.masked_fill_(~valid[:, None, :], float("nan"))
    if keep == "taylor":
        r.fill_(float("nan"))
    dev = torch.device("cuda")
    xd, gd, rd, ld, vd = _to(dev, x, gr, r, labels, valid)
    kept = {"all": (1, 1, 1, 1, 1), "taylor": (1, 1, 1, 1, 0), "deeplift": (1, 0, 0, 0, 1)}[keep]
    got = [t if k else None for t, k in zip(_stats(5, n, device=dev), kept)]
    args = (xd, gd, rd, ld, cl, *got, vd, -100)
    assert _native_cuda.refuse("accumulate_", args) is None
    _native_cuda.accumulate_(*args)
    _assert_stats_match(got, xd, gd, rd, ld, cl, vd, -100)
    assert all(torch.isfinite(t).all() for t in got if t is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("b,n,s", [(6, 64, 1), (5, 64, 9), (4, 40, 300)])
def test_accumulate_per_sample_ref_strides(cl, b, n, s):
    """Per-sample refs that defeat 16-byte loads (a batch stride not a multiple of the vector width, an
    odd offset), a transposed one, and one expand()ed from the shared ref, which must give the shared
    ref's statistics."""
    from neuslice.ops import _backend_cuda as _native_cuda
    x, gr, shared, labels = _inputs(b, n, s, cl, torch.float32, ref_kind="ns")
    dev = torch.device("cuda")
    xd, gd, sd, ld = _to(dev, x, gr, shared, labels)
    phys = xd.shape
    wide = torch.randn(phys[0], phys[1] * phys[2] + 1, device=dev)[:, 1:]       # batch stride N*S + 1, offset 1
    refs = [wide.reshape(phys),
            torch.randn(phys[0], phys[2], phys[1], device=dev).transpose(1, 2),  # the other axis unit-stride
            (sd.t() if cl else sd).expand(phys)]
    assert refs[0].stride(0) % 4 != 0 and refs[2].stride(0) == 0
    for r in refs:
        got = _stats(5, n, device=dev)
        _native_cuda.accumulate_(xd, gd, r, ld, cl, *got)
        _assert_stats_match(got, xd, gd, r, ld, cl)
    want = _stats(5, n, device=dev)
    _native_cuda.accumulate_(xd, gd, sd, ld, cl, *want)
    for a, w in zip(got, want):                                  # got: the expanded ref's
        assert_close(a, w, ACCUMULATE, torch.float32)


@pytest.mark.gpu
def test_accumulate_nothing_counted_changes_nothing():
    from neuslice.ops import _backend_cuda as _native_cuda
    x, gr, _, labels = _inputs(4, 9, 30, False, torch.float32)
    dev = torch.device("cuda")
    xd, gd = _to(dev, x, gr)
    got = [t + 1.0 for t in _stats(5, 9, device=dev)]
    before = [t.clone() for t in got]
    _native_cuda.accumulate_(xd, gd, None, torch.full((4,), -100, device=dev), False, *got)
    _native_cuda.accumulate_(xd, gd, None, labels.to(dev), False, *got, torch.zeros(4, 30, dtype=torch.bool, device=dev))
    for name, a, w in zip(STATS, got, before):
        assert torch.equal(a, w), name


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["x_inf", "x_nan", "g_nan", "g_inf", "xsq_overflow"])
@pytest.mark.parametrize("cl,s", [(False, 196), (False, 1), (True, 40)])
def test_accumulate_non_finite_changes_nothing(where, cl, s):
    from neuslice.ops import _backend_cuda as _native_cuda
    x, gr, _, labels = _inputs(4, 9, s, cl, torch.float32)
    if where == "x_inf":
        x[2].view(-1)[5] = float("inf")
    elif where == "x_nan":
        x[3].view(-1)[0] = float("nan")
    elif where == "g_nan":
        gr[1].view(-1)[3] = float("nan")
    elif where == "g_inf":
        gr[0].view(-1)[-1] = float("inf")
    else:
        x[1] = 3e19  # finite, but its mean squared overflows float32
    dev = torch.device("cuda")
    xd, gd, ld = _to(dev, x, gr, labels)
    got = [t + 2.0 for t in _stats(5, 9, device=dev)]
    before = [t.clone() for t in got]
    match = "value in grad" if where.startswith("g_") else "value in x;"
    with pytest.raises(NonFiniteError, match=match):
        _native_cuda.accumulate_(xd, gd, None, ld, cl, *got)
    for name, a, b in zip(STATS, got, before):
        assert torch.equal(a, b), name
    # The reference raises the same error class for the same batch.
    with pytest.raises(NonFiniteError, match=match):
        ref_ops.accumulate_(xd, gd, None, ld, cl, *[t.clone() for t in before])


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [-1, 5])
def test_accumulate_bad_label_changes_nothing(bad):
    """ops.accumulate_ checks labels first; the kernel checks them again (status, no commit)."""
    from neuslice.ops import _backend_cuda as _native_cuda
    x, gr, _, labels = _inputs(6, 8, 10, False, torch.float32)
    labels[4] = bad
    dev = torch.device("cuda")
    xd, gd, ld = _to(dev, x, gr, labels)
    got = _stats(5, 8, device=dev)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        _native_cuda.accumulate_(xd, gd, None, ld, False, *got)
    assert all(not t.any() for t in got)


@pytest.mark.gpu
def test_forced_cuda_backend_through_ops(force_backend):
    force_backend("cuda")
    dev = torch.device("cuda")
    x, gr, r, labels = _inputs(8, 24, 16, True, torch.float16, per_token=True)
    xd, gd, ld = _to(dev, x, gr, labels)
    got = _stats(5, 24, device=dev)
    assert _dispatch.choose("accumulate_", (xd, gd, None, ld, True, *got)) == "cuda"
    ops.accumulate_(xd, gd, None, ld, True, *got)
    _assert_stats_match(got, xd, gd, None, ld, True)
    scores = torch.rand(6, 50, device=dev)
    assert _dispatch.choose("select", (scores, 0.9)) == "cuda"
    assert torch.equal(ops.select(scores, 0.9), ref_ops.select(scores, 0.9))
    assert torch.equal(ops.select_topk(scores, 0.25), ref_ops.select_topk(scores, 0.25))


# select ------------------------------------------------------------------------------------------

def _cuda_select(scores, theta=None, ratio=None):
    from neuslice.ops import _backend_cuda as _native_cuda
    if theta is not None:
        return _native_cuda.select(scores, theta)
    return _native_cuda.select_topk(scores, ratio)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r,n", [(1, 1), (3, 7), (10, 97), (5, 123), (4, 2049), (2, 5000), (300, 256)])
@pytest.mark.parametrize("theta", [0.5, 0.9, 0.99, 1.0])
def test_select_matches_reference(dtype, r, n, theta):
    g = torch.Generator().manual_seed(r * 1000 + n)
    u = torch.rand(r, n, generator=g, dtype=torch.float64)
    # theta = 1 puts the cut at the smallest positive score, within summation rounding of the total
    # for spread-out values; multiples of 2^-12 keep every sum exact there (and add ties and zeros).
    scores = ((u * 4096).floor() / 4096 if theta == 1.0 else u ** 3).to(dtype).cuda()
    assert torch.equal(_cuda_select(scores, theta=theta), ref_ops.select(scores, theta))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r,n", [(1, 1), (3, 7), (10, 97), (4, 2049), (300, 256)])
@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.5, 1.0])
def test_select_topk_matches_reference(dtype, r, n, ratio):
    g = torch.Generator().manual_seed(r + n)
    scores = torch.rand(r, n, generator=g, dtype=torch.float64).to(dtype).cuda()
    assert torch.equal(_cuda_select(scores, ratio=ratio), ref_ops.select_topk(scores, ratio))


@pytest.mark.gpu
@pytest.mark.parametrize("theta", [0.25, 0.5, 0.75, 1.0])
def test_select_ties_take_lower_index_first(theta):
    rows = torch.tensor([
        [1.0, 1.0, 1.0, 1.0],              # all tied
        [0.0, 2.0, 0.0, 2.0],              # ties between zeros
        [0.0, 0.0, 0.0, 0.0],              # all zero: selects nothing
        [3.0, 1.0, 1.0, 1.0],              # a tie at the cut
        [-0.0, 1.0, 0.0, 1.0],             # negative zero is zero
    ], device="cuda")
    for dtype in (torch.float32, torch.float64):
        s = rows.to(dtype)
        assert torch.equal(_cuda_select(s, theta=theta), ref_ops.select(s, theta))
        for ratio in (0.25, 0.5, 0.75, 1.0):
            assert torch.equal(_cuda_select(s, ratio=ratio), ref_ops.select_topk(s, ratio))


@pytest.mark.gpu
def test_select_many_ties_and_strided_rows():
    g = torch.Generator().manual_seed(7)
    base = torch.randint(0, 4, (64, 3000), generator=g).double()  # heavy ties, zeros included
    scores = base.t().contiguous().t().cuda()                     # column-major: s_n != 1
    assert scores.stride(1) != 1
    for theta in (0.3, 0.9, 1.0):
        assert torch.equal(_cuda_select(scores, theta=theta), ref_ops.select(scores, theta))
    for ratio in (0.1, 0.5):
        assert torch.equal(_cuda_select(scores, ratio=ratio), ref_ops.select_topk(scores, ratio))


@pytest.mark.gpu
def test_select_rejects_bad_scores_in_kernel():
    """ops checks values first; the kernel reports a negative or non-finite score too."""
    for bad in (-1.0, float("nan"), float("inf")):
        s = torch.rand(3, 10, device="cuda")
        s[1, 4] = bad
        with pytest.raises(ValueError, match="finite and non-negative"):
            _cuda_select(s, theta=0.9)
        with pytest.raises(ValueError, match="finite and non-negative"):
            _cuda_select(s, ratio=0.5)


@pytest.mark.gpu
def test_select_empty_shapes():
    for shape in ((0, 5), (3, 0)):
        s = torch.rand(shape, device="cuda")
        assert _cuda_select(s, theta=0.5).shape == shape


@pytest.mark.gpu
@needs_cuda_build
def test_accumulate_on_cuda_tensors_prefers_the_cuda_backend():
    """_dispatch.ORDER_BY_OP: accumulate_ on CUDA tries cuda before triton (host time per call, measured by
    bench/gpu_engine.py); the other ops keep the device's order."""
    dev = torch.device("cuda")
    x, gr, _, labels = _inputs(8, 24, 16, True, torch.float32)
    xd, gd, ld = _to(dev, x, gr, labels)
    got = _stats(5, 24, device=dev)
    assert _dispatch.choose("accumulate_", (xd, gd, None, ld, True, *got)) == "cuda"
    want = "triton" if _dispatch.import_error("triton") is None else "cuda"
    assert _dispatch.choose("select", (torch.rand(6, 50, device=dev), 0.9)) == want
