"""How an op's tensors are laid out, said once for every backend (reference, cpu, cuda, triton).

Activations: ``accumulate_``'s x and grad are ``[B, N, S]``, channels-last ``[B, S, N]``, or
``[B, N]`` (S = 1); its ref is shared by the batch (``[N, S]`` or ``[N]``) or per sample (x's shape
and layout). Every backend works by *logical* axis (b, n, s) -- b the sample, n the neuron,
s the position -- and these functions are the only place that maps those axes to tensor dims.

Parameters: ``masked_sgd_``/``masked_adamw_`` see a parameter ``[rows, ...]`` as ``[rows, cols]``
(rows = neurons) and take a bool mask that is either per neuron (``[rows]``) or per weight (the
parameter's shape).

Torch only: nothing here imports from neuslice, so the Triton kernels (``neuslice._triton``) can use it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["bns", "ref_fits", "accumulate_layout",
           "as_bns", "strides_bns", "ref_per_sample", "ref_strides_bns", "rows_cols", "per_neuron_mask",
           "broadcast_mask"]


def _axes(t: torch.Tensor, channels_last: bool) -> Tuple[int, int, Optional[int]]:
    """The dims of ``t`` holding the logical axes (b, n, s); s is None for ``[B, N]`` (S = 1)."""
    if t.dim() == 2:
        return 0, 1, None
    return (0, 2, 1) if channels_last else (0, 1, 2)


def bns(x: torch.Tensor, channels_last: bool) -> Tuple[int, int, int]:
    """Sizes (B, N, S) of an activation given as [B, N], [B, N, S] or (channels_last) [B, S, N]."""
    db, dn, ds = _axes(x, channels_last)
    return x.shape[db], x.shape[dn], 1 if ds is None else x.shape[ds]


def ref_fits(ref: torch.Tensor, x: torch.Tensor, channels_last: bool) -> bool:
    """Whether ``ref``'s shape is one accumulate_ takes for ``x``: x's own (one reference per sample), or a
    shared ``[N, S]`` / ``[N]``. The one rule for the op's check, the engine's unchecked call and its error."""
    if ref.shape == x.shape:
        return True
    _, n, s = bns(x, channels_last)
    return ref.shape == (n, s) or ref.shape == (n,)


def accumulate_layout(x: torch.Tensor, grad: Optional[torch.Tensor], ref: Optional[torch.Tensor],
                      channels_last: bool) -> Tuple[int, int, int, Tuple[int, int, int], Tuple[int, int, int],
                                                    Tuple[int, int, int]]:
    """``(B, N, S, x strides, grad strides, ref strides)`` of one ``accumulate_`` call: what
    :func:`bns`, :func:`strides_bns` (x; grad, (0, 0, 0) when None) and :func:`ref_strides_bns` give,
    in one go. The native backends build their arguments from it on every call, so the dims are found
    once (grad and a per-sample ref have x's shape and layout) and each stride tuple read once."""
    db, dn, ds = _axes(x, channels_last)
    shape, xs = x.shape, x.stride()
    if ds is None:
        sizes, x_st = (shape[0], shape[1], 1), (xs[0], xs[1], 0)
    else:
        sizes, x_st = (shape[0], shape[dn], shape[ds]), (xs[0], xs[dn], xs[ds])
    if grad is None:
        g_st = (0, 0, 0)
    else:
        gs = grad.stride()
        g_st = (gs[0], gs[1], 0) if ds is None else (gs[0], gs[dn], gs[ds])
    if ref is None:
        r_st = (0, 0, 0)
    elif ref_per_sample(ref, x):
        rs = ref.stride()
        r_st = (rs[0], rs[1], 0) if ds is None else (rs[0], rs[dn], rs[ds])
    else:
        rs = ref.stride()
        r_st = (0, rs[0], rs[1] if len(rs) == 2 else 0)
    return (*sizes, x_st, g_st, r_st)


def as_bns(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The ``[B, N, S]`` view of an activation (no copy)."""
    db, dn, ds = _axes(t, channels_last)
    return t.unsqueeze(-1) if ds is None else t.permute(db, dn, ds)


def strides_bns(t: torch.Tensor, channels_last: bool) -> Tuple[int, int, int]:
    """Element strides (sb, sn, ss) of an activation by logical axis, whatever its layout; ss is 0
    for [B, N] (its single position)."""
    db, dn, ds = _axes(t, channels_last)
    return t.stride(db), t.stride(dn), 0 if ds is None else t.stride(ds)


def ref_per_sample(ref: Optional[torch.Tensor], x: torch.Tensor) -> bool:
    """True when accumulate_'s ``ref`` is per sample: it has x's shape (and so its layout's axes). The
    one overlap with the shared shapes, ``[N, S] = [1, 1]`` against a ``[B, N] = [1, 1]`` x, reads the
    same single value either way."""
    return ref is not None and tuple(ref.shape) == tuple(x.shape)


def ref_strides_bns(ref: Optional[torch.Tensor], x: torch.Tensor, channels_last: bool) -> Tuple[int, int, int]:
    """Element strides (sb, sn, ss) of accumulate_'s reference by logical axis: per sample (x's shape)
    as :func:`strides_bns` gives them; shared ``[N, S]`` or ``[N]`` with sb = 0 (the same reference for
    every sample) and, for ``[N]``, ss = 0 (the same value at every position); (0, 0, 0) when there is
    none. A per-sample ref ``expand()``ed from a shared one has sb = 0 too: both are read in place."""
    if ref is None:
        return 0, 0, 0
    if ref_per_sample(ref, x):
        return strides_bns(ref, channels_last)
    return 0, ref.stride(0), ref.stride(1) if ref.dim() == 2 else 0


def rows_cols(param: torch.Tensor) -> Tuple[int, int]:
    """``param`` seen as ``[rows, cols]``: rows = ``shape[0]`` (neurons), cols = the rest (0 when empty)."""
    rows = param.shape[0]
    return rows, param.numel() // rows if rows else 0


def per_neuron_mask(mask: torch.Tensor, param: torch.Tensor) -> bool:
    """True when ``mask`` is ``[rows]`` over a parameter of more dims (one flag per neuron, broadcast
    over each row); False when it has the parameter's shape (per weight). A ``[rows]`` mask on a 1-d
    parameter is per weight: both readings give the same update."""
    return tuple(mask.shape) != tuple(param.shape)


def broadcast_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``mask`` as a view that broadcasts against ``param`` (``[rows, 1, ...]`` for a per-neuron mask)."""
    if not per_neuron_mask(mask, param):
        return mask
    return mask.view(-1, *([1] * (param.dim() - 1)))
