"""accumulate_ on Triton: the per-class statistics of one layer (docs/method.md) in one pass over x (and grad).

Shapes (as in :func:`neuslice.ops.accumulate_`): x, grad ``[B, N, S]`` or, channels-last, ``[B, S, N]``
(``[B, N]`` means S = 1), any strides; ref ``[N, S]`` or ``[N]`` (shared), or per sample with x's shape
(any strides; read through a batch stride, 0 when shared); labels int64 ``[B]`` or, per token,
``[B, S]``; statistics float32 ``[K]`` / ``[K, N]``, contiguous.

A *unit* is what one label counts: a sample (its S positions are averaged) or, with per-token labels,
a token (one position). For every unit the kernel reduces its positions in registers (sum x, sum x*g,
sum (x-r)*g, float32), takes the per-unit mean, square and absolute values, and adds them into the
unit's class -- without materialising ``x*g`` or any ``[B, N]`` intermediate.

Positions and units that do not count (issue 13; the definitions are ``neuslice.ops.accumulate_``'s):
    ``valid`` (bool ``[B, S]``, any strides, read in place as bytes) masks the loads of x, grad and
    ref, so an invalid position is never read (a NaN there reaches nothing); a sample's mean divides
    by its number of valid positions ``|V_b|`` (one ``valid.sum(1)`` on the device, read once per
    unit). Units that are skipped -- label ``ignore_index``; per sample no valid position; per token
    ``valid[b, s]`` False -- get the sort key K, so they follow every counted unit; the number of
    counted units is read by the kernel from the device (no host sync), and units past it are never
    read. Their segment (label K) is never committed. Per token, ``valid`` is only used to skip
    tokens (a token is one position).
Statistics not kept (None): constexpr flags; they get no staging plane and are never stored.
    x-bar^2 (and |taylor|, |deeplift| whenever grad is given) are still reduced in registers, since
    the non-finite check below runs on them whatever is kept (as the reference checks).

Class sums: label-sorted segmented reduction, atomics only per segment flush.
    Units are visited in label order (``torch.sort(labels, stable=True)`` on the device: B or B*S
    int64 keys, ~0.1% of the bytes of x at the benchmark shapes). Each program owns a contiguous run
    of sorted units and a block of neurons; it sums consecutive units of one class in registers and
    flushes the run's partial sums with one float32 ``atomic_add`` per (segment, neuron) when the
    class changes or the run ends. The two pure alternatives were reasoned, not measured (no GPU was
    available when this was written; ``bench/gpu_check.py`` measures the result):
    - atomics per unit: B*N*4 atomic adds into the same K rows. At the large-model shape with
      per-token labels that is 32768 * 14336 * 4 = 1.9e9 atomics on <= K hot rows, i.e. contention
      serialising on a few L2 lines -- far above the 1.9 GB read of x and grad;
    - a fully deterministic segmented reduction (one program per class) needs the per-class
      offsets on the host (one sync) and leaves most SMs idle when one class dominates a batch.
    The hybrid does at most (#chunks + #classes) flushes per neuron block, so atomic traffic is a
    small fraction of the read, and the order of classes in the batch changes only where the
    chunk boundaries fall: results differ by float32 rounding at most (sorting is stable, so the
    units of a class are always summed in sample order).

Non-finite input: detected in the same pass without extra per-element work. A non-finite x or g
makes the unit's float32 sums non-finite (inf, or nan: 0 * inf = nan); the per-unit values added
per class (x-bar^2, |taylor|, |deeplift|) are >= 0, so the segment's sum stays non-finite and is
tested once per flush. (A finite batch whose class sum of x-bar^2 overflows float32 is rejected
too; the reference would add inf there.) Flags go to a device status word.
Commit only if clean: the pass adds into a zeroed staging buffer ``[nq, D, N]`` (nq = the statistics
kept, D = min(K + 1, units): one row per label segment, + 1 for the skipped units); a second tiny
kernel adds staging into the statistics only when the status word is 0, so a rejected batch changes
nothing. The host reads the status once (one sync
per call, needed to raise the error).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from neuslice._errors import STATUS_NONFINITE_G, STATUS_NONFINITE_X
from neuslice.ops._layout import bns, ref_strides_bns, strides_bns

__all__ = ["accumulate", "default_config", "STATUS_NONFINITE_X", "STATUS_NONFINITE_G"]

_F32_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite float32


@triton.jit
def _unit_sums(x_ptr, g_ptr, r_ptr, v_ptr, nv_ptr, b, s0, mask_t, offs_n, mask_n, S_UNIT,
               sxb, sxs, sxn, sgb, sgs, sgn, srb, srn, srs, svb, svs,
               HAS_GRAD: tl.constexpr, HAS_REF: tl.constexpr, HAS_VALID: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per unit of the tile: x-bar (the mean over its valid positions), sum_s x*g, sum_s (x-r)*g over
    them; [T, N] fp32. Accumulated elementwise over the position loop and reduced once (no cross-warp
    reduction per step). A position with valid False is never loaded (masked loads), so a NaN there
    reaches nothing. The mask is loaded in the tile's own [T, S, N] layout (stride 0 along n): a
    [T, S] load broadcast afterwards needs a layout conversion (169 vs 158 registers, sm_90)."""
    ax = tl.zeros([BLOCK_T, BLOCK_S, BLOCK_N], tl.float32)
    axg = tl.zeros([BLOCK_T, BLOCK_S, BLOCK_N], tl.float32)
    adg = tl.zeros([BLOCK_T, BLOCK_S, BLOCK_N], tl.float32)
    for s_start in range(0, S_UNIT, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S)
        pos = s0[:, None] + offs_s[None, :]                                   # [T, S] int64
        m = (mask_t[:, None] & (offs_s < S_UNIT)[None, :])[:, :, None] & mask_n[None, None, :]
        if HAS_VALID:   # loaded in the tile's own layout (stride 0 along n): a broadcast read, no shuffle
            vo = (b * svb)[:, None, None] + (pos * svs)[:, :, None] + (offs_n * 0)[None, None, :]
            m = m & (tl.load(v_ptr + vo, mask=m, other=0) != 0)
        xo = (b * sxb)[:, None, None] + (pos * sxs)[:, :, None] + (offs_n * sxn)[None, None, :]
        xv = tl.load(x_ptr + xo, mask=m, other=0.0).to(tl.float32)
        ax += xv
        if HAS_GRAD:
            go = (b * sgb)[:, None, None] + (pos * sgs)[:, :, None] + (offs_n * sgn)[None, None, :]
            gv = tl.load(g_ptr + go, mask=m, other=0.0).to(tl.float32)
            axg += xv * gv
            if HAS_REF:
                ro = (b * srb)[:, None, None] + (pos * srs)[:, :, None] + (offs_n * srn)[None, None, :]
                rv = tl.load(r_ptr + ro, mask=m, other=0.0).to(tl.float32)
                adg += (xv - rv) * gv
    sxg = tl.sum(axg, axis=1)
    sdg = tl.sum(adg, axis=1) if HAS_REF else sxg
    if HAS_VALID:
        nv = tl.load(nv_ptr + b, mask=mask_t, other=1).to(tl.float32)   # |V_b| >= 1 for a counted unit
    else:
        nv = tl.zeros([BLOCK_T], tl.float32) + S_UNIT
    return tl.sum(ax, axis=1) / nv[:, None], sxg, sdg


