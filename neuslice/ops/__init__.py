"""The op contract: each fused op once, as a ``torch.library`` custom op with a fake kernel.

Ops (schemas as registered):

- ``neuslice::accumulate_(Tensor x, Tensor? grad, Tensor? ref, Tensor labels, bool channels_last,
  Tensor(a!) count, Tensor(b!)? act_sum, Tensor(c!)? act_sq, Tensor(d!)? taylor_sum, Tensor(e!)? deeplift_sum,
  Tensor? valid=None, int ignore_index=-100) -> ()`` (the front door ``neuslice.ops.accumulate_`` also takes
  ``status``, see its docstring)
- ``neuslice::select(Tensor scores, float theta) -> Tensor``
- ``neuslice::select_topk(Tensor scores, float ratio) -> Tensor``
- ``neuslice::masked_sgd_(Tensor(a!) param, Tensor grad, Tensor(b!) momentum_buf, Tensor mask,
  float lr, float momentum, float weight_decay) -> ()``
- ``neuslice::masked_adamw_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq,
  Tensor mask, float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()``

Arguments are checked here, once, before :mod:`neuslice.ops._dispatch` hands the call to a backend;
every error names the op and says what was expected and what came. Nothing is changed by a call
that raises, on any backend. Besides shapes, dtypes and devices, the checks cover scalar types as
the schema declares them (also on the eager front door, which skips the dispatcher's), outputs that
cannot be written element by element (expanded / overlapping views, inference tensors outside
inference mode) and outputs sharing memory with an input or another output. Empty dimensions are
answered here, identically for every backend. The list is in docs/architecture.md, "The op contract".
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._errors import STATUS_BAD_LABEL, BadLabelError, NonFiniteError, raise_for_status, status_of
from . import _dispatch, reference
from ._front import _check_outputs, _check_same, _custom_op, _direct, _fail, _shape
from ._layout import bns, ref_fits
from .reference import acc_dtype

__all__ = ["accumulate_", "check_status", "select", "select_topk", "masked_sgd_", "masked_adamw_"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_STATS = ("count", "act_sum", "act_sq", "taylor_sum", "deeplift_sum")
_SUMS = _STATS[1:]
_ACC_INPUTS = ("x", "grad", "ref", "labels", "valid")


# ---------------------------------------------------------------------------------------------
# accumulate_

def _check_accumulate(x, grad, ref, labels, channels_last, stats, valid, ignore_index, *, data: bool):
    """Every check of an accumulate_ call; the label values (a pass over the labels) only when ``data``.
    Returns (B, N, S). Runs on every call: one bns(), one device read of x, sizes compared as
    torch.Size (a tuple); the messages come from the same places as the comparisons' failures."""
    op = "accumulate_"
    if x.dtype not in _FLOATS:
        _fail(op, f"x must be float32, float64, float16 or bfloat16, got {x.dtype}", TypeError)
    if x.dim() not in (2, 3):
        _fail(op, f"x must be [B, N], [B, N, S] or (channels_last) [B, S, N], got {_shape(x)}")
    b, n, s = bns(x, channels_last)
    if s == 0:
        _fail(op, f"x must have at least one position (S >= 1), got {_shape(x)} with channels_last={channels_last}")
    device, shape = x.device, x.shape
    if grad is not None:
        if grad.device != device or grad.shape != shape:
            _check_same(op, "grad", grad, x, "x")
        if grad.dtype != x.dtype:
            _fail(op, f"grad must have x's dtype {x.dtype}, got {grad.dtype}", TypeError)
    if ref is not None:
        if ref.dtype != x.dtype:
            _fail(op, f"ref must have x's dtype {x.dtype}, got {ref.dtype}", TypeError)
        if ref.device != device or not ref_fits(ref, x, channels_last):
            per_sample = "[B, N]" if x.dim() == 2 else "[B, S, N]" if channels_last else "[B, N, S]"
            _fail(op, f"ref must be [N, S] = [{n}, {s}] or [N] = [{n}] (shared by the batch), or per sample "
                      f"x's shape {per_sample} = {_shape(x)}, on {x.device}; got {_shape(ref)} on {ref.device}")
    if labels.dtype != torch.int64:
        _fail(op, f"labels must be int64, got {labels.dtype}", TypeError)
    if labels.device != device:
        _fail(op, f"labels must be on x's device {x.device}, got {labels.device}")
    if labels.dim() == 2:
        if not channels_last:
            _fail(op, f"per-token labels [B, S] need channels_last=True, got labels {_shape(labels)} "
                      "with channels_last=False")
        if labels.shape != (b, s):
            _fail(op, f"per-token labels must be [B, S] = [{b}, {s}], got {_shape(labels)}")
    elif labels.shape != (b,):
        _fail(op, f"labels must be [B] = [{b}] (or [B, S] per token), got {_shape(labels)}")
    if not -2 ** 63 <= ignore_index < 2 ** 63:
        _fail(op, f"ignore_index must fit int64 (the labels' dtype), got {ignore_index}")
    if valid is not None:
        if valid.dtype != torch.bool:
            _fail(op, f"valid must be bool [B, S] (True = the position counts), got {valid.dtype}", TypeError)
        if valid.device != device or valid.shape != (b, s):
            _fail(op, f"valid must be [B, S] = [{b}, {s}] on {x.device}, got {_shape(valid)} on {valid.device}")
    count = stats[0]
    want = acc_dtype(x.dtype)
    if count is None or count.dim() != 1 or count.shape[0] < 1:
        _fail(op, f"count must be [K] with K >= 1, got {'None' if count is None else _shape(count)}")
    k = count.shape[0]
    if count.dtype != want:
        _fail(op, f"count must be {want} for x of {x.dtype}, got {count.dtype}", TypeError)
    if count.device != device:
        _check_same(op, "count", count, x, "x", (k,))
    kn = (k, n)
    for name, t in zip(_SUMS, stats[1:]):
        if t is None:
            continue
        if t.dtype != want:
            _fail(op, f"{name} must be {want} for x of {x.dtype}, got {t.dtype}", TypeError)
        if t.device != device or t.shape != kn:
            _check_same(op, name, t, x, "x", kn)
    if data:
        _check_labels(labels, k, ignore_index)
    return b, n, s


