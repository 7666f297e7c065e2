"""The ``cuda`` backend: CUDA tensors handed to the CUDA kernels of ``neuslice._C`` (csrc/cuda).

Zero-copy like the ``cpu`` backend: x, grad, ref, labels and valid are read in place through their
strides; the statistics must be contiguous. Kernels run on ``torch.cuda.current_stream()`` of the
tensors' device. Scratch memory comes from torch's caching allocator (one zero-filled byte
buffer per call: the status int at offset 0, the kernels' scratch from offset 256), so the C++
side never calls cudaMalloc. The kernels write their outcome to that device status; this module
reads it (one synchronisation per call, as the CPU backend is synchronous too) and raises the
same errors as the ``cpu`` backend. ``masked_sgd_``/``masked_adamw_`` are not implemented here:
the Triton backend ahead of this one fuses them, and the reference serves the rest.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from .._errors import raise_for_status
from ._layout import bns
from ._native import DTYPE_CODES, accumulate_args, ptr, scores_for_kernel, select_args
from .reference import topk_count

__all__ = ["refuse", "accumulate_", "select", "select_topk", "scratch_bytes"]

_SCRATCH_OFFSET = 256  # the kernels' scratch starts here in the per-call buffer; the status is at 0
_INT32_MAX = 2**31 - 1
_OPS = ("accumulate_", "select", "select_topk")
_device_count: Optional[int] = None


def _runtime_devices() -> int:
    """Devices that the CUDA runtime linked into _C sees (0 when the driver is too old for it)."""
    global _device_count
    if _device_count is None:
        _device_count = int(_C.cuda_device_count())
    return _device_count


def refuse(op: str, args: tuple) -> Optional[str]:
    """Why the cuda backend cannot run this call, or None."""
    if not getattr(_C, "cuda_compiled", False):
        return "neuslice._C was built without the CUDA kernels (nvcc was not found at build time)"
    if op not in _OPS:
        return f"does not implement {op}"
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(not t.is_cuda for t in tensors):   # (the device names only when refusing: every call asks)
        devices = sorted({str(t.device) for t in tensors})
        return f"runs CUDA tensors only, got tensors on {', '.join(devices) or 'no device'}"
    if _runtime_devices() == 0:
        return (f"the CUDA runtime compiled into neuslice._C ({_C.cuda_runtime_version()}) sees no GPU "
                "(is the driver older than that runtime?)")
    if op == "accumulate_":
        x, stats = args[0], [t for t in args[5:10] if t is not None]
        if x.dtype not in DTYPE_CODES:
            return f"reads float32/float64/float16/bfloat16 activations, got {x.dtype}"
        if not all(t.is_contiguous() for t in stats):
            return "needs contiguous statistics tensors"
        b, _, s = bns(x, bool(args[4]))
        if s < 1:
            return "needs at least one position (S >= 1)"
        if b * s >= _INT32_MAX or stats[0].shape[0] >= _INT32_MAX:
            return f"indexes samples and classes with int32, got B*S = {b * s}, K = {stats[0].shape[0]}"
        return None
    scores = args[0]
    if scores.dtype not in DTYPE_CODES:
        return f"selects over float scores, got {scores.dtype}"
    if scores.dim() != 2 or max(scores.shape) > _INT32_MAX:
        return f"needs [R, N] scores with R, N < 2^31, got {list(scores.shape)}"
    return None


def _ref_for_kernel(ref: Optional[torch.Tensor], channels_last: bool, s: int) -> Optional[torch.Tensor]:
    """ref as the kernels read it. Channels-last kernels walk n: a shared ref ([N, S], or a per-sample
    [B, S, N] ``expand()``ed from one, batch stride 0) is laid out n-fastest (a copy of N*S elements,
    the size of one sample's x) so its loads coalesce like x's; the expanded one stays expanded. A
    true per-sample ref (the size of x) is read in place through its strides."""
    if ref is None or not channels_last or s <= 1:
        return ref
    if ref.dim() == 2 and ref.stride(0) != 1:
        return ref.t().contiguous().t()
    if ref.dim() == 3 and ref.stride(0) == 0 and ref.stride(2) != 1:
        return ref[0].contiguous().expand(ref.shape)
    return ref


def _kernel_args(x, grad, ref, labels, channels_last, stats, valid, ignore_index):
    """``_C.AccumulateArgs`` of the call, and the ref it points to (possibly a re-laid-out copy,
    which must outlive the launch)."""
    r = _ref_for_kernel(ref, channels_last, bns(x, channels_last)[2])
    return accumulate_args(x, grad, r, labels, channels_last, stats, valid, ignore_index), r


def scratch_bytes(x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum, deeplift_sum,
                  valid=None, ignore_index=-100) -> int:
    """Bytes of zero-filled device scratch the accumulate kernels take for this call (op signature;
    computed on the host from shapes and strides, so CPU tensors work too)."""
    args, _ = _kernel_args(x, grad, ref, labels, channels_last,
                           (count, act_sum, act_sq, taylor_sum, deeplift_sum), valid, ignore_index)
    return int(_C.accumulate_cuda_scratch_bytes(args))


def _check_launch(op: str, rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"neuslice.{op}: the cuda kernel launch failed (status {rc}); {what}")


def accumulate_(x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum, deeplift_sum,
                valid=None, ignore_index=-100, *, status=None):
    """With ``status`` (int32, one element, on x's device): the kernels' status word is the caller's, and
    nothing is read back (the commit adds only while it is 0; neuslice.ops.check_status reads it)."""
    dev = x.device
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        args, _r = _kernel_args(x, grad, ref, labels, channels_last,
                                (count, act_sum, act_sq, taylor_sum, deeplift_sum), valid, ignore_index)
        nbytes = int(_C.accumulate_cuda_scratch_bytes(args))
        buf = torch.zeros(_SCRATCH_OFFSET + nbytes, dtype=torch.uint8, device=dev)
        base = buf.data_ptr()
        word = base if status is None else status.data_ptr()
        rc = _C.accumulate_cuda(args, scratch=base + _SCRATCH_OFFSET, scratch_bytes=nbytes, status=word,
                                stream=stream, device=dev.index)
        _check_launch("accumulate_", rc, "no statistic was changed")
        if status is not None:
            return
        code = int(buf[:4].view(torch.int32).item())
    raise_for_status("accumulate_", code, "cuda", num_classes=count.shape[0])


# The kernels check every label that is not ignore_index against [0, K) (out-of-range ones are never
# counted and set the status' bad-label bit, so nothing changes): the front door skips its own label
# pass (a torch.aminmax and a device read per call) and runs it only to word a BadLabelError.
accumulate_.checks_labels = True
# Takes the caller's status word (neuslice.ops.accumulate_'s ``status``) and then does not wait for the device.
accumulate_.defers = True


def _select(op: str, scores: torch.Tensor, theta: float, k: int) -> torch.Tensor:
    s = scores_for_kernel(scores)
    dev = s.device
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        out = torch.empty(s.shape, dtype=torch.bool, device=dev)
        status = torch.zeros(1, dtype=torch.int32, device=dev)
        args = select_args(s, out)
        launch = dict(status=ptr(status), stream=stream, device=dev.index)
        if op == "select":
            rc = _C.select_cumulative_cuda(args, theta=float(theta), **launch)
        else:
            rc = _C.select_topk_cuda(args, k=int(k), **launch)
        _check_launch(op, rc, "no selection was made")
        st = int(status.item())
    raise_for_status(op, st, "cuda")
    return out


def select(scores, theta):
    return _select("select", scores, theta, 0)


def select_topk(scores, ratio):
    return _select("select_topk", scores, 0.0, topk_count(ratio, scores.shape[1]))
