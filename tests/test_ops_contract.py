"""The op contract: schemas, fake kernels (opcheck, torch.compile), dispatch, bad input, properties."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import neuslice
from neuslice import BackendError, NonFiniteError, ops
from neuslice.ops import _dispatch, reference
from op_cases import IGNORE, K, loop_stats, new_stats

CPU_BACKENDS = [b for b in ("reference", "cpu") if _dispatch.import_error(b) is None]
# Every backend a call can be forced onto, with the device of its tensors: the CPU ones here (triton
# under the interpreter, conftest.py), the CUDA ones on a GPU only.
# Triton runs CPU tensors only under its interpreter: a GPU run (NEUSLICE_TEST_GPU=1, conftest.py) tests it on
# CUDA tensors instead (the first GPU run forced triton onto CPU tensors and failed 25 tests on that alone).
_CPU_TRITON = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = [pytest.param(b, "cpu", id=b) for b in ("reference", "cpu", "triton")
            if _dispatch.import_error(b) is None and (b != "triton" or _CPU_TRITON)] + [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu) for b in ("cuda", "triton", "reference")]


def _acc_args(cl=False):
    x, g = torch.randn(6, 4, 3), torch.randn(6, 4, 3)
    if cl:
        x, g = x.transpose(1, 2).contiguous(), g.transpose(1, 2).contiguous()
    return (x, g, torch.randn(4, 3), torch.tensor([0, 1, 2, 1, 0, 4]), cl, *new_stats(4))


def _sgd_args():
    return (torch.randn(5, 3), torch.randn(5, 3), torch.zeros(5, 3), torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool),
            0.1, 0.9, 0.0)


def _adamw_args():
    return (torch.randn(5, 3), torch.randn(5, 3), torch.zeros(5, 3), torch.zeros(5, 3), torch.rand(5, 3) > 0.5,
            1e-3, 0.9, 0.999, 1e-8, 0.01, 1)


OP_ARGS = {
    "accumulate_": _acc_args,
    "select": lambda: (torch.rand(4, 9), 0.9),
    "select_topk": lambda: (torch.rand(4, 9), 0.3),
    "masked_sgd_": _sgd_args,
    "masked_adamw_": _adamw_args,
}


# ------------------------------------------------------------------ opcheck and torch.compile


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", list(OP_ARGS))
def test_opcheck(force_backend, op, backend):
    force_backend(backend)
    torch.library.opcheck(getattr(torch.ops.neuslice, op).default, OP_ARGS[op]())


def test_schemas_are_the_contract():
    schemas = {op: str(getattr(torch.ops.neuslice, op).default._schema) for op in OP_ARGS}
    assert schemas["accumulate_"] == (
        "neuslice::accumulate_(Tensor x, Tensor? grad, Tensor? ref, Tensor labels, bool channels_last, "
        "Tensor(a!) count, Tensor(b!)? act_sum, Tensor(c!)? act_sq, Tensor(d!)? taylor_sum, "
        "Tensor(e!)? deeplift_sum, Tensor? valid=None, int ignore_index=-100) -> ()")
    assert schemas["select"] == "neuslice::select(Tensor scores, float theta) -> Tensor"
    assert schemas["select_topk"] == "neuslice::select_topk(Tensor scores, float ratio) -> Tensor"
    assert schemas["masked_sgd_"].startswith("neuslice::masked_sgd_(Tensor(a!) param, Tensor grad, "
                                             "Tensor(b!) momentum_buf, Tensor mask, float lr")
    assert "int step) -> ()" in schemas["masked_adamw_"]


# ------------------------------------------------------------------ the eager front door
# In plain eager calls ops.<name> runs the op's kernel without the dispatcher (three Python-level
# kernels, ~60 us a call); anywhere the dispatcher could matter it must still go through the op.

_MUTATED = {"accumulate_": (5, 6, 7, 8, 9), "select": (), "select_topk": (),
            "masked_sgd_": (0, 2), "masked_adamw_": (0, 2, 3)}


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls that go through a registered custom op (CustomOpDef.__call__)."""
    calls = []
    cls = type(ops.accumulate_.op)
    orig = cls.__call__

    def counting(self, *args, **kwargs):
        calls.append(self._qualname if hasattr(self, "_qualname") else str(self))
        return orig(self, *args, **kwargs)
    monkeypatch.setattr(cls, "__call__", counting)
    return calls