def _bad_label(labels: Tensor, k: int, ignore_index: int) -> Optional[int]:
    """The first of accumulate_'s labels outside [0, K) that is not ignore_index, or None (reads the labels)."""
    if labels.numel() == 0:
        return None
    if labels.device.type == "cpu":
        lo, hi = (int(v) for v in torch.aminmax(labels))
    else:
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()  # one device read, not two
    if lo < 0 or hi >= k:
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= k))]
        if bad.numel():
            return int(bad[0])
    return None


def _check_labels(labels: Tensor, k: int, ignore_index: int) -> None:
    """accumulate_'s labels lie in [0, K) or equal ignore_index (the data check: reads the labels)."""
    bad = _bad_label(labels, k, ignore_index)
    if bad is not None:
        _fail("accumulate_", f"labels must lie in [0, {k}) (K = count.shape[0]) or equal ignore_index "
                             f"({ignore_index}), got label {bad}")


def _accumulate_slow(opdef, args: tuple) -> None:
    """accumulate_ with a ``status`` off the direct path (tracing, torch.profiler, modes): the registered op,
    run synchronously, its data error OR-ed into ``status`` (a nonzero one skips the call)."""
    status = args[12]
    _check_status_arg(status, args[0])
    if int(status.reshape(())) != 0:
        return
    if _bad_label(args[3], args[5].shape[0], args[11]) is not None:
        status.bitwise_or_(STATUS_BAD_LABEL)
        return
    try:
        opdef(*args[:12])
    except NonFiniteError as e:
        status.bitwise_or_(status_of(e))


@_custom_op("neuslice::accumulate_", mutates_args=_STATS, front_only=("status",), slow=_accumulate_slow, schema=(
    "(Tensor x, Tensor? grad, Tensor? ref, Tensor labels, bool channels_last, Tensor(a!) count, "
    "Tensor(b!)? act_sum, Tensor(c!)? act_sq, Tensor(d!)? taylor_sum, Tensor(e!)? deeplift_sum, "
    "Tensor? valid=None, int ignore_index=-100) -> ()"))
