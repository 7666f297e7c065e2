"""The ``triton`` backend of :mod:`neuslice.ops._dispatch` (first choice for CUDA tensors).

Exposes ``refuse(op, args)`` and one function per op with the signature of :mod:`neuslice.ops.reference`.
Arguments were checked by :mod:`neuslice.ops`; this module only decides whether its kernels can run
the call, launches them, and turns a kernel status into the op's error.

Registration: ``torch.library.custom_op``, not ``triton_op``.
    Each op is registered once, in :mod:`neuslice.ops`, as a ``custom_op`` with a fake kernel; its
    body calls the single dispatch point, which picks this backend at call time. ``torch.compile``
    (fullgraph) treats the op as one opaque node and calls our launchers inside it, so compiled
    graphs already run these kernels. ``triton_op`` would additionally let Inductor trace into the
    body, and that requires a body made only of torch ops and ``wrap_triton`` kernels (make_fx
    traceable). Ours cannot be: (1) ``accumulate_`` must raise NonFiniteError, which needs a device
    -> host read of the status word -- data-dependent control flow that a traced graph cannot hold;
    (2) the backend (triton, cuda, reference, ``NEUSLICE_BACKEND``) is chosen per call by the
    dispatcher, and a ``triton_op`` would hard-wire one backend under a second op name, while
    each op is to exist once (docs/architecture.md). What Inductor could gain by tracing in -- fusing a
    producer into our loads -- does not apply: the kernels read activations the model already wrote.

Devices: CUDA tensors; CPU tensors only when the kernels were built by the Triton interpreter
(``TRITON_INTERPRET=1`` before triton was imported), which is how the tests force this backend.
Dtypes: float32, float16, bfloat16 (not in the interpreter: numpy has no bfloat16); float64 is
refused -- the kernels compute in float32 by design, and the reference / cuda keep float64 exact.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from neuslice._errors import raise_for_status

try:
    from triton.runtime.interpreter import InterpretedFunction

    from neuslice._triton import accumulate as _acc
    from neuslice._triton import masked_update as _upd
    from neuslice._triton import select as _sel
    _IMPORT_ERROR: Optional[str] = None
    INTERPRETED = isinstance(_acc._accumulate_kernel, InterpretedFunction)
except ImportError as e:  # no triton: the backend refuses every call, import neuslice still works
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    INTERPRETED = False

__all__ = ["refuse", "accumulate_", "select", "select_topk", "masked_sgd_", "masked_adamw_", "INTERPRETED"]

_MUTATED = {"masked_sgd_": (0, 2), "masked_adamw_": (0, 2, 3)}


def _device_refusal(tensors) -> Optional[str]:
    types = {t.device.type for t in tensors}
    if types == {"cuda"}:
        return None
    if types == {"cpu"} and INTERPRETED:
        return None
    if types == {"cpu"}:
        return "runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, set before triton is imported)"
    return f"runs CUDA tensors, got {sorted(types)}"


def _dtype_refusal(dtype: torch.dtype, device: torch.device) -> Optional[str]:
    if dtype == torch.float64:
        return "computes in float32; float64 is left to cuda/reference"
    if dtype == torch.bfloat16:
        if INTERPRETED:
            return "the Triton interpreter (TRITON_INTERPRET=1) has no bfloat16"
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            return "bfloat16 needs compute capability >= 8.0"
    return None


def refuse(op: str, args: tuple) -> Optional[str]:
    """Why the triton backend cannot run this call, or None."""
    if _IMPORT_ERROR is not None:
        return f"Triton is not available ({_IMPORT_ERROR})"
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    why = _device_refusal(tensors) or _dtype_refusal(args[0].dtype, args[0].device)
    if why:
        return why
    if op == "accumulate_" and not all(t.is_contiguous() for t in args[5:10] if t is not None):
        return "needs contiguous statistics tensors"
    if op in _MUTATED and not all(_upd.rows_view(args[i]) is not None for i in _MUTATED[op]):
        return "needs param and optimizer state whose trailing dims collapse to one (a view [rows, cols])"
    return None


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def accumulate_(x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum, deeplift_sum,
                valid=None, ignore_index=-100, *, status=None):
    """With ``status`` (int32, one element, on x's device): the kernels' status word is the caller's and
    nothing is read back (the commit adds only while it is 0; labels outside [0, K) are skipped units)."""
    with _on_device(x):
        word = _acc.accumulate(x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum,
                               deeplift_sum, valid, ignore_index, interpret=INTERPRETED, status=status)
    if status is not None:
        return
    code = 0 if word is None else int(word.item())
    raise_for_status("accumulate_", code, "triton", num_classes=count.shape[0])


# Takes the caller's status word (neuslice.ops.accumulate_'s ``status``) and then does not wait for the device.
accumulate_.defers = True


def select(scores, theta):
    with _on_device(scores):
        return _sel.select(scores, theta, topk=False, interpret=INTERPRETED)


def select_topk(scores, ratio):
    with _on_device(scores):
        return _sel.select(scores, ratio, topk=True, interpret=INTERPRETED)


def masked_sgd_(param, grad, momentum_buf, mask, lr, momentum, weight_decay):
    with _on_device(param):
        _upd.masked_sgd(param, grad, momentum_buf, mask, lr, momentum, weight_decay)


def masked_adamw_(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step):
    with _on_device(param):
        _upd.masked_adamw(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step)