@pytest.mark.parametrize("op", list(OP_ARGS))
def test_front_door_matches_the_op_and_bumps_versions(op, op_calls):
    torch.manual_seed(0)
    a = OP_ARGS[op]()
    b = [t.clone() if isinstance(t, torch.Tensor) else t for t in a]
    before = [a[i]._version for i in _MUTATED[op]]
    out_a = getattr(ops, op)(*a)                       # front door
    assert op_calls == []                              # ... without the dispatcher
    out_b = getattr(torch.ops.neuslice, op)(*b)        # the registered op
    if out_a is not None:
        assert torch.equal(out_a, out_b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
    assert [a[i]._version for i in _MUTATED[op]] == [v + 1 for v in before]


def test_front_door_keyword_arguments(op_calls):
    a = _acc_args()
    b = [t.clone() if isinstance(t, torch.Tensor) else t for t in a]
    names = ("x", "grad", "ref", "labels", "channels_last", "count", "act_sum", "act_sq", "taylor_sum",
             "deeplift_sum")
    ops.accumulate_(a[0], a[1], **dict(zip(names[2:], a[2:])))
    ops.accumulate_(*b)
    assert op_calls == [] and all(torch.equal(x, y) for x, y in zip(a[5:], b[5:]))


def test_front_door_hands_modes_profiler_and_grad_to_the_op(op_calls):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        ops.accumulate_(*_acc_args())
    assert len(op_calls) == 1 and any("neuslice.accumulate_" in f for f in seen)

    with torch.profiler.profile() as prof:
        ops.select(torch.rand(3, 5), 0.5)
    assert len(op_calls) == 2 and any(e.name == "neuslice::select" for e in prof.events())

    a = _acc_args()
    a[6].requires_grad_()   # a mutated argument that requires grad: the op decides, as before
    ops.accumulate_(*a)
    assert len(op_calls) == 3


def test_front_door_fake_tensors_use_the_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        scores = mode.from_tensor(torch.rand(4, 9))
        out = ops.select(scores, 0.5)
    assert out.shape == (4, 9) and out.dtype == torch.bool


def _compiled_matches_eager(fn, make_args):
    eager_args, compiled_args = make_args(), make_args()
    torch._dynamo.reset()
    out_e = fn(*eager_args)
    out_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(*compiled_args)
    if out_e is not None:
        assert torch.equal(out_e, out_c)
    for a, b in zip(eager_args, compiled_args):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _seeded(make):
    def f():
        torch.manual_seed(0)
        return make()
    return f


def test_compile_accumulate():
    def fn(x, g, r, labels, cl, *stats):
        ops.accumulate_(x * 2, g, r, labels, cl, *stats)
    _compiled_matches_eager(fn, _seeded(_acc_args))


def test_compile_select():
    _compiled_matches_eager(lambda s, t: ops.select(s * 1.5, t), _seeded(OP_ARGS["select"]))


def test_compile_select_topk():
    _compiled_matches_eager(lambda s, r: ops.select_topk(s + 1, r), _seeded(OP_ARGS["select_topk"]))


def test_compile_masked_sgd():
    def fn(p, g, b, m, lr, mom, wd):
        ops.masked_sgd_(p, g * 0.5, b, m, lr, mom, wd)
    _compiled_matches_eager(fn, _seeded(_sgd_args))


def test_compile_masked_adamw():
    def fn(p, g, ea, eas, m, *h):
        ops.masked_adamw_(p, g.clamp(-1, 1), ea, eas, m, *h)
    _compiled_matches_eager(fn, _seeded(_adamw_args))


@pytest.mark.slow
def test_compile_inductor_accumulate():
    # The default backend too, once: the custom op stays opaque inside an inductor graph.
    torch._dynamo.reset()
    args = _seeded(_acc_args)()
    want = [t.clone() for t in args[5:]]
    reference.accumulate_(args[0] + 1, *args[1:5], *want)

    @torch.compile(fullgraph=True)
    def fn(x, g, r, labels, *stats):
        ops.accumulate_(x + 1, g, r, labels, False, *stats)
    fn(args[0], args[1], args[2], args[3], *args[5:])
    for a, b in zip(args[5:], want):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ properties of select


def _int_scores(rows):
    # Integer-valued scores: every partial sum is exact, so the properties hold without slack.
    return torch.tensor(rows, dtype=torch.float32)


def _forced_select(op, backend, scores, value):
    """ops.<op>(scores, value) with ``backend`` forced (hypothesis tests cannot take the fixture)."""
    os.environ["NEUSLICE_BACKEND"] = backend
    try:
        return getattr(ops, op)(scores, value)
    finally:
        del os.environ["NEUSLICE_BACKEND"]


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=40), min_size=1, max_size=4)
       .filter(lambda rs: len({len(r) for r in rs}) == 1),
       theta=st.floats(0.001, 1.0), backend=st.sampled_from(CPU_BACKENDS))
def test_select_reaches_theta_minimally(rows, theta, backend):
    s = _int_scores(rows)
    mask = _forced_select("select", backend, s, theta)
    for row, keep in zip(s.double(), mask):
        total = float(row.sum())
        if total == 0:
            assert not keep.any()
            continue
        kept = row[keep]
        assert float(kept.sum()) >= theta * total                      # the set reaches theta
        assert float(kept.sum() - kept.min()) < theta * total          # dropping its lowest falls below
        # everything above the smallest kept score is kept; ties are taken lower index first
        low = float(kept.min())
        assert bool(keep[row > low].all())
        tied = (row == low).nonzero().squeeze(1)
        assert keep[tied].tolist() == sorted(keep[tied].tolist(), reverse=True)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=30), min_size=1, max_size=3)
       .filter(lambda rs: len({len(r) for r in rs}) == 1),
       ratio=st.floats(0.001, 1.0), backend=st.sampled_from(CPU_BACKENDS))
def test_select_topk_counts_and_order(rows, ratio, backend):
    s = _int_scores(rows)
    mask = _forced_select("select_topk", backend, s, ratio)
    k = reference.topk_count(ratio, s.shape[1])
    for row, keep in zip(s, mask):
        assert int(keep.sum()) == k
        if k < len(row):
            assert float(row[keep].min()) >= float(row[~keep].max())


# ------------------------------------------------------------------ bad input