@triton.jit
def _flush(stage_ptr, cnt_ptr, seg, N, PLANE, offs_n, mask_n, ax, aq, at, ad, ac, count_here,
           HAS_GRAD: tl.constexpr, KEEP_SUM: tl.constexpr, KEEP_SQ: tl.constexpr, KEEP_TAYLOR: tl.constexpr,
           KEEP_DL: tl.constexpr):
    """Add one segment's partial sums ([T, N] accumulators, reduced here) into its staging rows with
    float32 atomics (one plane per kept statistic, in the order sum, sq, taylor, deeplift); return the
    non-finite flags. The per-unit values summed are x-bar^2, |taylor|, |deeplift| >= 0, so a
    non-finite unit leaves its segment's sum non-finite (no inf - inf); they are reduced for the check
    whether or not their statistic is kept (registers only; a statistic not kept is never stored)."""
    sq = tl.sum(aq, axis=0)
    row = seg.to(tl.int64) * N + offs_n
    if KEEP_SUM:
        tl.atomic_add(stage_ptr + row, tl.sum(ax, axis=0), mask=mask_n)
        row = row + PLANE
    if KEEP_SQ:
        tl.atomic_add(stage_ptr + row, sq, mask=mask_n)
        row = row + PLANE
    tl.atomic_add(cnt_ptr + seg, tl.sum(ac, axis=0), mask=count_here)
    bad = tl.max((mask_n & ~(sq <= _F32_MAX)).to(tl.int32), axis=0)          # nan fails <= too
    if HAS_GRAD:
        st = tl.sum(at, axis=0)
        sd = tl.sum(ad, axis=0)
        if KEEP_TAYLOR:
            tl.atomic_add(stage_ptr + row, st, mask=mask_n)
            row = row + PLANE
        if KEEP_DL:
            tl.atomic_add(stage_ptr + row, sd, mask=mask_n)
        bad = bad | (tl.max((mask_n & ~((st <= _F32_MAX) & (sd <= _F32_MAX))).to(tl.int32), axis=0) * 2)
    return bad


