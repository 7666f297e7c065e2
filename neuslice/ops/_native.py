"""The Python side of the native boundary: tensors to the argument structs of ``neuslice._C``.

The ``cpu`` and ``cuda`` backends hand their tensors to the torch-free C++ core as raw pointers,
sizes and element strides. Each argument set is built here, once, for both backends, as a
``_C.AccumulateArgs`` / ``_C.SelectArgs`` / ``_C.MaskedParam`` whose constructor takes keywords
only -- the field names of the C++ structs in csrc/include/neuslice/ -- so no two integers can
trade places unnoticed. ``AccumulateArgs``, built on every accumulate_ call, is made from a dict
keyed by those names too, read into one tuple in the C++ side's own field order
(``AccumulateArgs.FIELDS``) by ``operator.itemgetter``: no position is written by hand. Layout facts (which dim is which logical axis) come from :mod:`._layout`.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch  # noqa: F401  (before _C: torch's libgomp then serves the kernels too)

from .. import _C
from ._layout import accumulate_layout, per_neuron_mask, rows_cols

__all__ = ["DTYPE_CODES", "ptr", "accumulate_args", "select_args", "scores_for_kernel", "masked_param"]

# neuslice::DType (csrc/include/neuslice/common.h)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


# The values of a dict keyed by AccumulateArgs' field names, as the tuple AccumulateArgs.from_fields takes.
_ACC_FIELDS = operator.itemgetter(*_C.AccumulateArgs.FIELDS)


def ptr(t: Optional[torch.Tensor]) -> int:
    """The data pointer the kernels read (0 = absent)."""
    return 0 if t is None else t.data_ptr()


def accumulate_args(x, grad, ref, labels, channels_last, stats: Sequence[Optional[torch.Tensor]],
                    valid: Optional[torch.Tensor] = None, ignore_index: int = -100):
    """``_C.AccumulateArgs`` of one ``accumulate_`` call; ``stats`` = (count, act_sum, act_sq,
    taylor_sum, deeplift_sum), each sum possibly None (a null pointer: not kept). ``ref`` (shared
    ``[N, S]`` / ``[N]``, or per sample with x's shape) and ``valid`` (bool [B, S], any strides) are
    read where they lie, so a caller that re-lays one out keeps the copy alive until the kernels
    have run.

    Built on every call of the cpu backend, so with few Python operations: the layout in one call
    (:func:`._layout.accumulate_layout`) and the fields as one tuple in ``FIELDS`` order (from a cold cache
    36 us against 79 us for the 31 keywords through pybind11, which makes a string per keyword name)."""
    b, n, s, (x_sb, x_sn, x_ss), (g_sb, g_sn, g_ss), (r_sb, r_sn, r_ss) = accumulate_layout(
        x, grad, ref, channels_last)
    per_token = labels.dim() == 2
    l_st = labels.stride()
    count, act_sum, act_sq, taylor_sum, deeplift_sum = stats
    v_st = (0, 0) if valid is None else valid.stride()
    return _C.AccumulateArgs.from_fields(_ACC_FIELDS({
        "x": x.data_ptr(), "g": 0 if grad is None else grad.data_ptr(), "r": 0 if ref is None else ref.data_ptr(),
        "labels": labels.data_ptr(), "dtype": DTYPE_CODES[x.dtype],
        "B": b, "N": n, "S": s, "K": count.shape[0], "channels_last": bool(channels_last), "per_token": per_token,
        "x_sb": x_sb, "x_sn": x_sn, "x_ss": x_ss, "g_sb": g_sb, "g_sn": g_sn, "g_ss": g_ss,
        "r_sb": r_sb, "r_sn": r_sn, "r_ss": r_ss, "l_sb": l_st[0], "l_ss": l_st[1] if per_token else 0,
        "count": count.data_ptr(), "act_sum": 0 if act_sum is None else act_sum.data_ptr(),
        "act_sq": 0 if act_sq is None else act_sq.data_ptr(),
        "taylor_sum": 0 if taylor_sum is None else taylor_sum.data_ptr(),
        "deeplift_sum": 0 if deeplift_sum is None else deeplift_sum.data_ptr(),
        "valid": 0 if valid is None else valid.data_ptr(), "v_sb": v_st[0], "v_ss": v_st[1],
        "ignore_index": int(ignore_index)}))


def scores_for_kernel(scores: torch.Tensor) -> torch.Tensor:
    """Scores in a dtype the select kernels read: f16/bf16 are upcast exactly to float32 (a [R, N]
    copy, small beside the activations)."""
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def select_args(scores: torch.Tensor, out: torch.Tensor):
    """``_C.SelectArgs``: ``scores`` [R, N] (from :func:`scores_for_kernel`, any strides) into the
    contiguous bool ``out``."""
    return _C.SelectArgs(scores=ptr(scores), dtype=DTYPE_CODES[scores.dtype], R=scores.shape[0],
                         N=scores.shape[1], s_r=scores.stride(0), s_n=scores.stride(1), out=ptr(out))


def masked_param(param: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor):
    """``_C.MaskedParam``: contiguous param and grad seen as [rows, cols], mask per neuron or per weight."""
    rows, cols = rows_cols(param)
    return _C.MaskedParam(param=ptr(param), grad=ptr(grad), mask=ptr(mask), dtype=DTYPE_CODES[param.dtype],
                          rows=rows, cols=cols, per_row=per_neuron_mask(mask, param))
