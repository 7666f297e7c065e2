"""The ``cpu`` backend: tensors handed to the torch-free kernels of ``neuslice._C`` as raw pointers.

Zero-copy: x, grad, ref and labels are read in place through their strides (any layout); the
statistics, select outputs and optimizer tensors must be contiguous (they are ours or parameters),
and a call that breaks that is refused so the dispatcher falls back to the reference.
Threads: ``torch.get_num_threads()`` at each call; torch's OpenMP runtime serves both.
"""
from __future__ import annotations

from typing import Optional

import torch  # noqa: F401  (before _C: torch's libgomp then serves the kernels too)

from .. import _C
from .._errors import raise_for_status
from .reference import topk_count

__all__ = ["refuse", "accumulate_", "select", "select_topk", "masked_sgd_", "masked_adamw_", "DTYPE_CODES"]

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _contiguous(*ts) -> bool:
    return all(t.is_contiguous() for t in ts)


def refuse(op: str, args: tuple) -> Optional[str]:
    """Why the cpu backend cannot run this call, or None."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(t.device.type != "cpu" for t in tensors):
        return "runs CPU tensors only"
    if op == "accumulate_":
        if not _contiguous(*args[5:]):
            return "needs contiguous statistics tensors"
        return None
    if op in ("select", "select_topk"):
        return None
    param = args[0]
    if param.dtype not in (torch.float32, torch.float64):
        return f"updates float32/float64 parameters only, got {param.dtype}"
    if not _contiguous(*tensors):
        return "needs contiguous param, grad, state and mask"
    return None


def strides_bns(t: torch.Tensor, channels_last: bool):
    """Element strides of an activation by logical axis (b, n, s), whatever its layout ([B, N] means S = 1)."""
    if t.dim() == 2:
        return (t.stride(0), t.stride(1), 0)
    if channels_last:
        return (t.stride(0), t.stride(2), t.stride(1))
    return (t.stride(0), t.stride(1), t.stride(2))


def accumulate_(x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum, deeplift_sum):
    b = x.shape[0]
    if x.dim() == 2:
        n, s = x.shape[1], 1
    else:
        n, s = (x.shape[2], x.shape[1]) if channels_last else (x.shape[1], x.shape[2])
    per_token = labels.dim() == 2
    xs = strides_bns(x, channels_last)
    gs = strides_bns(grad, channels_last) if grad is not None else (0, 0, 0)
    if ref is None:
        rs = (0, 0)
    else:
        rs = (ref.stride(0), ref.stride(1) if ref.dim() == 2 else 0)
    ls = (labels.stride(0), labels.stride(1) if per_token else 0)
    stats = (count, act_sum, act_sq, taylor_sum, deeplift_sum)
    status = _C.accumulate_cpu(
        _ptr(x), _ptr(grad), _ptr(ref), _ptr(labels), DTYPE_CODES[x.dtype], b, n, s, count.shape[0],
        bool(channels_last), per_token, xs, gs, rs, ls, tuple(_ptr(t) for t in stats),
        torch.get_num_threads())
    raise_for_status("accumulate_", status, "cpu", num_classes=count.shape[0])


def scores_for_kernel(scores: torch.Tensor) -> torch.Tensor:
    # f16/bf16 scores are upcast exactly to float32 (a [R, N] copy, small beside the activations).
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def select(scores, theta):
    s = scores_for_kernel(scores)
    out = torch.empty(s.shape, dtype=torch.bool)
    status = _C.select_cumulative_cpu(_ptr(s), DTYPE_CODES[s.dtype], s.shape[0], s.shape[1], s.stride(0),
                                      s.stride(1), _ptr(out), float(theta), torch.get_num_threads())
    raise_for_status("select", status, "cpu")
    return out


def select_topk(scores, ratio):
    s = scores_for_kernel(scores)
    out = torch.empty(s.shape, dtype=torch.bool)
    k = topk_count(ratio, s.shape[1])
    status = _C.select_topk_cpu(_ptr(s), DTYPE_CODES[s.dtype], s.shape[0], s.shape[1], s.stride(0),
                                s.stride(1), _ptr(out), k, torch.get_num_threads())
    raise_for_status("select_topk", status, "cpu")
    return out


def _param_view(param, mask):
    rows = param.shape[0]
    cols = param.numel() // rows if rows else 0
    # A [rows] mask on a 1-d param is also a per-weight mask: the kernels treat both alike.
    return rows, cols, tuple(mask.shape) != tuple(param.shape)


def masked_sgd_(param, grad, momentum_buf, mask, lr, momentum, weight_decay):
    rows, cols, per_row = _param_view(param, mask)
    status = _C.masked_sgd_cpu(_ptr(param), _ptr(grad), _ptr(mask), DTYPE_CODES[param.dtype], rows, cols, per_row,
                               _ptr(momentum_buf), lr, momentum, weight_decay, torch.get_num_threads())
    raise_for_status("masked_sgd_", status, "cpu")


def masked_adamw_(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step):
    rows, cols, per_row = _param_view(param, mask)
    status = _C.masked_adamw_cpu(_ptr(param), _ptr(grad), _ptr(mask), DTYPE_CODES[param.dtype], rows, cols,
                                 per_row, _ptr(exp_avg), _ptr(exp_avg_sq), lr, beta1, beta2, eps, weight_decay,
                                 int(step), torch.get_num_threads())
    raise_for_status("masked_adamw_", status, "cpu")