def accumulate_(x: Tensor, grad: Optional[Tensor], ref: Optional[Tensor], labels: Tensor,
                channels_last: bool, count: Tensor, act_sum: Optional[Tensor], act_sq: Optional[Tensor],
                taylor_sum: Optional[Tensor], deeplift_sum: Optional[Tensor], valid: Optional[Tensor] = None,
                ignore_index: int = -100, status: Optional[Tensor] = None) -> None:
    """Add one batch to one layer's per-class statistics (docs/method.md §2), in place.

    Args:
        x: activations, ``[B, N, S]`` (``[B, S, N]`` when ``channels_last``; ``[B, N]`` means S = 1);
            float32, float64, float16 or bfloat16.
        grad: gradient of the target w.r.t. ``x`` (or the DeepLIFT multiplier), like ``x``; None skips
            ``taylor_sum`` and ``deeplift_sum``.
        ref: reference activation, x's dtype: ``[N, S]`` or ``[N]`` (shared by the batch), or per sample
            with x's shape and layout (``[B, N, S]``, ``[B, S, N]`` when ``channels_last``, ``[B, N]``);
            any strides (an ``expand()``ed batch dim is read in place as the shared case). None means zero.
            Read only for a kept ``deeplift_sum`` with ``grad`` given, and only at counted positions.
        labels: int64 ``[B]``, or ``[B, S]`` per token (channels_last only; each token counts as a sample).
        count: ``[K]``; act_sum, act_sq, taylor_sum, deeplift_sum: ``[K, N]``; float32 (float64 for
            float64 x), on x's device. Each of the four sums may be None: that statistic is not kept.
        valid: None, or bool ``[B, S]``: False marks a position that does not count (padding). A sample's
            mean is over its valid positions, its Taylor/DeepLIFT sums run over them only, and a sample
            with no valid position is not counted. Values at invalid positions are never read.
        ignore_index: a label equal to it is skipped (the sample, or per token the token, counts nowhere).
        status: None, or an int32 tensor of one element on x's device (zero to start with): the call does
            not wait for the device. What would raise NonFiniteError or a bad-label error is instead OR-ed
            into ``status`` (``neuslice._errors.STATUS_*`` bits) and, as always, no statistic changes; a call
            made while ``status`` is nonzero changes nothing either. :func:`check_status` reads it (one
            device synchronisation for any number of calls) and raises the error the call would have
            raised. Argument errors (shapes, dtypes, devices) still raise at once.

    Raises ValueError/TypeError on bad arguments (docs/architecture.md, "The op contract") and
    NonFiniteError on a non-finite activation or gradient at a counted position; in every case no
    statistic is changed. An empty batch (B = 0) changes nothing; with no neurons (N = 0) only ``count`` grows.
    """
    stats = (count, act_sum, act_sq, taylor_sum, deeplift_sum)
    b, n, _ = _check_accumulate(x, grad, ref, labels, channels_last, stats, valid, ignore_index, data=False)
    if status is not None:
        _check_status_arg(status, x)
    args = (x, grad, ref, labels, channels_last, *stats, valid, ignore_index)
    # The label values are checked after every other argument and before the outputs and the backend
    # choice. A backend whose kernel checks them itself (``checks_labels``: it changes nothing and
    # raises BadLabelError) saves that pass (a torch.aminmax: 50 us from a cold cache); the check then
    # runs only to raise its own error, the same as on every other backend.
    failed = fn = None
    try:
        if act_sum is not None and act_sq is not None and taylor_sum is not None and deeplift_sum is not None:
            _check_outputs("accumulate_", stats, _STATS, args[:4] + (valid,), _ACC_INPUTS)
        else:
            present = [(t, nm) for t, nm in zip(stats, _STATS) if t is not None]
            _check_outputs("accumulate_", [t for t, _ in present], [nm for _, nm in present],
                           args[:4] + (valid,), _ACC_INPUTS)
        if status is not None:
            _check_outputs("accumulate_", [status], ["status"], args[:4] + (valid,), _ACC_INPUTS)
        if b and n:  # (B = 0 changes nothing; N = 0 is counted by the reference, for every backend)
            fn = _dispatch.pick("accumulate_", args, x.device.type)[1]
    except Exception as e:  # noqa: BLE001  (re-raised below, after the labels had their say)
        failed = e
    if status is not None:
        if failed is not None:
            raise failed
        _accumulate_deferred(fn, args, b, n, status)
        return
    kernel_checks = fn is not None and getattr(fn, "checks_labels", False)
    if not kernel_checks:
        _check_labels(labels, count.shape[0], ignore_index)
    if failed is not None:
        raise failed
    if fn is None:
        if b and not n:  # no neurons: only count grows
            reference.accumulate_(x, grad, ref, labels, channels_last, *stats, valid, ignore_index)
        return
    if not kernel_checks:
        fn(*args)
        return
    try:
        fn(*args)
        return
    except BadLabelError as e:
        failed = e
    _check_labels(labels, count.shape[0], ignore_index)  # raises the error naming the label
    raise failed


