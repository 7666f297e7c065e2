"""Attention heads as slicing units (docs/method.md §4 "Head units").

A unit of an :class:`~neuslice.engine.graph.Attention` block is one key/value head with the query heads that
read it (without grouped-query attention: one head). Its channels are the query channels of those heads and
the key and value channels of the key/value head; the out projection's input columns of those query heads
read it. When a block's q, k and v layers are all sliced, slicing selects whole units and every critical set
of those layers is constant on each unit's channels.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .graph import Attention

__all__ = ["segments", "out_columns", "active", "unit_scores", "expand", "unit_keep", "to_entry", "from_entry",
           "blocks_of", "per_head_tensors", "query_heads"]


def segments(a: Attention) -> List[Tuple[str, Tensor]]:
    """``[(layer, channels int64 [U, c])]`` for q, k and v: row ``u`` holds unit ``u``'s channels of that layer
    (query heads ``u*g … u*g+g-1``, g = heads // kv_heads, are contiguous in the query layer)."""
    u, hd = a.kv_heads, a.head_dim
    g = a.heads // a.kv_heads
    return [(a.q[0], a.q[1] + torch.arange(u * g * hd).view(u, g * hd)),
            (a.k[0], a.k[1] + torch.arange(u * hd).view(u, hd)),
            (a.v[0], a.v[1] + torch.arange(u * hd).view(u, hd))]


def out_columns(a: Attention) -> Tensor:
    """The out projection's input columns per unit: int64 ``[U, g*head_dim]``."""
    return torch.arange(a.heads * a.head_dim).view(a.kv_heads, -1)


def active(attention: Sequence[Attention], layers: Sequence[str]) -> List[Attention]:
    """The blocks whose q, k and v layers are all among ``layers``: those are sliced by whole units."""
    names = set(layers)
    return [a for a in attention if {a.q[0], a.k[0], a.v[0]} <= names]


def unit_scores(a: Attention, scores: Dict[str, Tensor]) -> Tensor:
    """Unit scores float64 ``[R, U]`` from channel scores ``{layer: [R, N]}``: per row, each of the q, k and v
    segments' scores is normalised to sum 1 over the block's channels (an all-zero segment counts 0), and a
    unit's score is the sum of its channels' normalised scores over the three (docs/method.md §4)."""
    total: Optional[Tensor] = None
    for layer, idx in segments(a):
        s = scores[layer].double()
        per = s[:, idx.flatten()].view(s.shape[0], *idx.shape).sum(-1)
        z = per.sum(-1, keepdim=True)
        part = torch.where(z > 0, per / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(per))
        total = part if total is None else total + part
    return total


def expand(a: Attention, keep: Tensor, crit: Dict[str, Tensor]) -> None:
    """Write the unit decision ``keep`` bool ``[R, U]`` into the channel masks ``crit`` (``{layer: [R, N]}``) of
    q, k and v, in place."""
    for layer, idx in segments(a):
        crit[layer][:, idx.flatten()] = keep.repeat_interleave(idx.shape[1], dim=1).to(crit[layer].device)


def unit_keep(a: Attention, crit: Dict[str, Tensor]) -> Tensor:
    """bool ``[R, U]``: a unit is kept when any of its q, k or v channels is kept in ``crit``."""
    out: Optional[Tensor] = None
    for layer, idx in segments(a):
        c = crit[layer]
        k = c[:, idx.flatten()].view(c.shape[0], *idx.shape).any(-1)
        out = k if out is None else out | k
    return out


def to_entry(a: Attention) -> dict:
    """JSON form of a block, as files record it (docs/method.md §5)."""
    return {"module": a.module, "q": [a.q[0], int(a.q[1])], "k": [a.k[0], int(a.k[1])], "v": [a.v[0], int(a.v[1])],
            "out": a.out, "heads": int(a.heads), "head_dim": int(a.head_dim), "kv_heads": int(a.kv_heads)}


def from_entry(e: dict) -> Attention:
    return Attention(e["module"], tuple(e["q"]), tuple(e["k"]), tuple(e["v"]), e["out"], e["heads"], e["head_dim"],
                     e["kv_heads"])


def blocks_of(attention: Sequence) -> List[Attention]:
    """``attention`` (Attention objects or their JSON entries) as a list of Attention; checked."""
    out = []
    for a in attention:
        a = a if isinstance(a, Attention) else from_entry(a)
        if not (a.heads >= 1 and a.kv_heads >= 1 and a.head_dim >= 1 and a.heads % a.kv_heads == 0):
            raise ValueError(f"attention block {a.module!r}: heads ({a.heads}) must be a positive multiple of "
                             f"kv_heads ({a.kv_heads}) and head_dim ({a.head_dim}) positive")
        out.append(a)
    return out


def query_heads(a: Attention, units: Tensor) -> Tensor:
    """A bool per unit ``[U]`` as a bool per query head ``[heads]`` (unit ``u`` holds query heads ``u*g …``)."""
    return units.repeat_interleave(a.heads // a.kv_heads)


def per_head_tensors(model: nn.Module, a: Attention) -> List[Tuple[str, nn.Module, str, int]]:
    """The block's own per-head parameters, which a removed head takes with it (docs/method.md §6): the parameters
    with exactly one dim of size ``heads`` of the block's module and its submodules, other than its q, k, v and out
    layers (Swin's relative position bias table ``[(2w-1)^2, heads]``, Swin-V2's logit scale and the last Linear of
    its position-bias MLP, by its outputs only), and of the module around it where they are not inside a Linear, a
    convolution or a norm (BEiT keeps its table beside the attention, in the layer), as
    ``(qualified name, owning module, attribute, dim)``. Buffers are left alone (rotary frequencies ``[head_dim /
    2]`` can equal the head count by coincidence); a table shared by several blocks lies outside both and is not
    found; with one head nothing is per head by its size alone. Physical restructure checks the cut model against
    mask mode, so a parameter taken for a per-head one by coincidence is an error, never a wrong model."""
    mods = dict(model.named_modules())
    root = mods.get(a.module) if a.module else None
    if root is None or a.heads < 2:
        return []
    skip = {a.module: [a.q[0], a.k[0], a.v[0], a.out]}
    if "." in a.module:                 # the module around the block, never the whole model
        parent = a.module.rsplit(".", 1)[0]
        skip[parent] = [a.module] + [n for n, m in mods.items() if n.startswith(parent + ".") and isinstance(
            m, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))]
    out, seen = [], set()
    for scope, not_here in skip.items():
        for name, m in mods[scope].named_modules(prefix=scope):
            if any(name == x or name.startswith(x + ".") for x in not_here):
                continue
            for attr, t in m._parameters.items():
                if t is None or not t.is_floating_point() or id(t) in seen:
                    continue
                dims = [d for d, size in enumerate(t.shape) if size == a.heads]
                if isinstance(m, nn.Linear):    # a Linear computing one value per head (Swin-V2's position-bias
                    dims = [d for d in dims if d == 0]   # MLP): its outputs, never its inputs (2-d coordinates)
                if len(dims) == 1:
                    seen.add(id(t))
                    out.append((f"{name}.{attr}" if name else attr, m, attr, dims[0]))
    return out
