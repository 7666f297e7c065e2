"""select / select_topk on Triton: per-row critical sets, one program per row, no host round trip.

Shapes: scores ``[R, N]`` (float32, float16 or bfloat16, any strides; finite, >= 0 -- checked by
:mod:`neuslice.ops`); output bool ``[R, N]``.

Bisect, not tile-sort. For non-negative floats the IEEE bit pattern read as int32 is monotone in
the value, so the row's boundary value v* (the k-th largest for top-k; for cumulative-Θ the
largest value whose ">= v" sum still reaches Θ × total) is found by integer bisection over
[0, bits(+inf)): 31 steps, each one count (top-k) or one sum (Θ) over the row. The bisection ends on
a value present in the row, so the result is exact, independent of block sizes, and ties are then
taken in index order by a prefix sum over the elements equal to v* -- the docs/method.md §4 tie rule
("lower index first") without sorting. A tiled sort would need Triton's in-register bitonic sort
(power-of-two blocks that fit in registers: a few thousand elements) plus a merge of tiles through
global memory for rows of 65,536 neurons; bisection needs only reductions, so any N works: when
the row fits in one block (N <= BLOCK, 4096 by default) it is loaded once and bisected in
registers, else each step streams the row tile by tile (from L2 after the first pass).
Cost: ~33 reductions over N per row, compute-bound in registers for N <= 4096.

Θ sums are taken in float64, like the reference's cumsum. A float64 sum of N float32 values is exact
when the values span less than 2^(29 - log2 N) in magnitude, so the set then matches the reference
bit for bit, whatever the summation order; elsewhere it can differ only where Θ × total falls
within float64 rounding of a prefix sum.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from neuslice.ops.reference import topk_count

__all__ = ["select", "default_block"]

_INF_BITS = tl.constexpr(0x7F800000)  # bits of +inf: above every finite non-negative float32


@triton.jit
def _load_row(s_ptr, row_off, offs, N, s_n):
    """One tile of the row: (value as float64, int32 key; masked lanes get key -1 and value 0)."""
    m = offs < N
    v = tl.load(s_ptr + row_off + offs * s_n, mask=m, other=0.0).to(tl.float32)
    v = tl.where(v == 0.0, 0.0, v)                  # -0.0 -> +0.0: its bits would sort below 0
    key = tl.where(m, v.to(tl.int32, bitcast=True), -1)
    return v.to(tl.float64), key


@triton.jit
def _measure(v, key, b, TOPK: tl.constexpr):
    """Count (top-k) or float64 sum (Θ) of the tile's elements whose key is >= b."""
    ge = key >= b
    if TOPK:
        return tl.sum(ge.to(tl.float64), axis=0)
    return tl.sum(tl.where(ge, v, 0.0), axis=0)


@triton.jit
def _measure_row(s_ptr, row_off, N, s_n, b, TOPK: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float64)
    for t in range(0, N, BLOCK):
        offs = t + tl.arange(0, BLOCK).to(tl.int64)
        v, key = _load_row(s_ptr, row_off, offs, N, s_n)
        ge = key >= b
        if TOPK:
            acc += ge.to(tl.float64)
        else:
            acc += tl.where(ge, v, 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _select_kernel(s_ptr, out_ptr, target_ptr, N, s_r, s_n, o_r,
                   TOPK: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_off = row * s_r
    offs0 = tl.arange(0, BLOCK).to(tl.int64)
    v0, key0 = _load_row(s_ptr, row_off, offs0, N, s_n)      # the whole row when SINGLE
    if SINGLE:
        total = _measure(v0, key0, 0, False)
    else:
        total = _measure_row(s_ptr, row_off, N, s_n, 0, False, BLOCK)
    if TOPK:
        target = tl.load(target_ptr)                        # k, as float64
    else:
        target = tl.load(target_ptr) * total                # Θ × total, both float64
    lo = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)         # P(lo) holds: everything is >= 0
    hi = lo + _INF_BITS                                     # P(hi) fails: nothing is >= +inf
    for _ in range(31):                                     # hi - lo < 2^31 halves to 1
        mid = lo + (hi - lo) // 2
        if SINGLE:
            got = _measure(v0, key0, mid, TOPK)
        else:
            got = _measure_row(s_ptr, row_off, N, s_n, mid, TOPK, BLOCK)
        ok = got >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    # lo is v*'s key. Above it: always in; equal to it: in index order while the prefix is short.
    if SINGLE:
        above = _measure(v0, key0, lo + 1, TOPK)
    else:
        above = _measure_row(s_ptr, row_off, N, s_n, lo + 1, TOPK, BLOCK)
    live = (total > 0.0) | TOPK                             # Θ: an all-zero row selects nothing
    before = above
    for t in range(0, N, BLOCK):
        offs = t + offs0
        if SINGLE:
            v, key = v0, key0
        else:
            v, key = _load_row(s_ptr, row_off, offs, N, s_n)
        eq = key == lo
        if TOPK:
            w = eq.to(tl.float64)
        else:
            w = tl.where(eq, v, 0.0)
        prefix = before + tl.cumsum(w, axis=0) - w           # measure of everything ranked earlier
        take = (key > lo) | (eq & (prefix < target))
        tl.store(out_ptr + row * o_r + offs, tl.where(live, take.to(tl.int8), 0), mask=offs < N)
        before += tl.sum(w, axis=0)


def default_block(n: int, interpret: bool) -> int:
    """The whole row in one block up to 4096 neurons (sm_90 compile, 8 warps: 156 registers per
    thread, no spill; 8192 spilled: 255 + 56 bytes of stack); beyond, 4096-wide tiles streamed per
    bisection step. The interpreter prefers one big block (fewer numpy calls)."""
    return min(triton.next_power_of_2(max(1, n)), 65536 if interpret else 4096)


def select(scores: torch.Tensor, value: float, *, topk: bool, interpret: bool = False,
           block: Optional[int] = None) -> torch.Tensor:
    """Cumulative-Θ set (``topk=False``, value = Θ) or top ``ceil(value × N)`` (``topk=True``): bool [R, N]."""
    r, n = scores.shape
    out = torch.empty((r, n), dtype=torch.uint8, device=scores.device)
    if out.numel() == 0:
        return out.view(torch.bool)
    blk = block or default_block(n, interpret)
    # Θ travels as a float64 tensor (a float kernel argument would be rounded to float32); torch.full
    # launches a fill, no host-to-device copy and no sync.
    target = float(topk_count(value, n)) if topk else float(value)
    target_t = torch.full((1,), target, dtype=torch.float64, device=scores.device)
    _select_kernel[(r,)](scores, out, target_t, n, scores.stride(0), scores.stride(1), out.stride(0),
                         TOPK=topk, SINGLE=blk >= n, BLOCK=blk, num_warps=8 if blk >= 2048 else 4)
    return out.view(torch.bool)