@accumulate_.register_fake
def _accumulate_fake(x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum, deeplift_sum,
                     valid=None, ignore_index=-100):
    _check_accumulate(x, grad, ref, labels, channels_last, (count, act_sum, act_sq, taylor_sum, deeplift_sum),
                      valid, ignore_index, data=False)


def _check_status_arg(status: Tensor, x: Tensor) -> None:
    if status.dtype != torch.int32 or status.numel() != 1:
        _fail("accumulate_", f"status must be an int32 tensor of one element, got {status.dtype} {_shape(status)}",
              TypeError if status.dtype != torch.int32 else ValueError)
    if status.device != x.device:
        _fail("accumulate_", f"status must be on x's device {x.device}, got {status.device}")


def _accumulate_deferred(fn, args: tuple, b: int, n: int, status: Tensor) -> None:
    """accumulate_ with a ``status`` (arguments checked): data errors go into ``status``, nothing waits for
    the device where the backend can avoid it. Backends marked ``defers`` (cuda, triton) take ``status`` as
    their kernels' status word: their commit adds only while it is 0, and the cuda kernel flags bad labels
    itself (triton's get a device-side check here, no read). The others run synchronously: a nonzero
    ``status`` skips the call, and an error's bits are OR-ed in."""
    labels, count, ignore_index = args[3], args[5], args[11]
    if fn is not None and getattr(fn, "defers", False):
        if not getattr(fn, "checks_labels", False):
            _flag_bad_labels(labels, count.shape[0], ignore_index, status)
        fn(*args, status=status)
        return
    if not b or int(status.reshape(())) != 0:
        return
    if (fn is None or not getattr(fn, "checks_labels", False)) and _bad_label(labels, count.shape[0],
                                                                             ignore_index) is not None:
        status.bitwise_or_(STATUS_BAD_LABEL)
        return
    try:
        if fn is None:  # no neurons: only count grows
            reference.accumulate_(*args)
        else:
            fn(*args)
    except (NonFiniteError, BadLabelError) as e:
        status.bitwise_or_(status_of(e))


_ACC_MUTATED = (5, 6, 7, 8, 9)   # accumulate_'s statistics, by position


def _read_as_x(x: Tensor, grad: Optional[Tensor], ref: Optional[Tensor], channels_last: bool) -> bool:
    """Whether the kernels can read ``grad`` and ``ref`` as they read ``x`` (its dtype, a float one; grad of x's
    shape; ref of x's shape or a shared ``[N, S]`` / ``[N]``, on x's device): what accumulate_trusted_ checks
    itself, since a gradient or reference of another dtype or shape would be read out of bounds."""
    if x.dtype not in _FLOATS or (grad is not None and (grad.dtype != x.dtype or grad.shape != x.shape)):
        return False
    return ref is None or (ref.dtype == x.dtype and ref.device == x.device and ref_fits(ref, x, channels_last))


def accumulate_trusted_(x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum, deeplift_sum,
                        valid, ignore_index, status=None) -> None:
    """:func:`accumulate_` for a caller whose arguments are right by construction: the slicing engine, which
    checked the tap's shape against the layer and the labels, made the statistics itself (contiguous, the
    accumulation dtype, ``[Kp]`` / ``[Kp, N]``) and passes compact labels in ``[0, Kp)`` or the compact
    ignore label. The same backend choice (:func:`_dispatch.pick`, ``NEUSLICE_BACKEND`` honoured), the same
    deferred ``status`` and the same data errors (non-finite values) as :func:`accumulate_`, without its
    argument checks: per call on a tiny tap 12.5 us against 21 us hot; with single tap views, 1.1-1.7 ms less
    host time per step of a 73-layer, hidden-32 BERT or ViT ``Profiler`` (``bench/gpu_engine.py --host``;
    docs/architecture.md, "Host time per tap"). Where the dispatcher
    is needed (torch.compile, tracing, modes, functorch; see ``_front._direct``) and for empty taps, it
    calls :func:`accumulate_` itself, checks included, and so it does for a ``grad`` or ``ref`` the kernels
    could not read as they read ``x`` (:func:`_read_as_x`: another dtype or shape would be read out of bounds;
    the engine's references come from a separate forward of the baseline, whose positions a caller's baseline
    may not match). Other bad input is not caught here: a caller that cannot vouch for its arguments calls
    :func:`accumulate_`."""
    args = (x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum, deeplift_sum, valid,
            ignore_index)
    if not x.numel() or not _direct(args, _ACC_MUTATED) or not _read_as_x(x, grad, ref, channels_last):
        accumulate_(*args, status)
        return
    fn = _dispatch.pick("accumulate_", args, x.device.type)[1]
    if status is None:
        fn(*args)
        return
    b, n, _ = bns(x, channels_last)
    _accumulate_deferred(fn, args, b, n, status)


