"""The eager front door of accumulate_ kept lean: its shortcuts answer as the long way did.

The label check deferred to the cpu kernel (same error, same order among the checks), the layout of a
call computed in one go, the backend override read from os.environ's store, and _direct's one pass.
"""
from __future__ import annotations

import os

import pytest
import torch

from neuslice import BackendError, ops
from neuslice._errors import BadLabelError, NonFiniteError
from neuslice.ops import _dispatch
from neuslice.ops._front import _direct
from neuslice.ops._layout import accumulate_layout, bns, ref_strides_bns, strides_bns
from op_cases import K, new_stats

# (triton runs CPU tensors only under its interpreter, which a GPU run -- NEUSLICE_TEST_GPU=1 -- leaves off)
CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if _dispatch.import_error(b) is None
                and (b != "triton" or os.environ.get("TRITON_INTERPRET") == "1")]
needs_cpu = pytest.mark.skipif(_dispatch.import_error("cpu") is not None, reason="cpu backend unavailable")


def _args(cl=False, per_token=False, valid=False):
    """(x, g, ref, labels, cl, 5 stats, valid, ignore_index): B = 6, N = 4, S = 3, K = 5 classes."""
    torch.manual_seed(0)
    shape = (6, 3, 4) if cl else (6, 4, 3)
    labels = torch.randint(0, K, (6, 3)) if per_token else torch.tensor([0, 1, 2, 1, 0, 4])
    v = torch.ones(6, 3, dtype=torch.bool) if valid else None
    return [torch.randn(shape), torch.randn(shape), torch.randn(4, 3), labels, cl, *new_stats(4), v, -100]


def _clones(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _same(before, after):
    return all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before, after))


# ------------------------------------------------------------------ layout in one go

@pytest.mark.parametrize("kind", ["2d", "cf", "cl"])
@pytest.mark.parametrize("ref_kind", ["none", "[N, S]", "[N]", "per sample", "per sample expanded"])
def test_accumulate_layout_equals_the_layout_functions(kind, ref_kind):
    cl = kind == "cl"
    shape = {"2d": (5, 7), "cf": (5, 7, 3), "cl": (5, 3, 7)}[kind]
    x = torch.randn(*shape[::-1]).permute(*range(len(shape) - 1, -1, -1))  # strides reversed
    grad = torch.randn(*shape, 2)[..., 1]          # strided, not x's strides
    n, s = 7, 1 if kind == "2d" else 3
    ref = {"none": None, "[N, S]": torch.randn(s, n).t() if kind != "2d" else torch.randn(n, 1),
           "[N]": torch.randn(2 * n)[::2], "per sample": torch.randn(shape),
           "per sample expanded": torch.randn(1, *shape[1:]).expand(shape)}[ref_kind]
    for g in (grad, None):
        b_, n_, s_, xs, gs, rs = accumulate_layout(x, g, ref, cl)
        assert (b_, n_, s_) == bns(x, cl)
        assert xs == strides_bns(x, cl)
        assert gs == ((0, 0, 0) if g is None else strides_bns(g, cl))
        assert rs == ref_strides_bns(ref, x, cl)


# ------------------------------------------------------------------ labels: the cpu kernel checks, the front door words

@needs_cpu
def test_cpu_kernel_refuses_a_bad_label_itself_and_changes_nothing():
    from neuslice.ops import _backend_cpu

    assert _backend_cpu.accumulate_.checks_labels is True
    for per_token in (False, True):
        a = _args(cl=per_token, per_token=per_token)
        a[3].view(-1)[-1] = K + 3
        before = _clones(a)
        with pytest.raises(BadLabelError, match="labels must lie in"):
            _backend_cpu.accumulate_(*a)
        assert _same(before, a)


@needs_cpu
def test_cpu_front_door_reads_the_labels_only_when_the_kernel_refuses(force_backend, monkeypatch):
    """On the cpu backend the happy path makes no pass of its own over the labels (the kernel checks
    them); a bad label still gets the front door's error, naming it."""
    force_backend("cpu")
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: (calls.append(1), real(t))[1])
    ops.accumulate_(*_args())
    assert calls == []
    a = _args()
    a[3][2] = -7
    before = _clones(a)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\) \(K = count.shape\[0\]\) or equal "
                                         r"ignore_index \(-100\), got label -7") as info:
        ops.accumulate_(*a)
    assert type(info.value) is ValueError and info.value.__context__ is None
    assert calls == [1] and _same(before, a)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_token", [False, True])
