"""masked_sgd_ / masked_adamw_ on Triton: one fused optimizer step over param, grad and state.

Shapes: param ``[rows, ...]`` (float32, float16 or bfloat16), grad and state like param (any strides;
param and state must be viewable as ``[rows, cols]``, which every parameter and ``zeros_like`` state
is); mask bool ``[rows]`` (per neuron) or ``param.shape`` (per weight), True = trainable.

One pass: each element of param, grad and state is loaded once, upcast to float32, updated, rounded
once to the storage dtype and stored back -- only where the mask is True. Frozen entries are never
written, so they (and their optimizer state) stay bit-identical, whatever the arithmetic. A
per-neuron mask is the per-weight one with column stride 0: both read ``mask[r * sm_r + c * sm_c]``.
Arithmetic follows torch.optim's single-tensor formulas (lerp for exp_avg, addcmul, sqrt / sqrt(bc2)
+ eps, addcdiv) with IEEE sqrt and division (``sqrt_rn``, ``div_rn``), so float32 results match
torch to a rounding or two (torch may fuse multiply-adds differently).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from neuslice.ops._layout import per_neuron_mask, rows_cols

__all__ = ["masked_sgd", "masked_adamw", "rows_view", "default_blocks"]


@triton.jit
def _tile(ROWS, COLS, COL_BLOCKS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    r = (pid // COL_BLOCKS).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (pid % COL_BLOCKS).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (r < ROWS)[:, None] & (c < COLS)[None, :]
    return r[:, None], c[None, :], valid


@triton.jit
def _trainable(p_ptr, g_ptr, mask_ptr, ROWS, COLS, COL_BLOCKS, sp_r, sp_c, sg_r, sg_c, sm_r, sm_c,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: offsets, the mask of trainable in-bounds entries, param and grad in float32."""
    r, c, valid = _tile(ROWS, COLS, COL_BLOCKS, BLOCK_R, BLOCK_C)
    m = valid & (tl.load(mask_ptr + r * sm_r + c * sm_c, mask=valid, other=0) != 0)
    p = tl.load(p_ptr + r * sp_r + c * sp_c, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r * sg_r + c * sg_c, mask=m, other=0.0).to(tl.float32)
    return r, c, m, p, g