def _flag_bad_labels(labels: Tensor, k: int, ignore_index: int, status: Tensor) -> None:
    """status |= STATUS_BAD_LABEL where a label lies outside [0, K) and is not ignore_index: device ops, no read."""
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= k)) & (labels != ignore_index)
    status.bitwise_or_(bad.any().to(torch.int32).reshape(status.shape) * STATUS_BAD_LABEL)


def check_status(status: Tensor, *, num_classes: int = 0) -> None:
    """Raise the error that the accumulate_ calls given ``status`` deferred (one device read), or return.
    ``num_classes`` words a bad-label error (the K of those calls)."""
    raise_for_status("accumulate_", int(status.reshape(())), "status", num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# select, select_topk

def _check_scores(op: str, scores: Tensor, value: float, name: str) -> None:
    if scores.dim() != 2:
        _fail(op, f"scores must be [R, N], got {_shape(scores)}")
    if scores.dtype not in _FLOATS:
        _fail(op, f"scores must be a float tensor, got {scores.dtype}", TypeError)
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0 and math.isfinite(value)):
        _fail(op, f"{name} must lie in (0, 1], got {value!r}")


def _check_score_values(op: str, scores: Tensor) -> None:
    if scores.numel() and not bool(torch.isfinite(scores).all() & (scores >= 0).all()):
        _fail(op, "scores must be finite and non-negative (metrics never are negative); "
                  f"got min {float(scores.min())}, max {float(scores.max())}"
                  + ("" if torch.isfinite(scores).all() else " and a non-finite value"))


def _run_select(op: str, scores: Tensor, value: float, name: str) -> Tensor:
    """``select``/``select_topk``: every check, then the backend."""
    _check_scores(op, scores, value, name)
    _check_score_values(op, scores)
    if scores.numel() == 0:  # R = 0 or N = 0: nothing to select, on every backend
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return _dispatch.call(op, scores, float(value))


def _select_meta(op: str, scores: Tensor, value: float, name: str) -> Tensor:
    """The fake kernel of ``select``/``select_topk``: the checks that need no data, an empty bool mask."""
    _check_scores(op, scores, value, name)
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


@_custom_op("neuslice::select", mutates_args=(), schema="(Tensor scores, float theta) -> Tensor")
def select(scores: Tensor, theta: float) -> Tensor:
    """Cumulative-Θ critical set per row (docs/method.md).

    Args:
        scores: ``[R, N]`` non-negative float scores (one row per class, one column per neuron).
        theta: in (0, 1].

    Returns:
        bool ``[R, N]``: per row, the smallest set taken in descending score order (ties: lower
        index first) whose sum reaches ``theta`` × the row total. An all-zero row selects nothing.
    """
    return _run_select("select", scores, theta, "theta")


@select.register_fake
def _select_fake(scores, theta):
    return _select_meta("select", scores, theta, "theta")


@_custom_op("neuslice::select_topk", mutates_args=(), schema="(Tensor scores, float ratio) -> Tensor")
def select_topk(scores: Tensor, ratio: float) -> Tensor:
    """Top ``ceil(ratio × N)`` per row (ties: lower index first): bool ``[R, N]``; ratio in (0, 1]."""
    return _run_select("select_topk", scores, ratio, "ratio")


@select_topk.register_fake
def _select_topk_fake(scores, ratio):
    return _select_meta("select_topk", scores, ratio, "ratio")


# ---------------------------------------------------------------------------------------------
# masked_sgd_, masked_adamw_