def _clones(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _bits(t):
    # Bit patterns, so that NaN equals NaN and -0.0 differs from 0.0.
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


def _skip_unimplemented(backend: str, op: str) -> None:
    """Skip where ``backend`` has no kernel for ``op`` (the cuda backend runs accumulate_ and the selects only)."""
    mod = _dispatch._module(backend)
    if mod is not None and not hasattr(mod, op):
        pytest.skip(f"backend {backend!r} does not implement {op}")


def _on(args, device):
    """``args`` with their CPU tensors moved to ``device`` (a meta tensor, the wrong device, stays)."""
    return [a.to(device) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for a in args]


def _unchanged(before, after):
    return all(torch.equal(_bits(a), _bits(b)) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(before, after) if not (isinstance(a, torch.Tensor) and a.is_meta))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mutate,exc,words", [
    (lambda a: a.__setitem__(3, torch.tensor([0, 1, 2, 1, 0, 5])), ValueError, "labels must lie in [0, 5)"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 1, -1, 1, 0, 4])), ValueError, "got label -1"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 1, 2, 1, 0, 4], dtype=torch.int32)), TypeError, "int64"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 1, 2])), ValueError, "labels must be [B] = [6]"),
    (lambda a: a.__setitem__(1, torch.randn(6, 4, 2)), ValueError, "grad must have shape [6, 4, 3]"),
    (lambda a: a.__setitem__(1, torch.randn(6, 4, 3, dtype=torch.float64)), TypeError, "grad must have x's dtype"),
    (lambda a: a.__setitem__(2, torch.randn(3, 4)), ValueError, "ref must be [N, S] = [4, 3]"),
    # a per-sample ref has x's shape: anything else names the three accepted shapes
    (lambda a: a.__setitem__(2, torch.randn(5, 4, 3)), ValueError,
     "ref must be [N, S] = [4, 3] or [N] = [4] (shared by the batch), or per sample x's shape [B, N, S] = "
     "[6, 4, 3], on {device}; got [5, 4, 3] on {device}"),
    (lambda a: a.__setitem__(2, torch.randn(6, 3, 4)), ValueError, "or per sample x's shape [B, N, S] = [6, 4, 3]"),
    (lambda a: a.__setitem__(2, torch.randn(6, 4, 3, dtype=torch.float64)), TypeError, "ref must have x's dtype"),
    (lambda a: a.__setitem__(2, torch.randn(6, 4, 3, device="meta")), ValueError, "got [6, 4, 3] on meta"),
    (lambda a: a.__setitem__(6, torch.zeros(5, 3)), ValueError, "act_sum must have shape [5, 4]"),
    (lambda a: a.__setitem__(7, torch.zeros(5, 4, dtype=torch.float64)), TypeError, "act_sq must be torch.float32"),
    (lambda a: a.__setitem__(0, torch.randn(6, 4, 3, 2)), ValueError, "x must be [B, N]"),
    (lambda a: (a.__setitem__(0, torch.randn(6, 4, 0)), a.__setitem__(1, None), a.__setitem__(2, None)),
     ValueError, "x must have at least one position (S >= 1)"),
    (lambda a: a.__setitem__(0, torch.randint(0, 3, (6, 4, 3))), TypeError, "x must be float32"),
    (lambda a: a.__setitem__(3, torch.zeros(6, 3, dtype=torch.long)), ValueError, "need channels_last=True"),
    (lambda a: a.__setitem__(1, torch.randn(6, 4, 3, device="meta")), ValueError, "grad must be on x's device"),
    # valid and ignore_index (issue 13)
    (lambda a: a.extend([torch.ones(6, 3, dtype=torch.uint8), -100]), TypeError, "valid must be bool [B, S]"),
    (lambda a: a.extend([torch.ones(6, 2, dtype=torch.bool), -100]), ValueError, "valid must be [B, S] = [6, 3]"),
    (lambda a: a.extend([torch.ones(6, dtype=torch.bool), -100]), ValueError, "valid must be [B, S] = [6, 3]"),
    (lambda a: a.extend([torch.ones(6, 3, dtype=torch.bool, device="meta"), -100]), ValueError,
     "valid must be [B, S] = [6, 3] on"),
    (lambda a: (a.__setitem__(3, torch.tensor([0, 1, -5, 1, 0, 4])), a.extend([None, -100])), ValueError,
     "or equal ignore_index (-100), got label -5"),
    (lambda a: (a.__setitem__(3, torch.tensor([0, 1, -100, 1, 0, 4])), a.extend([None, -1])), ValueError,
     "got label -100"),
    (lambda a: (a.__setitem__(3, torch.tensor([0, 1, 7, 1, 0, -100])), a.extend([None, -100])), ValueError,
     "labels must lie in [0, 5)"),
    (lambda a: a.extend([None, True]), TypeError, "ignore_index must be an int (schema: int ignore_index), got bool"),
    (lambda a: a.extend([None, -100.0]), TypeError, "ignore_index must be an int"),
])
def test_accumulate_bad_input_is_rejected_and_changes_nothing(force_backend, backend, device, mutate, exc, words):
    force_backend(backend)
    args = list(_acc_args())
    for t in args[5:]:
        t.fill_(0.5)
    mutate(args)
    args = _on(args, device)
    before = _clones(args)
    with pytest.raises(exc, match="neuslice.accumulate_") as info:
        ops.accumulate_(*args)
    assert words.replace("{device}", str(args[0].device)) in str(info.value)
    assert _unchanged(before, args)


