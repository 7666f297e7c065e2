"""Plain-torch implementation of every op: the specification in code.

It is the fallback on any device, the oracle every other backend is tested against, and the
baseline of the benchmarks. Argument checking happens in :mod:`neuslice.ops` before any backend
runs; these functions assume valid arguments (shapes, dtypes, label range).

Each function has the signature of its op in :mod:`neuslice.ops`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._errors import NONFINITE_G, NONFINITE_X, NonFiniteError
from ._layout import as_bns, broadcast_mask, ref_per_sample

__all__ = ["accumulate_", "select", "select_topk", "masked_sgd_", "masked_adamw_", "acc_dtype", "topk_count"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the statistics for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ref_bns(ref: Optional[torch.Tensor], x: torch.Tensor, channels_last: bool, n: int, s: int,
             dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The reference as ``[B, N, S]`` (per sample: x's shape) or ``[N, S]`` (shared: broadcasts over b)."""
    if ref is None:
        return None
    if ref_per_sample(ref, x):
        return as_bns(ref, channels_last).to(dtype)
    r = ref.to(dtype)
    return r.unsqueeze(-1).expand(n, s) if r.dim() == 1 else r


def accumulate_(x, grad, ref, labels, channels_last, count, act_sum, act_sq, taylor_sum, deeplift_sum,
                valid=None, ignore_index=-100):
    """The per-class statistics of one batch (docs/method.md §2); see :func:`neuslice.ops.accumulate_` for shapes.

    Positions where ``valid`` is False and samples (tokens, per-token) labelled ``ignore_index`` are
    never read; a sample without a valid position is not counted. A statistic given as None is not kept."""
    acc = acc_dtype(x.dtype)
    xf = as_bns(x, channels_last).to(acc)                      # [B, N, S]
    # grad is read only for the statistics that need it: none kept, none read (nor checked).
    gf = None if grad is None or (taylor_sum is None and deeplift_sum is None) else as_bns(grad, channels_last).to(acc)
    n, s = xf.shape[1], xf.shape[2]
    # ref only for a kept deeplift_sum (with grad): [B, N, S] per sample, else [N, S]
    r = None if gf is None or deeplift_sum is None else _ref_bns(ref, x, channels_last, n, s, acc)
    vm = valid
    if labels.dim() == 2:                                       # per token: each token a sample
        bs = labels.numel()                                     # B*S spelled out: -1 is ambiguous when N = 0
        xf = xf.permute(0, 2, 1).reshape(bs, n, 1)
        gf = None if gf is None else gf.permute(0, 2, 1).reshape(bs, n, 1)
        if r is not None:                                       # each token's own reference
            r = (r.permute(0, 2, 1) if r.dim() == 3 else r.t().reshape(1, s, n).expand(labels.shape[0], -1, -1))
            r = r.reshape(bs, n, 1)
        vm = None if vm is None else vm.reshape(bs, 1)
        labels = labels.reshape(-1)
    keep = labels != ignore_index
    if vm is not None:
        keep = keep & vm.any(1)
    if not bool(keep.all()):
        xf, labels = xf[keep], labels[keep]
        gf = None if gf is None else gf[keep]
        if r is not None and r.dim() == 3:                      # per sample or per token: each one's own ref
            r = r[keep]
        vm = None if vm is None else vm[keep]
    if vm is None:
        xbar = xf.mean(-1)
    else:                                                       # padding is never read, NaN included
        w = vm.unsqueeze(1)                                     # [B, 1, S]
        zero = torch.zeros((), dtype=acc, device=xf.device)
        xf = torch.where(w, xf, zero)
        gf = None if gf is None else torch.where(w, gf, zero)
        xbar = xf.sum(-1) / vm.sum(1, keepdim=True).to(acc)
    xsq = xbar * xbar
    if not (torch.isfinite(xf).all() and torch.isfinite(xsq).all()):
        raise NonFiniteError(f"neuslice.accumulate_: {NONFINITE_X}; no statistic was changed")
    taylor = deeplift = None
    if gf is not None:
        taylor = (xf * gf).sum(-1).abs()
        delta = xf if r is None else xf - r
        if vm is not None and r is not None:
            delta = torch.where(vm.unsqueeze(1), delta, torch.zeros((), dtype=acc, device=xf.device))
        deeplift = (delta * gf).sum(-1).abs()
        if not (torch.isfinite(gf).all() and torch.isfinite(taylor).all() and torch.isfinite(deeplift).all()):
            raise NonFiniteError(f"neuslice.accumulate_: {NONFINITE_G}; no statistic was changed")
    count.index_add_(0, labels, torch.ones(labels.shape[0], dtype=count.dtype, device=count.device))
    for out, v in ((act_sum, xbar), (act_sq, xsq), (taylor_sum, taylor), (deeplift_sum, deeplift)):
        if out is not None and v is not None:
            out.index_add_(0, labels, v)


def _sorted_desc(scores: torch.Tensor):
    """Scores in float64, sorted descending per row; ties keep the lower index first."""
    return torch.sort(scores.to(torch.float64), dim=1, descending=True, stable=True)


def select(scores: torch.Tensor, theta: float) -> torch.Tensor:
    """Cumulative-Θ critical set per row (docs/method.md): bool [R, N]."""
    vals, idx = _sorted_desc(scores)
    cs = vals.cumsum(1)
    total = cs[:, -1:]
    # Index of the first prefix whose sum reaches theta * total, plus one; nothing for a zero row.
    need = (cs < theta * total).sum(1, keepdim=True) + 1
    need = torch.where(total > 0, need, torch.zeros_like(need))
    pos = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return out.scatter_(1, idx, pos < need)


def topk_count(ratio: float, n: int) -> int:
    """``ceil(ratio * n)``, immune to the float error of ``ratio * n`` (0.3 * 10 is 3.0000000000000004)."""
    return min(n, max(1, math.ceil(round(ratio * n, 9))))


def select_topk(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Top ``ceil(ratio * N)`` per row (ties: lower index first): bool [R, N]."""
    k = topk_count(ratio, scores.shape[1])
    _, idx = _sorted_desc(scores)
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    out.scatter_(1, idx[:, :k], True)
    return out


def masked_sgd_(param, grad, momentum_buf, mask, lr, momentum, weight_decay):
    """torch.optim.SGD (dampening 0) on the entries where ``mask`` is True; the rest untouched."""
    m = broadcast_mask(mask, param)
    d = grad if weight_decay == 0 else grad.add(param, alpha=weight_decay)
    if momentum != 0:
        buf = momentum_buf.mul(momentum).add_(d)
        momentum_buf.copy_(torch.where(m, buf, momentum_buf))
        d = buf
    param.copy_(torch.where(m, param.add(d, alpha=-lr), param))


def masked_adamw_(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step):
    """torch.optim.AdamW (single-tensor formula) on the entries where ``mask`` is True."""
    m = broadcast_mask(mask, param)
    p = param.mul(1 - lr * weight_decay)
    ea = exp_avg.lerp(grad, 1 - beta1)
    eas = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (eas.sqrt() / (bias_correction2 ** 0.5)).add_(eps)
    p.addcdiv_(ea, denom, value=-step_size)
    param.copy_(torch.where(m, p, param))
    exp_avg.copy_(torch.where(m, ea, exp_avg))
    exp_avg_sq.copy_(torch.where(m, eas, exp_avg_sq))