@triton.jit
def _segment_add(stage_ptr, cnt_ptr, segs, mask_t, xbar, sxg, sdg, ax, aq, at, ad, ac, cur, bad,
                 N, PLANE, offs_n, mask_n, count_here, HAS_GRAD: tl.constexpr, KEEP_SUM: tl.constexpr,
                 KEEP_SQ: tl.constexpr, KEEP_TAYLOR: tl.constexpr, KEEP_DL: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add a tile's per-unit values to the running segment; flush it whenever the segment changes.
    Labels are sorted, so the tile's units hold consecutive segment ids lo..hi (usually one).
    x-bar^2 is always summed (the non-finite check of x), |taylor| and |deeplift| whenever grad is
    read (the check of grad); x-bar only when act_sum is kept."""
    lo = tl.min(tl.where(mask_t, segs, 2147483647), axis=0)
    hi = tl.max(tl.where(mask_t, segs, -1), axis=0)
    for k in range(lo, hi + 1):
        if k != cur:
            bad = bad | _flush(stage_ptr, cnt_ptr, cur, N, PLANE, offs_n, mask_n, ax, aq, at, ad, ac,
                               count_here, HAS_GRAD, KEEP_SUM, KEEP_SQ, KEEP_TAYLOR, KEEP_DL)
            ax = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
            aq = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
            at = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
            ad = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
            ac = tl.zeros([BLOCK_T], tl.float32)
            cur = k
        sel = (segs == k) & mask_t
        selm = sel[:, None]
        if KEEP_SUM:
            ax += tl.where(selm, xbar, 0.0)
        aq += tl.where(selm, xbar * xbar, 0.0)
        if HAS_GRAD:
            at += tl.where(selm, tl.abs(sxg), 0.0)
            ad += tl.where(selm, tl.abs(sdg), 0.0)
        ac += sel.to(tl.float32)
    return ax, aq, at, ad, ac, cur, bad


@triton.jit
def _accumulate_kernel(x_ptr, g_ptr, r_ptr, v_ptr, nv_ptr, order_ptr, seg_ptr, kept_ptr, stage_ptr, cnt_ptr, status_ptr,
                       U, N, S, S_UNIT, PLANE, CHUNK, N_BLOCKS,
                       sxb, sxs, sxn, sgb, sgs, sgn, srb, srn, srs, svb, svs,
                       PER_TOKEN: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_REF: tl.constexpr,
                       HAS_VALID: tl.constexpr, KEEP_SUM: tl.constexpr, KEEP_SQ: tl.constexpr,
                       KEEP_TAYLOR: tl.constexpr, KEEP_DL: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sorted units [0, kept) are counted; the rest (ignored labels, no valid position) come last and
    are never read: ``kept`` is read from the device, so the grid needs no host sync."""
    pid = tl.program_id(0)
    pid_n = pid % N_BLOCKS
    start = (pid // N_BLOCKS) * CHUNK
    end = tl.minimum(start + CHUNK, tl.load(kept_ptr))
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cur = tl.load(seg_ptr + start, mask=start < U, other=0)    # the grid makes start < U
    ax = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)             # segment accumulators, reduced at flush
    aq = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    at = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    ad = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    ac = tl.zeros([BLOCK_T], tl.float32)
    bad = tl.sum(tl.zeros([BLOCK_T], tl.int32), axis=0)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask_t = rows < end
        unit = tl.load(order_ptr + rows, mask=mask_t, other=0)
        segs = tl.load(seg_ptr + rows, mask=mask_t, other=0)
        if PER_TOKEN:
            b = unit // S
            s0 = unit % S
        else:
            b = unit
            s0 = unit * 0
        xbar, sxg, sdg = _unit_sums(x_ptr, g_ptr, r_ptr, v_ptr, nv_ptr, b, s0, mask_t, offs_n, mask_n, S_UNIT,
                                    sxb, sxs, sxn, sgb, sgs, sgn, srb, srn, srs, svb, svs,
                                    HAS_GRAD, HAS_REF, HAS_VALID, BLOCK_T, BLOCK_S, BLOCK_N)
        ax, aq, at, ad, ac, cur, bad = _segment_add(stage_ptr, cnt_ptr, segs, mask_t, xbar, sxg, sdg,
                                                    ax, aq, at, ad, ac, cur, bad, N, PLANE, offs_n, mask_n,
                                                    pid_n == 0, HAS_GRAD, KEEP_SUM, KEEP_SQ, KEEP_TAYLOR,
                                                    KEEP_DL, BLOCK_T, BLOCK_N)
    if start < end:                                           # a chunk of skipped units adds nothing
        bad = bad | _flush(stage_ptr, cnt_ptr, cur, N, PLANE, offs_n, mask_n, ax, aq, at, ad, ac, pid_n == 0,
                           HAS_GRAD, KEEP_SUM, KEEP_SQ, KEEP_TAYLOR, KEEP_DL)
    tl.atomic_or(status_ptr, bad, mask=bad != 0)


@triton.jit
def _commit_kernel(stage_ptr, cnt_ptr, label_ptr, status_ptr, count_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr,
                   N, D, K, PLANE, N_BLOCKS, KEEP_SUM: tl.constexpr, KEEP_SQ: tl.constexpr,
                   KEEP_TAYLOR: tl.constexpr, KEEP_DL: tl.constexpr, BLOCK_N: tl.constexpr):
    """statistics[label[j]] += staging[j] for every segment j of a class in [0, K), only if the status
    word is 0 (the segment of skipped units has label K, unused rows -1: both are left alone).
    Staging holds one plane per kept statistic; a statistic not kept (its pointer a placeholder) is
    neither read nor written."""
    pid = tl.program_id(0)
    j = pid // N_BLOCKS
    pid_n = pid % N_BLOCKS
    lab = tl.load(label_ptr + j, mask=j < D, other=-1)         # the grid makes j < D
    ok = (tl.load(status_ptr) == 0) & (lab >= 0) & (lab < K)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (offs_n < N) & ok
    src = j.to(tl.int64) * N + offs_n
    dst = lab * N + offs_n
    if KEEP_SUM:
        tl.store(s0_ptr + dst, tl.load(s0_ptr + dst, mask=m) + tl.load(stage_ptr + src, mask=m), mask=m)
        src = src + PLANE
    if KEEP_SQ:
        tl.store(s1_ptr + dst, tl.load(s1_ptr + dst, mask=m) + tl.load(stage_ptr + src, mask=m), mask=m)
        src = src + PLANE
    if KEEP_TAYLOR:
        tl.store(s2_ptr + dst, tl.load(s2_ptr + dst, mask=m) + tl.load(stage_ptr + src, mask=m), mask=m)
        src = src + PLANE
    if KEEP_DL:
        tl.store(s3_ptr + dst, tl.load(s3_ptr + dst, mask=m) + tl.load(stage_ptr + src, mask=m), mask=m)
    mc = ok & (pid_n == 0)
    tl.store(count_ptr + lab, tl.load(count_ptr + lab, mask=mc) + tl.load(cnt_ptr + j, mask=mc), mask=mc)


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(1, int(v)))