def _check_masked(op: str, param: Tensor, grad: Tensor, states: dict, mask: Tensor, hyper: dict) -> None:
    if param.dtype not in _FLOATS:
        _fail(op, f"param must be a float tensor, got {param.dtype}", TypeError)
    if param.dim() < 1:
        _fail(op, f"param must have at least one dimension (neurons first), got {_shape(param)}")
    for name, t in (("grad", grad), *states.items()):
        _check_same(op, name, t, param, "param")
        if t.dtype != param.dtype:
            _fail(op, f"{name} must have param's dtype {param.dtype}, got {t.dtype}", TypeError)
    if mask.dtype != torch.bool:
        _fail(op, f"mask must be bool (True = trainable), got {mask.dtype}", TypeError)
    if mask.device != param.device:
        _fail(op, f"mask must be on param's device {param.device}, got {mask.device}")
    if tuple(mask.shape) not in ((param.shape[0],), tuple(param.shape)):
        _fail(op, f"mask must be [{param.shape[0]}] (per neuron) or {list(param.shape)} (per weight), "
                  f"got {_shape(mask)}")
    for name, v in hyper.items():
        if not math.isfinite(v) or v < 0:
            _fail(op, f"{name} must be finite and >= 0, got {v!r}")


@_custom_op("neuslice::masked_sgd_", mutates_args=("param", "momentum_buf"), schema=(
    "(Tensor(a!) param, Tensor grad, Tensor(b!) momentum_buf, Tensor mask, float lr, float momentum, "
    "float weight_decay) -> ()"))
def masked_sgd_(param: Tensor, grad: Tensor, momentum_buf: Tensor, mask: Tensor, lr: float,
                momentum: float, weight_decay: float) -> None:
    """One SGD step (torch.optim.SGD, dampening 0) on the trainable entries of ``param``.

    ``mask``: bool ``[param.shape[0]]`` (per neuron) or ``param.shape`` (per weight), True = trainable.
    Frozen entries of ``param`` and ``momentum_buf`` stay bit-identical. ``momentum_buf`` starts at zeros
    (which equals torch's first-step initialisation) and is only touched when ``momentum != 0``, but
    is checked as an output either way. A parameter with no elements is left alone.
    """
    _check_masked("masked_sgd_", param, grad, {"momentum_buf": momentum_buf}, mask,
                  {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
    _check_outputs("masked_sgd_", (param, momentum_buf), ("param", "momentum_buf"), (grad, mask), ("grad", "mask"))
    if param.numel() == 0:
        return
    _dispatch.call("masked_sgd_", param, grad, momentum_buf, mask, lr, momentum, weight_decay)


@masked_sgd_.register_fake
def _masked_sgd_fake(param, grad, momentum_buf, mask, lr, momentum, weight_decay):
    _check_masked("masked_sgd_", param, grad, {"momentum_buf": momentum_buf}, mask,
                  {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})


def _check_adamw(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step):
    op = "masked_adamw_"
    _check_masked(op, param, grad, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, mask,
                  {"lr": lr, "eps": eps, "weight_decay": weight_decay})
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            _fail(op, f"{name} must lie in [0, 1), got {b!r}")
    if step < 1:
        _fail(op, f"step must be >= 1 (the step number after this update), got {step}")


@_custom_op("neuslice::masked_adamw_", mutates_args=("param", "exp_avg", "exp_avg_sq"), schema=(
    "(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor mask, float lr, "
    "float beta1, float beta2, float eps, float weight_decay, int step) -> ()"))
def masked_adamw_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, mask: Tensor,
                  lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step (torch.optim.AdamW formula, no amsgrad) on the trainable entries of ``param``.

    ``step`` is the step number after this update (1 for the first): an int (a float is refused,
    1.5 included). Frozen entries of ``param``, ``exp_avg`` and ``exp_avg_sq`` stay bit-identical.
    A parameter with no elements is left alone.
    """
    _check_adamw(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step)
    _check_outputs("masked_adamw_", (param, exp_avg, exp_avg_sq), ("param", "exp_avg", "exp_avg_sq"),
                   (grad, mask), ("grad", "mask"))
    if param.numel() == 0:
        return
    _dispatch.call("masked_adamw_", param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps,
                   weight_decay, step)


@masked_adamw_.register_fake
def _masked_adamw_fake(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step):
    _check_adamw(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step)