def test_bad_label_at_an_invalid_position_is_refused(force_backend, backend, per_token):
    """Every label that is not ignore_index must lie in [0, K), counted or not (as before the cpu
    kernel took over the check): a bad one at a padded position, or of a sample with no valid
    position, is refused with the same error on every backend."""
    force_backend(backend)
    a = _args(cl=per_token, per_token=per_token, valid=True)
    a[10][1] = False                                  # sample 1: no valid position
    if per_token:
        a[10][3, 2] = False
        a[3][3, 2] = 9
    else:
        a[3][1] = 9
    before = _clones(a)
    with pytest.raises(ValueError, match="got label 9"):
        ops.accumulate_(*a)
    assert _same(before, a)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_label_comes_before_a_non_finite_value(force_backend, backend):
    force_backend(backend)
    a = _args()
    a[0][0, 0, 0] = float("nan")
    a[3][4] = 5
    with pytest.raises(ValueError, match="got label 5") as info:
        ops.accumulate_(*a)
    assert "non-finite" not in str(info.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_label_comes_before_an_aliased_output(force_backend, backend):
    """The label values are checked before the outputs, as they always were."""
    force_backend(backend)
    a = _args()
    a[3][0] = 11
    a[6] = a[7]                                      # act_sum is act_sq: refused, but after the labels
    with pytest.raises(ValueError, match="got label 11"):
        ops.accumulate_(*a)
    a[3][0] = 0
    with pytest.raises(ValueError, match="act_sum and act_sq must not share memory"):
        ops.accumulate_(*a)


def test_bad_label_comes_before_a_backend_that_cannot_run(force_backend):
    force_backend("cuda")                            # CPU tensors: the forced backend refuses
    a = _args()
    a[3][0] = 11
    with pytest.raises(ValueError, match="got label 11"):
        ops.accumulate_(*a)
    a[3][0] = 0
    with pytest.raises(BackendError, match="backend 'cuda' was forced"):
        ops.accumulate_(*a)
    force_backend("nonesuch")
    a[3][0] = 11
    with pytest.raises(ValueError, match="got label 11"):
        ops.accumulate_(*a)


def test_no_neurons_still_checks_labels(force_backend):
    """N = 0 goes to the reference for every backend; its labels are checked up front."""
    for backend in CPU_BACKENDS:
        force_backend(backend)
        count = torch.zeros(4)
        with pytest.raises(ValueError, match="got label 6"):
            ops.accumulate_(torch.randn(3, 0), None, None, torch.tensor([0, 6, 1]), False, count,
                            None, None, None, None)
        assert not count.any()


# ------------------------------------------------------------------ the override, read from os.environ's store

def test_forced_backend_follows_os_environ(monkeypatch):
    args = tuple(_args())
    monkeypatch.setenv("NEUSLICE_BACKEND", "  reference \n")
    assert _dispatch.choose("accumulate_", args) == "reference"
    os.environ["NEUSLICE_BACKEND"] = "cpu" if _dispatch.import_error("cpu") is None else "reference"
    assert _dispatch.choose("accumulate_", args) == os.environ["NEUSLICE_BACKEND"]
    monkeypatch.setenv("NEUSLICE_BACKEND", "   ")    # blank: not forced
    default = _dispatch.ORDER["cpu"][0 if _dispatch.import_error("cpu") is None else 1]
    assert _dispatch.choose("accumulate_", args) == default
    monkeypatch.delenv("NEUSLICE_BACKEND")
    assert _dispatch._forced() == ""
    assert _dispatch.pick("accumulate_", args, "cpu")[0] == _dispatch.choose("accumulate_", args)


# ------------------------------------------------------------------ _direct: one pass, same answers

def test_direct_refuses_subclasses_torch_function_modes_and_functorch():
    from torch.overrides import TorchFunctionMode

    a = tuple(_args())
    mutated = (5, 6, 7, 8, 9)
    assert _direct(a, mutated)

    class Sub(torch.Tensor):
        pass

    for i in (0, 3, 6, 10):
        b = list(_args(valid=True))
        b[i] = b[i].as_subclass(Sub)
        assert not _direct(tuple(b), mutated)

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert not _direct(a, mutated)
    with torch._C.DisableTorchFunctionSubclass():
        b = list(a)
        b[1] = b[1].as_subclass(Sub)
        assert not _direct(tuple(b), mutated)

    seen = []
    torch.func.vmap(lambda t: (seen.append(_direct(a, mutated)), t * 1)[1])(torch.ones(2, 3))
    assert seen == [False]
    b = list(a)
    b[8] = b[8].clone().requires_grad_()
    assert not _direct(tuple(b), mutated)
    b = list(a)
    b[0] = b[0].clone().requires_grad_()             # an input that requires grad: no mutation of it
    assert _direct(tuple(b), mutated)


# ------------------------------------------------------------------ accumulate_trusted_: the engine's call

@pytest.mark.parametrize("case", ["cf", "cl valid", "per token", "2d shared [N] ref"])
def test_trusted_call_equals_the_front_door_on_every_backend(force_backend, case):
    """Same statistics as accumulate_, on each backend the dispatcher would run, with the status word too."""
    for backend in CPU_BACKENDS:
        force_backend(backend)
        args = _args(cl=case in ("cl valid", "per token"), per_token=case == "per token", valid=case == "cl valid")
        if case == "2d shared [N] ref":
            args[0], args[1], args[2] = args[0][:, :, 0], args[1][:, :, 0], torch.randn(4)
        if case == "per token":
            args[2] = None
        want, got, deferred = _clones(args), _clones(args), _clones(args)
        ops.accumulate_(*want)
        ops.accumulate_trusted_(*got)
        status = torch.zeros(1, dtype=torch.int32)
        ops.accumulate_trusted_(*deferred, status)
        assert int(status) == 0
        for w, g, d in zip(want[5:10], got[5:10], deferred[5:10]):
            assert torch.equal(w, g) and torch.equal(w, d), (backend, case)


def test_trusted_call_keeps_the_data_errors_and_the_forced_backend(force_backend, monkeypatch):
    args = _args()
    args[0][2, 1, 0] = float("nan")
    for backend in CPU_BACKENDS:
        force_backend(backend)
        with pytest.raises(NonFiniteError):
            ops.accumulate_trusted_(*args)
        assert not any(t.any() for t in args[5:10])
        status = torch.zeros(1, dtype=torch.int32)
        ops.accumulate_trusted_(*args, status)         # deferred: into the word, nothing changes
        assert int(status) != 0 and not any(t.any() for t in args[5:10])
    force_backend("cuda")
    with pytest.raises(BackendError, match="backend 'cuda' was forced"):
        ops.accumulate_trusted_(*_args())
    monkeypatch.delenv("NEUSLICE_BACKEND")
    calls = []
    real = _dispatch.pick
    monkeypatch.setattr(_dispatch, "pick", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    ops.accumulate_trusted_(*_args())
    assert calls == ["accumulate_"]


def test_trusted_call_takes_the_front_door_where_the_dispatcher_is_needed():
    """Under a torch function mode (as torch.compile's tracing would be) and for empty taps, the checked op runs:
    a bad argument is then refused as accumulate_ refuses it."""
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    args = _args()
    args[3] = torch.tensor([0, 1, 2, 1, 0, 9])        # label 9 of K = 5
    with Mode(), pytest.raises(ValueError, match="got label 9"):
        ops.accumulate_trusted_(*_clones(args))
    empty = _args()
    empty[0], empty[1] = empty[0][:0], empty[1][:0]
    empty[3] = empty[3][:0]
    before = _clones(empty)
    ops.accumulate_trusted_(*empty)                    # B = 0 changes nothing, as accumulate_ says
    assert _same(before, empty)


def test_trusted_call_refuses_a_ref_that_does_not_fit_x():
    """A ref the kernels would read out of bounds (a shared [N, S'] with S' != S) goes to accumulate_'s checks,
    whatever the caller vouches for: the op's error, and nothing changes."""
    for backend in CPU_BACKENDS:
        args = _args()                                  # x [6, 4, 3]: N = 4, S = 3
        args[2] = torch.randn(4, 2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NEUSLICE_BACKEND", backend)
            with pytest.raises(ValueError, match=r"ref must be \[N, S\] = \[4, 3\] or \[N\] = \[4\]"):
                ops.accumulate_trusted_(*args)
        assert not any(t.any() for t in args[5:10])


@pytest.mark.parametrize("bad", ["grad dtype", "grad shape", "ref dtype", "x dtype"])
def test_trusted_call_takes_the_checks_for_a_grad_or_ref_it_could_not_read_as_x(bad):
    """A gradient or reference of another dtype or shape than the kernels read (a float64 gradient of a float32
    x would be read past its end): accumulate_'s checks and error, nothing changed."""
    args = _args()
    if bad == "grad dtype":
        args[1], want = args[1].double(), "grad must have x's dtype"
    elif bad == "grad shape":
        args[1], want = args[1][:, :, :2], "grad must have shape"
    elif bad == "ref dtype":
        args[2], want = args[2].double(), "ref must have x's dtype"
    else:
        args[0], want = args[0].to(torch.int32), "x must be float32"
    with pytest.raises((TypeError, ValueError), match=want):
        ops.accumulate_trusted_(*args)
    assert not any(t.any() for t in args[5:10])