def default_config(units: int, n: int, s_unit: int, interpret: bool, sm_count: int = 132) -> dict:
    """Block sizes, units per program (CHUNK) and warps.

    GPU: a unit's positions cannot be split across programs (the absolute value is taken after the
    full sum), so parallelism comes from neuron blocks x chunks of units: BLOCK_N shrinks (to 32)
    until there are >= 4 programs per SM. Tiles: [1, BLOCK_S, BLOCK_N] of 4096 elements per sample
    (S > 1), [16, 1, 128] tokens otherwise, 8 warps. Register counts from an sm_90 compile
    (cuobjdump, no GPU run): 128 (98 without ref) per thread per sample, 234 per token, no spills;
    4 warps spilled in the token case (255 + 152 bytes of stack). With a valid mask, per sample at the
    transformer shape: 158 (tests/triton_aot.py, ptxas -v; a .maxnreg of 128 compiles without spills,
    whether it is faster is for bench/gpu_check.py to say). Interpreter: as few programs as
    possible (each costs ~1 ms).
    """
    if interpret:
        bn = min(_pow2(n), 256)
        bs = min(_pow2(s_unit), 64)
        bt = min(_pow2(units), max(1, 8192 // (bs * bn)))
        return dict(BLOCK_N=bn, BLOCK_S=bs, BLOCK_T=bt, CHUNK=max(units, 1), num_warps=4)
    bn = min(_pow2(n), 128)
    while bn > 32 and triton.cdiv(n, bn) * units < 4 * sm_count:
        bn //= 2
    if s_unit <= 1:
        bs, bt = 1, min(_pow2(units), 16)
    else:
        bs = min(_pow2(s_unit), 4096 // bn)
        bt = min(_pow2(units), max(1, 4096 // (bs * bn)))
    chunks = max(1, min(triton.cdiv(units, bt), triton.cdiv(4 * sm_count, triton.cdiv(n, bn))))
    chunk = triton.cdiv(triton.cdiv(units, chunks), bt) * bt
    return dict(BLOCK_N=bn, BLOCK_S=bs, BLOCK_T=bt, CHUNK=chunk, num_warps=8)


def _strides_bsn(t: torch.Tensor, channels_last: bool):
    """Element strides in the kernel's argument order (b, s, n)."""
    sb, sn, ss = strides_bns(t, channels_last)
    return sb, ss, sn


_INT64 = (-2**63, 2**63)


def _segments(labels: torch.Tensor, k: int, valid: Optional[torch.Tensor], ignore_index: int,
              in_range: bool = False):
    """Units in sorted label order, counted ones first: the order, each sorted unit's segment id (int32),
    the label of each segment (-1: unused; K: the segment of skipped units) and the number of counted
    units (int32 ``[1]``, on the device: no host sync).

    A unit is skipped when its label is ``ignore_index``, and with ``valid`` when it has no valid
    position (per sample: ``valid[b]`` all False; per token: ``valid[b, s]`` False). Skipped units get
    the key K, so the stable sort puts them after every counted unit (labels lie in [0, K))."""
    flat = labels.reshape(-1)
    keep = None
    if _INT64[0] <= ignore_index < _INT64[1]:  # (no int64 label equals one outside that range)
        keep = flat != ignore_index
    if in_range:   # labels not checked beforehand (a deferred status): one outside [0, K) is a skipped unit
        ok = (flat >= 0) & (flat < k)
        keep = ok if keep is None else keep & ok
    if valid is not None:
        vk = valid.reshape(-1) if labels.dim() == 2 else valid.any(1)
        keep = vk if keep is None else keep & vk
    keys = flat if keep is None else torch.where(keep, flat, k)
    kept = (torch.full((1,), flat.numel(), dtype=torch.int32, device=flat.device) if keep is None
            else keep.sum(dtype=torch.int32).reshape(1))
    keys, order = torch.sort(keys, stable=True)
    new = torch.ones_like(keys, dtype=torch.bool)
    new[1:] = keys[1:] != keys[:-1]
    seg = torch.cumsum(new, 0) - 1
    d = min(k + (keep is not None), flat.numel())   # <= K class segments, + 1 for the skipped units
    seg_label = torch.full((d,), -1, dtype=torch.int64, device=labels.device).scatter_(0, seg, keys)
    return order, seg.to(torch.int32), seg_label, kept


def accumulate(x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum, deeplift_sum,
               valid=None, ignore_index=-100, *, interpret: bool = False,
               config: Optional[dict] = None, status: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Launch the pass and the commit; return the int32 status word ``[1]`` (0 = committed), or None
    when there was nothing to add. Statistics must be contiguous; each of the four sums may be None
    (not kept: not staged, not written). ``config`` overrides the blocks. ``status``: the caller's status
    word (int32, one element) instead of a fresh one; its labels have not been checked, so labels outside
    [0, K) are skipped like ignore_index (the caller flags them)."""
    b, n, s = bns(x, channels_last)
    per_token = labels.dim() == 2
    units, s_unit = (b * s, 1) if per_token else (b, s)
    if units == 0:
        return None
    k = count.shape[0]
    # grad is read only for a kept gradient statistic, ref only for deeplift (as the reference reads them)
    has_grad = grad is not None and (taylor_sum is not None or deeplift_sum is not None)
    has_ref = has_grad and ref is not None and deeplift_sum is not None
    has_valid = valid is not None and not per_token       # per token, valid only decides which units count
    keeps = (act_sum is not None, act_sq is not None, has_grad and taylor_sum is not None,
             has_grad and deeplift_sum is not None)
    order, seg, seg_label, kept = _segments(labels, k, valid, ignore_index, in_range=status is not None)
    d = seg_label.shape[0]
    nq = sum(keeps)
    # staging [nq, D, N] (one plane per kept statistic), per-segment counts [D] and the status word:
    # one zero-fill, one allocation.
    scratch = torch.zeros((nq * d * n + d + 1,), dtype=torch.float32, device=x.device)
    stage, cnt = scratch[:nq * d * n], scratch[nq * d * n:nq * d * n + d]
    status = scratch[-1:].view(torch.int32) if status is None else status.reshape(1)
    sms = 132 if interpret else torch.cuda.get_device_properties(x.device).multi_processor_count
    cfg = dict(default_config(units, n, s_unit, interpret, sms), **(config or {}))
    n_blocks = max(1, triton.cdiv(n, cfg["BLOCK_N"]))
    g = grad if has_grad else x
    r = ref if has_ref else x
    rs = ref_strides_bns(ref if has_ref else None, x, channels_last)   # (b, n, s); b stride 0: shared
    v = valid.view(torch.uint8) if has_valid else x        # bool read as bytes, in place, any strides
    vs = (v.stride(0), v.stride(1)) if has_valid else (0, 0)
    nv = valid.sum(1, dtype=torch.int32) if has_valid else kept     # |V_b|, the divisor of the mean
    grid = (n_blocks * triton.cdiv(units, cfg["CHUNK"]),)
    flags = dict(KEEP_SUM=keeps[0], KEEP_SQ=keeps[1], KEEP_TAYLOR=keeps[2], KEEP_DL=keeps[3])
    _accumulate_kernel[grid](
        x, g, r, v, nv, order, seg, kept, stage, cnt, status, units, n, s, s_unit, d * n, cfg["CHUNK"], n_blocks,
        *_strides_bsn(x, channels_last), *_strides_bsn(g, channels_last), *rs, *vs,
        PER_TOKEN=per_token, HAS_GRAD=has_grad, HAS_REF=has_ref, HAS_VALID=has_valid, **flags,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_S=cfg["BLOCK_S"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    outs = [t if t is not None and keep else count for t, keep in zip((act_sum, act_sq, taylor_sum, deeplift_sum),
                                                                        keeps)]
    _commit_kernel[(d * n_blocks,)](
        stage, cnt, seg_label, status, count, *outs, n, d, k, d * n, n_blocks, **flags, BLOCK_N=cfg["BLOCK_N"])
    return status