@triton.jit
def _masked_sgd_kernel(p_ptr, g_ptr, buf_ptr, mask_ptr, ROWS, COLS, COL_BLOCKS,
                       sp_r, sp_c, sg_r, sg_c, sb_r, sb_c, sm_r, sm_c,
                       lr, momentum, weight_decay,
                       HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, c, m, p, d = _trainable(p_ptr, g_ptr, mask_ptr, ROWS, COLS, COL_BLOCKS, sp_r, sp_c, sg_r, sg_c, sm_r, sm_c,
                               BLOCK_R, BLOCK_C)
    if HAS_WD:
        d = d + weight_decay * p
    if HAS_MOMENTUM:
        b_off = r * sb_r + c * sb_c
        buf = tl.load(buf_ptr + b_off, mask=m, other=0.0).to(tl.float32) * momentum + d
        tl.store(buf_ptr + b_off, buf.to(buf_ptr.dtype.element_ty), mask=m)
        d = buf
    p = p - lr * d
    tl.store(p_ptr + r * sp_r + c * sp_c, p.to(p_ptr.dtype.element_ty), mask=m)


@triton.jit
def _masked_adamw_kernel(p_ptr, g_ptr, m1_ptr, m2_ptr, mask_ptr, ROWS, COLS, COL_BLOCKS,
                         sp_r, sp_c, sg_r, sg_c, s1_r, s1_c, s2_r, s2_c, sm_r, sm_c,
                         decay, w1, beta2, one_m_beta2, eps, step_size, bc2_sqrt,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, c, m, p, g = _trainable(p_ptr, g_ptr, mask_ptr, ROWS, COLS, COL_BLOCKS, sp_r, sp_c, sg_r, sg_c, sm_r, sm_c,
                               BLOCK_R, BLOCK_C)
    o1 = r * s1_r + c * s1_c
    o2 = r * s2_r + c * s2_c
    ea = tl.load(m1_ptr + o1, mask=m, other=0.0).to(tl.float32)
    eas = tl.load(m2_ptr + o2, mask=m, other=0.0).to(tl.float32)
    p = p * decay                                             # 1 - lr * weight_decay
    diff = g - ea
    ea = tl.where(w1 < 0.5, ea + w1 * diff, g - diff * (1.0 - w1))   # torch.lerp(exp_avg, g, 1 - beta1)
    eas = eas * beta2 + one_m_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(eas), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(ea, denom)
    tl.store(p_ptr + r * sp_r + c * sp_c, p.to(p_ptr.dtype.element_ty), mask=m)
    tl.store(m1_ptr + o1, ea.to(m1_ptr.dtype.element_ty), mask=m)
    tl.store(m2_ptr + o2, eas.to(m2_ptr.dtype.element_ty), mask=m)


def rows_view(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(row stride, column stride) of ``t`` seen as ``[shape[0], numel / shape[0]]`` without a copy,
    or None when its trailing dims do not collapse (then an in-place update cannot use strides)."""
    if t.dim() == 1:
        return (t.stride(0), 0)
    try:
        v = t.view(t.shape[0], -1)
    except RuntimeError:
        return None
    return (v.stride(0), v.stride(1))


def _read_view(t: torch.Tensor, rows: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """A read-only operand as [rows, cols] strides; copies only when its dims do not collapse."""
    st = rows_view(t)
    if st is None:
        t = t.reshape(rows, -1).contiguous()
        st = (t.stride(0), t.stride(1))
    return t, st


def default_blocks(cols: int) -> Tuple[int, int]:
    """Tiles of 1024 elements (whole rows of up to 1024 columns, several rows for narrow params) at
    4 warps: 96 registers per thread for AdamW on sm_90 (int64 offsets for five tensors); 2048-element
    tiles took 199."""
    bc = min(triton.next_power_of_2(max(1, cols)), 1024)
    return max(1, 1024 // bc), bc


def _launch_geometry(param: torch.Tensor, mask: torch.Tensor, blocks):
    rows, cols = rows_cols(param)
    br, bc = blocks or default_blocks(cols)
    if per_neuron_mask(mask, param):                           # column stride 0
        sm = (mask.stride(0), 0)
    else:
        mask, sm = _read_view(mask, rows)
    col_blocks = triton.cdiv(cols, bc)
    grid = (triton.cdiv(rows, br) * col_blocks,)
    return rows, cols, col_blocks, grid, mask, sm, br, bc


def masked_sgd(param, grad, momentum_buf, mask, lr, momentum, weight_decay, *, blocks=None) -> None:
    """torch.optim.SGD (dampening 0) on the trainable entries, in place."""
    if param.numel() == 0:
        return
    rows, cols, col_blocks, grid, mask, sm, br, bc = _launch_geometry(param, mask, blocks)
    grad, sg = _read_view(grad, rows)
    has_m = momentum != 0
    sb = rows_view(momentum_buf) if has_m else (0, 0)
    _masked_sgd_kernel[grid](param, grad, momentum_buf, mask.view(torch.uint8), rows, cols, col_blocks,
                             *rows_view(param), *sg, *sb, *sm, float(lr), float(momentum), float(weight_decay),
                             HAS_WD=weight_decay != 0, HAS_MOMENTUM=has_m, BLOCK_R=br, BLOCK_C=bc)


def masked_adamw(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step,
                 *, blocks=None) -> None:
    """torch.optim.AdamW (no amsgrad) on the trainable entries, in place; ``step`` counts this update."""
    if param.numel() == 0:
        return
    rows, cols, col_blocks, grid, mask, sm, br, bc = _launch_geometry(param, mask, blocks)
    grad, sg = _read_view(grad, rows)
    # Scalars in float64 on the host, then float32 kernel arguments, as torch computes them.
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    _masked_adamw_kernel[grid](param, grad, exp_avg, exp_avg_sq, mask.view(torch.uint8), rows, cols, col_blocks,
                               *rows_view(param), *sg, *rows_view(exp_avg), *rows_view(exp_avg_sq), *sm,
                               1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, step_size, bc2_sqrt,
                               BLOCK_R=br, BLOCK_C=bc)