@pytest.mark.parametrize("layout,x_shape,words", [
    ("cf", (6, 4, 3), "[N, S] = [4, 3] or [N] = [4] (shared by the batch), or per sample x's shape [B, N, S] = [6, 4, 3]"),
    ("cl", (6, 3, 4), "[N, S] = [4, 3] or [N] = [4] (shared by the batch), or per sample x's shape [B, S, N] = [6, 3, 4]"),
    ("2d", (6, 4), "[N, S] = [4, 1] or [N] = [4] (shared by the batch), or per sample x's shape [B, N] = [6, 4]"),
])
def test_accumulate_ref_shape_error_names_the_three_shapes(force_backend, layout, x_shape, words):
    """Per layout, the error spells the shared shapes and the per-sample one (x's) with their sizes."""
    force_backend("reference")
    x = torch.randn(x_shape)
    stats = new_stats(4)
    before = _clones(stats)
    for bad in (torch.randn(7, *x_shape[1:]), torch.randn(4, 2), torch.randn(3)):
        with pytest.raises(ValueError, match="neuslice.accumulate_") as info:
            ops.accumulate_(x, torch.randn(x_shape), bad, torch.tensor([0, 1, 2, 1, 0, 3]), layout == "cl", *stats)
        assert "ref must be " + words in str(info.value)
    assert _unchanged(before, stats)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["x", "grad", "ref", "ref per sample"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("cl,per_token", [(False, False), (True, False), (True, True)])
def test_accumulate_non_finite_changes_nothing(force_backend, backend, where, value, cl, per_token):
    force_backend(backend)
    args = list(_acc_args(cl))
    if per_token:
        args[3] = torch.randint(0, K, (6, 3))
    if where == "ref per sample":
        args[2] = torch.randn_like(args[0])
    for t in args[5:]:
        t.uniform_()
    target = {"x": args[0], "grad": args[1]}.get(where, args[2])
    target.view(-1)[5] = value
    before = _clones(args)
    with pytest.raises(NonFiniteError, match="neuslice.accumulate_: non-finite value in "
                                             + ("x" if where == "x" else "grad")):
        ops.accumulate_(*args)
    assert _unchanged(before, args)


def test_accumulate_overflowing_square_is_non_finite(force_backend):
    for backend in CPU_BACKENDS:
        force_backend(backend)
        st_ = new_stats(2)
        with pytest.raises(NonFiniteError):
            ops.accumulate_(torch.full((2, 2), 3e38), None, None, torch.tensor([0, 1]), False, *st_)
        assert not any(t.any() for t in st_)


# ------------------------------------------------------------------ valid, ignore_index, statistics not kept
# (issue 13; definitions in op_cases.loop_stats and docs/method.md §2)


def _acc_extra(kind):
    """_acc_args with the issue-13 arguments: (x, g, r, labels, cl, 5 stats, valid, ignore_index)."""
    torch.manual_seed(0)
    per_token = kind.startswith("token")
    x, g, r, labels, cl, *stats = _acc_args(cl=per_token)
    valid, ignore_index = None, IGNORE
    if per_token:
        labels = torch.randint(0, K, (6, 3))
    if "sample ref" in kind:              # one reference per sample (per token: each token its own)
        r = torch.randn_like(x)
    if kind in ("valid", "token valid ignore", "sample ref valid", "token sample ref valid ignore"):
        valid = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    if kind in ("ignore", "token valid ignore", "token sample ref valid ignore"):
        labels = labels.clone()
        labels.view(-1)[::4] = IGNORE
    if kind == "ignore in range":
        ignore_index = 1                  # a label value in [0, K) can be the ignored one too
    if kind == "none":
        stats[2] = stats[4] = None        # act_sq, deeplift_sum not kept
    if kind == "avg":
        stats[2:] = [None, None, None]    # act_sum only: grad is never read
    if kind == "taylor only":
        stats[1:3] = [None, None]
        stats[4] = None
    return [x, g, r, labels, cl, *stats, valid, ignore_index]


_EXTRA_KINDS = ["valid", "ignore", "ignore in range", "none", "avg", "taylor only", "token valid ignore",
                "sample ref", "sample ref valid", "token sample ref valid ignore"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", _EXTRA_KINDS)
def test_opcheck_new_arguments(force_backend, backend, kind):
    force_backend(backend)
    torch.library.opcheck(torch.ops.neuslice.accumulate_.default, _acc_extra(kind))


def test_fake_kernel_takes_and_checks_the_new_arguments():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _acc_extra("token valid ignore")
    args[6] = None
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        torch.ops.neuslice.accumulate_(*fake)                      # no data read, nothing raised
        fake[10] = mode.from_tensor(torch.ones(6, 2, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"valid must be \[B, S\] = \[6, 3\]"):
            torch.ops.neuslice.accumulate_(*fake)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", _EXTRA_KINDS)
def test_new_arguments_match_the_float64_loop(force_backend, backend, device, kind):
    """Every backend against the hand loop of the definitions (float32 inputs; tolerance table)."""
    args = _on(_acc_extra(kind), device)
    force_backend(backend)
    stats = args[5:10]
    ops.accumulate_(*args)
    x, g, r, labels, cl = (a.cpu() if isinstance(a, torch.Tensor) else a for a in args[:5])
    valid = None if args[10] is None else args[10].cpu()
    want = loop_stats(x, g, r, labels, cl, K, valid, args[11])
    for name, got, w in zip(("count", "act_sum", "act_sq", "taylor_sum", "deeplift_sum"), stats, want):
        if got is not None:
            torch.testing.assert_close(got.cpu().double(), w, rtol=2e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("ref", ["shared", "sample"])
@pytest.mark.parametrize("cl,per_token", [(False, False), (True, False), (True, True)])
def test_nan_in_padding_and_in_ignored_samples_is_never_read(force_backend, backend, device, cl, per_token, ref):
    args = _acc_extra(("token " if per_token else "") + ("sample ref valid" if ref == "sample" else "valid")
                      + (" ignore" if per_token else ""))
    if not per_token and cl:
        args[0], args[1] = args[0].transpose(1, 2).contiguous(), args[1].transpose(1, 2).contiguous()
        args[2] = args[2].transpose(1, 2).contiguous() if ref == "sample" else args[2]
        args[4] = True
    clean = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    xv = [t.transpose(1, 2) if args[4] else t for t in (args[0], args[1], args[2] if ref == "sample" else None)
          if t is not None]
    pad = ~args[10]
    for t in xv:                          # x, g and a per-sample ref: NaN in the padding
        t.masked_fill_(pad[:, None, :], float("nan"))
    if not per_token:
        args[3] = args[3].clone()
        args[3][0] = IGNORE               # sample 0 ignored: its values are never read either
        for t in xv[::2]:                 # x (and a per-sample ref)
            t[0].fill_(float("inf"))
        clean[3] = args[3]
    args = _on(args, device)
    force_backend(backend)
    ops.accumulate_(*args)                 # no NonFiniteError: nothing non-finite was counted
    reference.accumulate_(*clean)
    for got, want in zip(args[5:10], clean[5:10]):
        torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=1e-5)
        assert torch.isfinite(got).all()


def _poisoned(where, device):
    """_acc_extra("valid") on ``device``, statistics nonzero, a NaN in x or grad at a counted position."""
    args = _acc_extra("valid")
    for t in args[5:10]:
        t.uniform_()
    (args[0] if where == "x" else args[1])[3, 2, 1] = float("nan")   # sample 3 counts all positions
    return _on(args, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("where", ["x", "grad"])
def test_non_finite_at_a_counted_position_still_changes_nothing(force_backend, backend, device, where):
    args = _poisoned(where, device)
    force_backend(backend)
    before = _clones(args)
    with pytest.raises(NonFiniteError, match="non-finite value in " + where):
        ops.accumulate_(*args)
    assert _unchanged(before, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sample_without_valid_position_is_not_counted(force_backend, backend, device):
    x = torch.randn(3, 4, 5)
    labels = torch.tensor([2, 1, 2])
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1] = False                       # sample 1 (the only one of class 1): nothing valid
    args = _on([x, torch.randn(3, 4, 5), None, labels, False, *new_stats(4), valid, IGNORE], device)
    force_backend(backend)
    ops.accumulate_(*args)
    assert args[5].cpu().tolist() == [0.0, 0.0, 2.0, 0.0, 0.0]
    assert not any(t[1].any() for t in args[6:10])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nothing_counted_changes_nothing(force_backend, backend, device):
    args = _acc_extra("valid")
    args[10] = torch.zeros(6, 3, dtype=torch.bool)
    for t in args[5:10]:
        t.fill_(0.25)
    args = _on(args, device)
    force_backend(backend)
    before = _clones(args)
    ops.accumulate_(*args)
    assert _unchanged(before, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradient_statistics_not_kept_leave_grad_unread(force_backend, backend, device):
    """taylor_sum and deeplift_sum None: grad is not read, so not checked (a NaN there is no error);
    the statistics kept are those of a call without grad."""
    args = _acc_extra("avg")
    args[1] = torch.full_like(args[1], float("nan"))
    args = _on(args, device)
    force_backend(backend)
    ops.accumulate_(*args)
    want = new_stats(4)
    reference.accumulate_(*_acc_extra("avg")[:1], None, None, *_acc_extra("avg")[3:5], *want)
    for got, w in zip(args[5:7], want[:2]):
        torch.testing.assert_close(got.cpu(), w, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["valid", "token valid ignore"])
def test_expanded_per_sample_ref_is_the_shared_ref(force_backend, backend, device, kind):
    """A per-sample ref expand()ed from the shared one (batch stride 0) gives the shared ref's statistics
    (the kernels read it in place with a batch stride of 0); a per-sample ref that differs does not."""
    args = _acc_extra(kind)
    shared = args[2]                                       # [N, S] = [4, 3]
    per_sample = (shared.t() if args[4] else shared).expand(args[0].shape)
    force_backend(backend)
    got = []
    for r in (shared, per_sample, per_sample + torch.linspace(0, 1, 6)[:, None, None]):
        a = _on(_clones(args), device)
        a[2] = r.to(device)
        ops.accumulate_(*a)
        got.append([t.cpu() for t in a[5:10]])
    for u, v in zip(got[0], got[1]):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got[0][4], got[2][4])        # deeplift follows each sample's own ref
    assert all(torch.equal(u, v) for u, v in zip(got[0][:4], got[2][:4]))   # nothing else reads ref


def _hyp_case(data, b, n, s, cl, per_token, kept, dtype):
    """A random accumulate_ call from hypothesis's draws: x, g, r, labels (some ignored), valid."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    shape = (b, s, n) if cl else (b, n, s)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    g = torch.randn(shape, generator=gen, dtype=dtype)
    ref = data.draw(st.sampled_from([None, "shared", "sample"]), label="ref")
    r = None if ref is None else torch.randn(shape if ref == "sample" else (n, s), generator=gen, dtype=dtype)
    lab_shape = (b, s) if per_token else (b,)
    labels = torch.randint(0, K, lab_shape, generator=gen)
    labels[torch.rand(lab_shape, generator=gen) < data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="ignored")] = IGNORE
    valid = None
    if data.draw(st.booleans(), label="masked"):
        valid = torch.rand(b, s, generator=gen) < data.draw(st.sampled_from([0.0, 0.5, 0.9]), label="p_valid")
    stats = [torch.zeros(K, dtype=reference.acc_dtype(dtype))] + [
        torch.zeros(K, n, dtype=reference.acc_dtype(dtype)) if k else None for k in kept]
    return [x, g, r, labels, cl, *stats, valid, IGNORE]


_hyp_shape = dict(b=st.integers(1, 6), n=st.integers(1, 9), s=st.integers(1, 7),
                  layout=st.sampled_from(["cf", "cl", "cl-tok"]), kept=st.tuples(*[st.booleans()] * 4))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), backend=st.sampled_from(CPU_BACKENDS), **_hyp_shape)
def test_property_new_arguments_match_the_float64_loop(data, backend, b, n, s, layout, kept):
    """valid / ignore_index / statistics not kept, float64 inputs: each backend equals the definitions
    (op_cases.loop_stats) to float64 rounding, padding and ignored samples holding NaN."""
    cl, per_token = layout != "cf", layout == "cl-tok"
    args = _hyp_case(data, b, n, s, cl, per_token, kept, torch.float64)
    x, g, r, labels, _, *stats = args[:10]
    valid = args[10]
    want = loop_stats(x, g, r, labels, cl, K, valid, IGNORE)
    skip = (labels == IGNORE) if per_token else (labels == IGNORE)[:, None].expand(b, s)
    if valid is not None:
        skip = skip | ~valid
    for t in (x, g, r if r is not None and r.shape == x.shape else None):
        if t is not None:                  # never read: NaN at every position that does not count
            (t.transpose(1, 2) if cl else t).masked_fill_(skip[:, None, :], float("nan"))
    os.environ["NEUSLICE_BACKEND"] = backend
    try:
        ops.accumulate_(*args)
    finally:
        del os.environ["NEUSLICE_BACKEND"]
    for got, w in zip(stats, want):
        if got is not None:
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="cpu backend not built")
@settings(max_examples=60, deadline=None)
@given(data=st.data(), threads=st.sampled_from([1, 2]), **_hyp_shape)
def test_property_cpu_matches_reference_with_new_arguments(data, threads, b, n, s, layout, kept):
    """float32: the cpu kernel against the reference within tests/tolerances.py, 1 and 2 threads."""
    from tolerances import ACCUMULATE, assert_close
    cl, per_token = layout != "cf", layout == "cl-tok"
    args = _hyp_case(data, b, n, s, cl, per_token, kept, torch.float32)
    want = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    prev = torch.get_num_threads()
    os.environ["NEUSLICE_BACKEND"] = "cpu"
    torch.set_num_threads(threads)
    try:
        ops.accumulate_(*args)
    finally:
        del os.environ["NEUSLICE_BACKEND"]
        torch.set_num_threads(prev)
    reference.accumulate_(*want)
    for got, w in zip(args[5:10], want[5:10]):
        if got is not None:
            assert_close(got, w, ACCUMULATE, torch.float32)


@pytest.mark.parametrize("op", ["select", "select_topk"])
@pytest.mark.parametrize("value", [0.0, -0.1, 1.0000001, 2.0, float("nan"), float("inf")])
def test_select_value_out_of_range(op, value):
    name = "theta" if op == "select" else "ratio"
    with pytest.raises(ValueError, match=rf"neuslice.{op}: {name} must lie in \(0, 1\], got"):
        getattr(ops, op)(torch.rand(3, 4), value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["select", "select_topk"])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_select_bad_scores(force_backend, backend, op, bad):
    force_backend(backend)
    s = torch.rand(3, 4)
    s[1, 2] = bad
    with pytest.raises(ValueError, match=f"neuslice.{op}: scores must be finite and non-negative"):
        getattr(ops, op)(s, 0.5)


@pytest.mark.parametrize("scores", [torch.rand(4), torch.rand(2, 3, 4)])
def test_select_wrong_rank(scores):
    with pytest.raises(ValueError, match=r"neuslice.select: scores must be \[R, N\]"):
        ops.select(scores, 0.5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op,index,value,exc,words", [
    ("masked_sgd_", 3, torch.ones(5, dtype=torch.uint8), TypeError, "mask must be bool"),
    ("masked_sgd_", 3, torch.ones(3, dtype=torch.bool), ValueError, "mask must be [5] (per neuron) or [5, 3]"),
    ("masked_sgd_", 1, torch.randn(5, 2), ValueError, "grad must have shape [5, 3]"),
    ("masked_sgd_", 2, torch.zeros(5, 3, dtype=torch.float64), TypeError, "momentum_buf must have param's dtype"),
    ("masked_sgd_", 4, -0.1, ValueError, "lr must be finite and >= 0"),
    ("masked_adamw_", 6, 1.0, ValueError, "beta1 must lie in [0, 1)"),
    ("masked_adamw_", 10, 0, ValueError, "step must be >= 1"),
    ("masked_adamw_", 3, torch.zeros(4, 3), ValueError, "exp_avg_sq must have shape [5, 3]"),
    ("masked_adamw_", 4, torch.ones(5, 3, dtype=torch.bool, device="meta"), ValueError, "mask must be on param's"),
])
def test_masked_update_bad_input(force_backend, backend, device, op, index, value, exc, words):
    force_backend(backend)
    args = list(_sgd_args() if op == "masked_sgd_" else _adamw_args())
    args[index] = value
    args = _on(args, device)
    before = _clones(args)
    with pytest.raises(exc, match=f"neuslice.{op}") as info:
        getattr(ops, op)(*args)
    assert words in str(info.value)
    assert _unchanged(before, args)


# ------------------------------------------------------------------ every output, every backend
# An output that cannot be written element by element, or that shares memory with an input or another
# output, is refused before anything is written, whichever backend is forced.

_OUTPUTS = {"accumulate_": ("count", "act_sum", "act_sq", "taylor_sum", "deeplift_sum"),
            "masked_sgd_": ("param", "momentum_buf"), "masked_adamw_": ("param", "exp_avg", "exp_avg_sq")}
_OUT_INDEX = {"accumulate_": dict(zip(_OUTPUTS["accumulate_"], range(5, 10))),
              "masked_sgd_": {"param": 0, "momentum_buf": 2}, "masked_adamw_": {"param": 0, "exp_avg": 2, "exp_avg_sq": 3}}
_ALIASED_INPUTS = {"accumulate_": ("x", 0), "masked_sgd_": ("grad", 1), "masked_adamw_": ("grad", 1)}
_EVERY_OUTPUT = [(op, name) for op, names in _OUTPUTS.items() for name in names]


def _mutating_args(op, device):
    torch.manual_seed(0)
    args = _on({"accumulate_": _acc_args, "masked_sgd_": _sgd_args, "masked_adamw_": _adamw_args}[op](), device)
    for i in _OUT_INDEX[op].values():
        args[i].uniform_(0.25, 0.75)   # nonzero: a write of zeros would show too
    return args


def _view_of(base, like):
    """A view of ``base``'s first elements with ``like``'s shape (and dtype)."""
    return base.reshape(-1)[:like.numel()].view(like.shape)


def _bad_output(kind, op, name, args, device):
    """Replace output ``name`` by a bad one of ``kind``; returns (exception, words, tensors to watch)."""
    i = _OUT_INDEX[op][name]
    t = args[i]
    watch = []
    if kind == "expanded":
        base = t.reshape(-1)[:1].clone()
        args[i] = base.expand(t.shape)
        return ValueError, f"{name} must not have elements sharing memory", [base]
    if kind == "overlapping":   # no zero stride: torch's own test says "too hard", ours decides
        base = t.reshape(-1).clone()
        args[i] = base.as_strided(t.shape, (1,) * t.dim()) if t.dim() > 1 else base[:1].expand(t.shape)
        return ValueError, f"{name} must not have elements sharing memory", [base]
    if kind == "alias_output":
        other = next(o for o in _OUTPUTS[op] if o != name and args[_OUT_INDEX[op][o]].numel() >= t.numel())
        args[i] = _view_of(args[_OUT_INDEX[op][other]], t)
        return ValueError, "(an output may not alias another output)", watch
    if kind == "alias_input":
        src_name, j = _ALIASED_INPUTS[op]
        args[i] = _view_of(args[j], t)
        return ValueError, f"{name} and {src_name} must not share memory (an output may not alias an input)", watch
    if kind == "inference":
        with torch.inference_mode():
            args[i] = t.clone()
        return ValueError, f"{name} must be a normal tensor to be updated in place outside torch.inference_mode()", watch
    if kind == "dtype":
        args[i] = t.double()
        return TypeError, name if name != "param" else "param's dtype", watch
    if kind == "device":
        args[i] = t.to("meta" if device == "cpu" else "cpu")
        return ValueError, name if name != "param" else "param's device", watch
    if kind == "shape":
        args[i] = t.new_zeros(*t.shape, 1) if t.dim() == 1 and op == "accumulate_" else t.new_zeros(t.shape[0] + 1, *t.shape[1:])
        return ValueError, name if name != "param" else "must have shape", watch
    raise AssertionError(kind)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["expanded", "overlapping", "alias_output", "alias_input", "inference", "dtype",
                                  "device", "shape"])
@pytest.mark.parametrize("op,name", _EVERY_OUTPUT)
def test_bad_output_is_rejected_and_changes_nothing(force_backend, backend, device, op, name, kind):
    force_backend(backend)
    args = _mutating_args(op, device)
    exc, words, watch = _bad_output(kind, op, name, args, device)
    before, watched = _clones(args), _clones(watch)
    with pytest.raises(exc, match=f"neuslice.{op}: ") as info:
        getattr(ops, op)(*args)
    assert words in str(info.value)
    assert _unchanged(before, args) and _unchanged(watched, watch)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", list(_OUTPUTS))
def test_outputs_in_disjoint_slices_of_one_buffer_are_fine(force_backend, backend, device, op):
    _skip_unimplemented(backend, op)
    # The alias check compares memory, not storages: slices of one buffer that do not overlap pass.
    args, want = _mutating_args(op, device), _mutating_args(op, device)
    outs = [args[i] for i in _OUT_INDEX[op].values()]
    buf = torch.zeros(sum(t.numel() for t in outs) + 3, device=device)
    at = 1
    for i, t in zip(_OUT_INDEX[op].values(), outs):
        args[i] = buf[at:at + t.numel()].view(t.shape).copy_(t)
        at += t.numel()
    force_backend(backend)
    getattr(ops, op)(*args)
    getattr(reference, op)(*want)
    for i in _OUT_INDEX[op].values():
        torch.testing.assert_close(args[i], want[i], rtol=1e-5, atol=1e-6)
    assert buf[0] == 0 and buf[-2:].eq(0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", list(_OUTPUTS))
def test_inference_tensors_inside_inference_mode_are_updated(force_backend, backend, device, op):
    _skip_unimplemented(backend, op)
    # Refused outside inference mode (above); inside it every backend writes them like the reference.
    with torch.inference_mode():
        args, want = _mutating_args(op, device), _mutating_args(op, device)
        force_backend(backend)
        getattr(ops, op)(*args)
        getattr(reference, op)(*want)
    for i in _OUT_INDEX[op].values():
        torch.testing.assert_close(args[i], want[i], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ empty dimensions
# The reference's answer is the contract; ops/__init__.py gives it before dispatch, for every backend.

def _empty_acc(b, n, cl=False, per_token=False, grad=True):
    s = 3
    x = torch.randn((b, s, n) if cl else (b, n, s))
    labels = torch.randint(0, K, (b, s) if per_token else (b,))
    return [x, torch.randn_like(x) if grad else None, None, labels, cl, *new_stats(n)]


_EMPTY = {
    "accumulate B=0": ("accumulate_", lambda: _empty_acc(0, 4)),
    "accumulate B=0 per token": ("accumulate_", lambda: _empty_acc(0, 4, cl=True, per_token=True)),
    "accumulate N=0": ("accumulate_", lambda: _empty_acc(6, 0)),
    "accumulate N=0 channels_last": ("accumulate_", lambda: _empty_acc(6, 0, cl=True)),
    "accumulate N=0 per token": ("accumulate_", lambda: _empty_acc(6, 0, cl=True, per_token=True)),
    "accumulate N=0 no grad": ("accumulate_", lambda: _empty_acc(6, 0, grad=False)),
    "select R=0": ("select", lambda: [torch.rand(0, 4), 0.5]),
    "select N=0": ("select", lambda: [torch.rand(3, 0), 0.5]),
    "select_topk R=0": ("select_topk", lambda: [torch.rand(0, 4), 0.5]),
    "select_topk N=0": ("select_topk", lambda: [torch.rand(3, 0), 0.5]),
}
for _shape_ in [(0,), (0, 3), (3, 0), (3, 0, 2)]:
    for _per_row in (True, False):
        _mask = torch.ones(_shape_[0] if _per_row else _shape_, dtype=torch.bool)
        _EMPTY[f"masked_sgd_ {list(_shape_)} {'per row' if _per_row else 'per weight'}"] = (
            "masked_sgd_", lambda s=_shape_, m=_mask: [torch.randn(s), torch.randn(s), torch.zeros(s), m.clone(),
                                                       0.1, 0.9, 0.01])
        _EMPTY[f"masked_adamw_ {list(_shape_)} {'per row' if _per_row else 'per weight'}"] = (
            "masked_adamw_", lambda s=_shape_, m=_mask: [torch.randn(s), torch.randn(s), torch.zeros(s), torch.zeros(s),
                                                         m.clone(), 1e-3, 0.9, 0.999, 1e-8, 0.01, 1])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", list(_EMPTY))
def test_empty_dimensions_give_the_reference_answer(force_backend, backend, device, case):
    op, make = _EMPTY[case]
    torch.manual_seed(0)
    args = _on(make(), device)
    want = _clones(args)
    want_out = getattr(reference, op)(*want)
    force_backend(backend)
    out = getattr(ops, op)(*args)
    if want_out is not None:
        assert out.shape == want_out.shape and out.dtype == torch.bool and torch.equal(out, want_out)
    assert _unchanged(want, args)
    if case.startswith("accumulate N=0"):
        assert args[5].sum() == (18 if "per token" in case else 6)   # each sample (token) counted once


# ------------------------------------------------------------------ scalar arguments
# The schema's types hold on the front door too (it skips the dispatcher's checks).

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op,index,value,words", [
    ("masked_adamw_", 10, 1.5, "step must be an int (schema: int step), got float 1.5"),
    ("masked_adamw_", 10, 2.0, "step must be an int"),
    ("masked_adamw_", 10, True, "step must be an int"),
    ("masked_adamw_", 10, "1", "step must be an int"),
    ("masked_adamw_", 5, "0.1", "lr must be a float (schema: float lr), got str"),
    ("masked_adamw_", 5, True, "lr must be a float"),
    ("masked_adamw_", 5, torch.tensor(0.1), "lr must be a float"),
    ("masked_sgd_", 5, None, "momentum must be a float"),
    ("accumulate_", 4, 1, "channels_last must be a bool (schema: bool channels_last), got int 1"),
    ("accumulate_", 4, None, "channels_last must be a bool"),
    ("select", 1, True, "theta must be a float"),
])
def test_scalar_of_the_wrong_type_is_rejected_and_changes_nothing(force_backend, backend, device, op, index, value,
                                                                   words):
    force_backend(backend)
    args = _on(list(OP_ARGS[op]()), device)
    args[index] = value
    before = _clones(args)
    with pytest.raises(TypeError, match=f"neuslice.{op}: ") as info:
        getattr(ops, op)(*args)
    assert words in str(info.value)
    assert _unchanged(before, args)


def test_float_step_is_refused_by_the_registered_op_too():
    args = list(_adamw_args())
    args[10] = 1.5
    before = _clones(args)
    with pytest.raises(RuntimeError, match="Expected a value of type 'int' for argument 'step'"):
        torch.ops.neuslice.masked_adamw_(*args)
    assert _unchanged(before, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_scalars_of_other_numeric_types_are_made_python_values(force_backend, backend, device, op_calls):
    _skip_unimplemented(backend, "masked_adamw_")
    np = pytest.importorskip("numpy")
    force_backend(backend)
    a, b = _on(list(_adamw_args()), device), _on(list(_adamw_args()), device)
    b[:] = [t.clone() if isinstance(t, torch.Tensor) else t for t in a]
    a[5], a[6], a[10] = np.float32(1e-3), np.float64(0.9), np.int64(1)   # numpy scalars
    b[5], b[6], b[10] = float(np.float32(1e-3)), 0.9, 1
    ops.masked_adamw_(*a)
    ops.masked_adamw_(*b)
    assert op_calls == []
    assert all(torch.equal(x, y) for x, y in zip(a[:5], b[:5]))
    s = torch.rand(3, 5, device=device)
    assert torch.equal(ops.select_topk(s, 1), ops.select_topk(s, 1.0))   # an int for a float, as the schema allows



# ------------------------------------------------------------------ dispatch


def test_default_backend_on_cpu_is_cpu_when_built():
    args = _acc_args()
    want = "cpu" if _dispatch.import_error("cpu") is None else "reference"
    assert _dispatch.choose("accumulate_", args) == want


def test_forced_backend_that_cannot_run_lists_every_backend(force_backend):
    force_backend("cuda")
    with pytest.raises(BackendError) as info:
        ops.select(torch.rand(2, 3), 0.5)
    msg = str(info.value)
    assert "backend 'cuda' was forced (NEUSLICE_BACKEND=cuda)" in msg
    for name in _dispatch.backends():
        assert f"{name}:" in msg


def test_forced_unknown_backend(force_backend):
    force_backend("fastest")
    with pytest.raises(BackendError, match="names no backend; expected one of reference, cpu"):
        ops.select(torch.rand(2, 3), 0.5)


def test_cpu_backend_refuses_non_contiguous_statistics():
    args = list(_acc_args())
    args[6] = torch.zeros(4, 5).t()  # a [5, 4] view that is not contiguous
    assert "contiguous" in _dispatch.refusals("accumulate_", tuple(args))["cpu"]
    assert _dispatch.choose("accumulate_", tuple(args)) == "reference"
    ops.accumulate_(*args)  # the reference serves it
    assert args[6].sum() != 0


def test_backend_info_reports_the_build():
    info = neuslice.backend_info()
    for key in ("c_extension", "cuda_compiled", "triton", "backends", "order", "cpu_isa"):
        assert key in info
    assert info["order"]["cpu"] == ["cpu", "reference"]
    assert info["order"]["cuda"] == ["triton", "cuda", "reference"]
    assert info["backends"]["reference"] is None


def test_import_without_c_extension_falls_back_to_reference():
    code = (
        "import sys; sys.modules['neuslice._C'] = None\n"
        "import torch, neuslice\n"
        "from neuslice import ops\nfrom neuslice.ops import _dispatch\n"
        "info = neuslice.backend_info()\n"
        "assert info['c_extension'] is False and 'neuslice._C' in info['c_extension_error'], info\n"
        "assert 'cannot be imported' in info['backends']['cpu']\n"
        "s = torch.tensor([[3.0, 1.0, 2.0]])\n"
        "assert ops.select(s, 0.5).tolist() == [[True, False, False]]\n"
        "assert _dispatch.choose('select', (s, 0.5)) == 'reference'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------ status: deferred data errors
# (accumulate_'s ``status`` argument: the engine's calls never wait for the device; docs/architecture.md)


def _word(device="cpu", value=0):
    return torch.full((1,), value, dtype=torch.int32, device=device)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["x", "label"])
def test_status_off_the_direct_path(force_backend, backend, where):
    """Under torch.profiler the front door calls the registered op (which has no ``status``): the call runs
    synchronously and its data error still lands in status, nothing changed, nothing raised."""
    force_backend(backend)
    args = _acc_extra("valid")
    if where == "x":
        args[0][3, 2, 1] = float("nan")
    else:
        args[3] = torch.tensor([0, 1, 2, 1, 0, 7])
    before = _clones(args)
    word, clean = _word(), _acc_extra("valid")
    with torch.profiler.profile() as prof:
        ops.accumulate_(*args, status=word)
        ops.accumulate_(*clean, status=_word())
    assert "neuslice::accumulate_" in {e.key for e in prof.key_averages()}
    assert _unchanged(before, args)
    assert word.item() == (1 if where == "x" else 4)
    plain = _acc_extra("valid")
    ops.accumulate_(*plain)
    assert all(torch.equal(a, b) for a, b in zip(clean[5:10], plain[5:10]) if a is not None)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["valid", "token valid ignore", "sample ref"])
def test_status_call_adds_what_the_raising_call_adds(force_backend, backend, device, kind):
    args = _on(_acc_extra(kind), device)
    plain = _clones(args)
    force_backend(backend)
    word = _word(device)
    ops.accumulate_(*plain)
    ops.accumulate_(*args, status=word)
    assert word.item() == 0
    for got, want in zip(args[5:10], plain[5:10]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("where", ["x", "grad"])
def test_status_takes_a_non_finite_value_and_changes_nothing(force_backend, backend, device, where):
    args = _poisoned(where, device)
    force_backend(backend)
    before = _clones(args)
    word = _word(device)
    ops.accumulate_(*args, word)                    # positional, as the engine calls it: no raise
    assert _unchanged(before, args)
    # (a non-finite x makes x*grad non-finite too: a kernel may set both bits; the x finding comes first)
    assert word.item() & 1 if where == "x" else word.item() == 2
    with pytest.raises(NonFiniteError) as deferred:
        ops.check_status(word)
    with pytest.raises(NonFiniteError) as raised:
        ops.accumulate_(*args)
    assert str(deferred.value) == str(raised.value)      # the same finding, worded alike
    assert "non-finite value in " + where in str(deferred.value)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_nonzero_status_skips_the_call(force_backend, backend, device):
    args = _on(_acc_extra("valid"), device)
    force_backend(backend)
    before = _clones(args)
    word = _word(device, 2)                          # an earlier call of the batch failed
    ops.accumulate_(*args, status=word)
    assert _unchanged(before, args)
    assert word.item() == 2


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad", [5, -1])
def test_status_takes_a_bad_label_and_changes_nothing(force_backend, backend, device, bad):
    args = _acc_extra("valid")
    args[3] = torch.tensor([0, 1, 2, 1, 0, bad])
    args = _on(args, device)
    force_backend(backend)
    before = _clones(args)
    word = _word(device)
    ops.accumulate_(*args, status=word)
    assert _unchanged(before, args)
    assert word.item() & 4
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        ops.check_status(word, num_classes=5)


def test_status_argument_errors_raise_at_once(force_backend):
    force_backend("reference")
    args = _acc_extra("valid")
    before = _clones(args)
    with pytest.raises(TypeError, match="status must be an int32 tensor of one element, got torch.float32"):
        ops.accumulate_(*args, status=torch.zeros(1))
    with pytest.raises(ValueError, match=r"status must be an int32 tensor of one element, got torch.int32 \[2\]"):
        ops.accumulate_(*args, status=torch.zeros(2, dtype=torch.int32))
    bad = list(args)
    bad[3] = torch.tensor([0, 1])                    # an argument error, status or not
    with pytest.raises(ValueError, match=r"labels must be \[B\]"):
        ops.accumulate_(*bad, status=_word())
    assert _unchanged(before, args)


def test_isa_choice_is_reported_and_checked():
    _C = pytest.importorskip("neuslice._C")
    isas = _C.cpu_isas()
    assert isas[0] == "base" and set(isas) <= {"base", "avx2", "avx512"}
    assert _C.cpu_isa() in isas
    before = _C.cpu_isa()
    assert not _C.set_cpu_isa("avx1024") and _C.cpu_isa() == before   # unknown: nothing changes
    for isa in isas:
        assert _C.set_cpu_isa(isa) and _C.cpu_isa() == isa
        assert neuslice.backend_info()["cpu_isa"] == isa
    _C.set_cpu_isa(before)


@pytest.mark.parametrize("env", ["base", "avx1024"])
def test_isa_environment_variable(env):
    """NEUSLICE_CPU_ISA picks the build at start-up; a name this CPU cannot run leaves the widest, with a warning."""
    _C = pytest.importorskip("neuslice._C")
    code = "import neuslice; print(neuslice.backend_info()['cpu_isa'])"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NEUSLICE_CPU_ISA": env},
                         capture_output=True, text=True, check=True)
    ok = env in _C.cpu_isas()
    assert run.stdout.strip() == (env if ok else _C.cpu_isas()[-1])
    assert ("is not a kernel build this CPU runs" in run.stderr) != ok, run.stderr
