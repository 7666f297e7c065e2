"""The ``cpu`` backend: tensors handed to the torch-free kernels of ``neuslice._C`` as raw pointers.

Zero-copy: x, grad, ref, labels and valid are read in place through their strides (any layout); the
statistics, select outputs and optimizer tensors must be contiguous (they are ours or parameters),
and a call that breaks that is refused so the dispatcher falls back to the reference.
Threads: ``torch.get_num_threads()`` at each call; torch's OpenMP runtime serves both.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch  # noqa: F401  (before _C: torch's libgomp then serves the kernels too)

from .. import _C
from .._errors import raise_for_status
from ._native import accumulate_args, masked_param, ptr, scores_for_kernel, select_args
from .reference import topk_count

__all__ = ["refuse", "accumulate_", "select", "select_topk", "masked_sgd_", "masked_adamw_"]

# NEUSLICE_CPU_ISA caps the kernels' instruction-set build (csrc/cpu/isa_dispatch.cpp); a name this CPU and
# build cannot run is ignored there, and said here.
_ISA = os.environ.get("NEUSLICE_CPU_ISA")
if _ISA is not None and _ISA not in _C.cpu_isas():
    warnings.warn(f"NEUSLICE_CPU_ISA={_ISA!r} is not a kernel build this CPU runs (expected one of "
                  f"{', '.join(_C.cpu_isas())}); using {_C.cpu_isa()}", RuntimeWarning)


def _contiguous(*ts) -> bool:
    return all(t.is_contiguous() for t in ts)


def refuse(op: str, args: tuple) -> Optional[str]:
    """Why the cpu backend cannot run this call, or None."""
    if op == "accumulate_":  # (every call of the op's front door: plain loops, no lists built)
        for t in args:
            if isinstance(t, torch.Tensor) and not t.is_cpu:
                return "runs CPU tensors only"
        for t in args[5:10]:
            if t is not None and not t.is_contiguous():
                return "needs contiguous statistics tensors"
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(t.device.type != "cpu" for t in tensors):
        return "runs CPU tensors only"
    if op in ("select", "select_topk"):
        return None
    param = args[0]
    if param.dtype not in (torch.float32, torch.float64):
        return f"updates float32/float64 parameters only, got {param.dtype}"
    if not _contiguous(*tensors):
        return "needs contiguous param, grad, state and mask"
    return None


def accumulate_(x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum, deeplift_sum,
                valid=None, ignore_index=-100):
    args = accumulate_args(x, grad, ref, labels, channels_last, (count, act_sum, act_sq, taylor_sum, deeplift_sum),
                           valid, ignore_index)
    status = _C.accumulate_cpu(args, nthreads=torch.get_num_threads())
    if status:
        raise_for_status("accumulate_", status, "cpu", num_classes=count.shape[0])


# The kernel checks every label that is not ignore_index against [0, K) before it reads anything else,
# and on a bad one changes nothing and raises BadLabelError: the front door skips its own label pass
# (a torch.aminmax, 50 us from a cold cache) for this backend and runs it only to word that error.
accumulate_.checks_labels = True


def select(scores, theta):
    s = scores_for_kernel(scores)
    out = torch.empty(s.shape, dtype=torch.bool)
    status = _C.select_cumulative_cpu(select_args(s, out), theta=float(theta), nthreads=torch.get_num_threads())
    raise_for_status("select", status, "cpu")
    return out


def select_topk(scores, ratio):
    s = scores_for_kernel(scores)
    out = torch.empty(s.shape, dtype=torch.bool)
    status = _C.select_topk_cpu(select_args(s, out), k=topk_count(ratio, s.shape[1]),
                                nthreads=torch.get_num_threads())
    raise_for_status("select_topk", status, "cpu")
    return out


def masked_sgd_(param, grad, momentum_buf, mask, lr, momentum, weight_decay):
    status = _C.masked_sgd_cpu(masked_param(param, grad, mask), momentum_buf=ptr(momentum_buf), lr=lr,
                               momentum=momentum, weight_decay=weight_decay, nthreads=torch.get_num_threads())
    raise_for_status("masked_sgd_", status, "cpu")


def masked_adamw_(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step):
    status = _C.masked_adamw_cpu(masked_param(param, grad, mask), exp_avg=ptr(exp_avg), exp_avg_sq=ptr(exp_avg_sq),
                                 lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=int(step),
                                 nthreads=torch.get_num_threads())
    raise_for_status("masked_adamw_", status, "cpu")
