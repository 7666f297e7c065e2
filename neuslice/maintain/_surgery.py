"""Physical removal of transformer units, read from the Plan (docs/method.md §6 "Restructure").

Used when the plan records attention blocks. Every removal follows one recorded coupling, so it removes
exactly what ``Slices.compression_rate`` counts (docs/method.md §4):

- a sliced layer's removed neurons: its weight rows and bias entries, the 1-d entries of its chain's norm;
- an FFN neuron: also its columns in the layers that read it (``LayerInfo.consumers``); a layer with no
  recorded reader must share its slice with a coupled layer that has one (Llama's gate with up);
- a whole attention head (a key/value group under grouped-query attention): its q, k and v channels, the
  out projection's matching input columns (``Attention``) and the block's per-head parameters (a parameter of
  the block's module with one dim of size heads: Swin's relative position bias table);
  then the attention module's integer attributes that its forward reads and that hold a head count or a
  heads × head_dim width are updated.

Refused, with an error naming the layer: a layer in ``Plan.residual`` (its width is the residual stream's,
the error names the LayerNorm / residual add), a q/k/v layer whose block is not sliced whole, a slice that
is not constant on heads, a block losing every head, a layer read by no recorded layer.
"""
from __future__ import annotations

import copy
from itertools import combinations
from typing import Callable, Dict, List, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from ..engine import heads as _heads
from ..engine.graph import NORMS, Attention, Plan
from ..engine.capture import call_model

__all__ = ["physical", "refusals", "check_residual", "settle_counts", "Count"]

_HINT = ("choose layers= with only removable layers, e.g. neuslice.profile(..., layers=neuslice.removable_layers("
         "model, example_inputs)) (FFN input layers and whole attention q/k/v), or use mode='mask'")


def _fail(fn: str, layer: str, why: str) -> ValueError:
    return ValueError(f"{fn}: cannot remove the neurons of layer {layer!r} physically: {why}; {_HINT}")


def check_residual(fn: str, plan: Plan, removed: Dict[str, Tensor]) -> None:
    """A layer in ``plan.residual`` losing neurons is an error naming what its channels feed."""
    for info in plan.layers:
        if info.name in plan.residual and bool(removed[info.name].any()):
            raise _fail(fn, info.name, f"its outputs feed {plan.residual[info.name]}, so their number is the "
                                       "residual stream's width, which restructuring never changes")


def _check_blocks(fn: str, plan: Plan, attention: Sequence[Attention], removed: Dict[str, Tensor]
                  ) -> List[Tuple[Attention, Tensor]]:
    """``[(block, gone units bool [U])]`` for the blocks losing heads; errors for what cannot be cut whole."""
    names = [i.name for i in plan.layers]
    blocks = _heads.active(attention, names)
    for a in attention:
        if a in blocks:
            continue
        for layer in dict.fromkeys((a.q[0], a.k[0], a.v[0])):
            if layer in removed and bool(removed[layer].any()):
                missing = [x for x in (a.q[0], a.k[0], a.v[0]) if x not in names]
                raise _fail(fn, layer, f"it holds q/k/v channels of the attention {a.module!r}, whose layers "
                                       f"{missing} are not sliced, and a head is removed only with its query, key "
                                       "and value channels together (slice all of them)")
    out = []
    for a in blocks:
        segs = _heads.segments(a)
        rows = {layer: removed[layer].unsqueeze(0) for layer, _ in segs}
        gone = ~_heads.unit_keep(a, {n: ~r for n, r in rows.items()})[0]
        covered: Dict[str, Tensor] = {}
        for layer, idx in segs:
            r = removed[layer]
            per = r[idx.flatten()].view(idx.shape)
            if not bool((per == gone.unsqueeze(1)).all()):
                raise _fail(fn, layer, f"its slice is not constant on the heads of the attention {a.module!r} "
                                       "(slices made without the attention recorded); slice again from a profile "
                                       "that records it")
            c = covered.setdefault(layer, torch.zeros_like(r))
            c[idx.flatten()] = True
        for layer, c in covered.items():
            if bool((removed[layer] & ~c).any()):
                raise _fail(fn, layer, f"it loses channels outside the heads of the attention {a.module!r}")
        if bool(gone.all()):
            raise _fail(fn, a.q[0], f"the slice removes every head of the attention {a.module!r}; keep at least "
                                    "one (min_keep >= 1)")
        if bool(gone.any()):
            out.append((a, gone))
    return out


class _Cut:
    """Per module, the output rows and input columns to keep; applied once each."""

    def __init__(self, mods: Dict[str, nn.Module]):
        self.mods = mods
        self.rows: Dict[str, Tensor] = {}
        self.cols: Dict[str, Tensor] = {}

    def _get(self, d, name, n) -> Tensor:
        return d.setdefault(name, torch.ones(n, dtype=torch.bool))

    def drop_rows(self, name: str, r: Tensor) -> None:
        w = self.mods[name].weight
        self._get(self.rows, name, w.shape[0])[r] = False

    def drop_cols(self, name: str, cols: Tensor) -> None:
        w = self.mods[name].weight
        self._get(self.cols, name, w.shape[1])[cols] = False

    @torch.no_grad()
    def apply(self) -> None:
        for name in dict.fromkeys(list(self.rows) + list(self.cols)):
            m = self.mods[name]
            rows = self.rows.get(name, torch.ones(m.weight.shape[0], dtype=torch.bool))
            cols = self.cols.get(name, torch.ones(m.weight.shape[1], dtype=torch.bool))
            w = m.weight.data[rows.to(m.weight.device)][:, cols.to(m.weight.device)]
            m.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
            if getattr(m, "bias", None) is not None:
                m.bias = nn.Parameter(m.bias.data[rows.to(m.bias.device)].clone(), requires_grad=m.bias.requires_grad)
            if isinstance(m, nn.Linear):
                m.out_features, m.in_features = w.shape[0], w.shape[1]
            else:
                m.out_channels, m.in_channels = w.shape[0], w.shape[1]


def _cut_chain(mods, chain: Sequence[str], n: int, keep: Tensor) -> None:
    """The 1-d parameters (and per-channel buffers) of size ``n`` of the chain's modules after the layer."""
    for name in chain[1:]:
        m = mods[name]
        for pname, p in list(m.named_parameters(recurse=False)):
            if p.dim() == 1 and p.shape[0] == n:
                setattr(m, pname, nn.Parameter(p.data[keep.to(p.device)].clone(), requires_grad=p.requires_grad))
        if isinstance(m, NORMS):
            for bname, b in list(m.named_buffers(recurse=False)):
                if b is not None and b.dim() == 1 and b.shape[0] == n:
                    setattr(m, bname, b[keep.to(b.device)].clone())
            m.num_features = int(keep.sum())


def _grouped(m: nn.Module) -> bool:
    """A grouped (or depthwise) convolution: the surgery cuts neither it nor its input channels."""
    return not isinstance(m, nn.Linear) and getattr(m, "groups", 1) != 1


def refusals(model: nn.Module, plan: Plan, names: Sequence[str]) -> Dict[str, str]:
    """Of the layers ``names`` (outside whole attention blocks, in a model with attention blocks), those whose
    neurons :func:`physical` would refuse to remove, or could not remove exactly, with why (``removable_layers``
    leaves them out, as ``_prune.refusals`` does on Torch-Pruning's path): a grouped convolution or reader, any
    convolution (MobileViT's conv stages, whose outputs also reach channel concatenations: readers the plan does
    not record), or no known reader, alone or in a coupled group."""
    mods = dict(model.named_modules())
    by = {i.name: i for i in plan.layers}
    out: Dict[str, str] = {}
    for n in names:
        info = by[n]
        grouped = [c for c, _ in info.consumers if _grouped(mods[c])]
        if _grouped(info.module):
            out[n] = "it is a grouped convolution"
        elif not isinstance(info.module, nn.Linear):
            out[n] = "a convolution in a model with attention blocks: its readers are not all recorded"
        elif grouped:
            out[n] = f"its reader {grouped[0]!r} is a grouped convolution"
        elif not info.consumers and not any(by[x].consumers for g in plan.coupled if n in g for x in g if x in by):
            out[n] = "no layer reading its neurons is known"
    return out


def _consumer_cols(fn: str, mods, layer: str, cname: str, cols: int, r: Tensor) -> Tensor:
    c = mods[cname]
    if _grouped(c):
        raise _fail(fn, layer, f"its reader {cname!r} is a grouped convolution")
    n_in = c.weight.shape[1]
    if n_in != r.numel() * cols:
        raise _fail(fn, layer, f"its reader {cname!r} has {n_in} inputs, not {cols} per neuron of its {r.numel()}")
    return r.repeat_interleave(cols)


@torch.no_grad()
def _cut_per_head(module: nn.Module, a: Attention, gone: Tensor) -> None:
    """The block's per-head parameters (:func:`~neuslice.engine.heads.per_head_tensors`: Swin's relative position
    bias table) without the entries of the heads gone (``gone``: bool per unit)."""
    for _, m, attr, dim in _heads.per_head_tensors(module, a):
        t = getattr(m, attr)
        kept = torch.nonzero(~_heads.query_heads(a, gone)).flatten().to(t.device)
        m._parameters[attr] = nn.Parameter(t.index_select(dim, kept).clone(), requires_grad=t.requires_grad)
        if isinstance(m, nn.Linear) and attr == "weight":      # (Swin-V2's position-bias MLP: one output per head)
            m.out_features, m.in_features = m.weight.shape


def _attribute_reads(module: nn.Module, names: Sequence[str], example_inputs) -> Dict[str, Set[str]]:
    """Instance attributes of the modules ``names`` that one forward reads: ``{module name: {attribute}}``."""
    mods = dict(module.named_modules())
    reads: Dict[str, Set[str]] = {n: set() for n in names}
    saved = []

    def recorder(cls, seen):
        def getattribute(self, attr):
            if attr in object.__getattribute__(self, "__dict__"):
                seen.add(attr)
            return cls.__getattribute__(self, attr)
        return type(cls.__name__, (cls,), {"__getattribute__": getattribute})

    try:
        for n in names:
            m = mods[n]
            saved.append((m, m.__class__))
            m.__class__ = recorder(m.__class__, reads[n])
        with torch.no_grad():
            call_model(module, example_inputs)
    finally:
        for m, cls in saved:
            m.__class__ = cls
    return reads


class Count:
    """One attribute of an attention block's module that may hold a head count or a heads × head_dim width:
    ``old`` before the cut, ``new`` after it (set by :func:`settle_counts`)."""

    __slots__ = ("module", "owner", "attr", "old", "new")

    def __init__(self, module: nn.Module, owner: str, attr: str, old: int, new: int):
        self.module, self.owner, self.attr, self.old, self.new = module, owner, attr, old, new


def _count_candidates(module: nn.Module, plan_blocks: Sequence[Attention], cut: List[Tuple[Attention, Tensor]],
                      reads: Dict[str, Set[str]]) -> List[Count]:
    """The attention modules' integer attributes that forward reads and that hold the old head count, kv-head
    count or heads × head_dim width, with their new values. An attribute counts only when every block of the
    same shape has it with the same value (so a per-layer index is never taken for a head count), and a value
    that is also an unchanged size (head_dim, query heads per key/value head) or maps to two new values is
    left alone. A value can still match by coincidence (Phi's ``rotary_ndims`` = head_dim / 2 equals the head
    count when there are head_dim / 2 heads): :func:`settle_counts` decides by the model's outputs."""
    mods = dict(module.named_modules())
    shape = lambda a: (a.heads, a.head_dim, a.kv_heads)    # noqa: E731
    before = {b.module: dict(mods[b.module].__dict__) for b in plan_blocks}   # peers compared as they were
    out: List[Count] = []
    for a, gone in cut:
        if not a.module or a.module not in mods:
            continue
        g = a.heads // a.kv_heads
        kv_new = a.kv_heads - int(gone.sum())
        new = {}
        for old, val in ((a.heads, kv_new * g), (a.kv_heads, kv_new), (a.heads * a.head_dim, kv_new * g * a.head_dim),
                         (a.kv_heads * a.head_dim, kv_new * a.head_dim)):
            new.setdefault(old, set()).add(val)
        fixed = {a.head_dim, g}
        peers = [before[b.module] for b in plan_blocks if shape(b) == shape(a)]
        for attr in sorted(reads.get(a.module, ())):
            v = before[a.module].get(attr)
            if isinstance(v, bool) or not isinstance(v, int) or v not in new or v in fixed or len(new[v]) != 1:
                continue
            if any(p.get(attr) != v for p in peers):
                continue
            val = next(iter(new[v]))
            if val != v:
                out.append(Count(mods[a.module], a.module, attr, v, val))
    return out


# Attribute names tried in every combination at most (2**6 = 64 forwards of example_inputs); more are set
# all together, as found.
MAX_SETTLE_NAMES = 6


def settle_counts(counts: Sequence[Count], agrees: Callable[[], bool]) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """Set the candidate attributes to their new values, all of them first; when the cut model then disagrees
    with mask mode (``agrees()`` False, or its forward fails), the largest set of attribute names (the same
    names in every block) with which it agrees. Returns what was changed, ``{module: {attribute: (old,
    new)}}``; when no combination agrees, every candidate stays set (the caller's check reports it)."""
    names = sorted({c.attr for c in counts})

    def use(on) -> None:
        for c in counts:
            setattr(c.module, c.attr, c.new if c.attr in on else c.old)

    def ok() -> bool:
        try:
            return bool(agrees())
        except Exception:  # noqa: BLE001  (a wrong count usually breaks a view/reshape: that combination fails)
            return False

    chosen = set(names)
    use(chosen)
    if counts and len(names) <= MAX_SETTLE_NAMES and not ok():
        tries = (set(on) for size in range(len(names) - 1, -1, -1) for on in combinations(names, size))
        chosen = next((on for on in tries if (use(on), ok())[1]), set(names))
        use(chosen)
    changed: Dict[str, Dict[str, Tuple[int, int]]] = {}
    for c in counts:
        if c.attr in chosen:
            changed.setdefault(c.owner, {})[c.attr] = (c.old, c.new)
    return changed


def physical(fn: str, model: nn.Module, plan: Plan, keep: Dict[str, Tensor], head: str, classes: Sequence[int],
             attention: Sequence[Attention], example_inputs) -> Tuple[nn.Module, List[Count]]:
    """A deep copy of ``model`` without the neurons outside ``keep`` (``{layer: bool [N]}``), whole heads in
    ``attention``'s blocks, and the head's rows other than ``classes``; plus the attention attributes that may
    hold a head count or width, not yet set (:func:`settle_counts` sets them against mask mode)."""
    module = copy.deepcopy(model).eval()
    mods = dict(module.named_modules())
    removed = {i.name: ~keep[i.name].cpu() for i in plan.layers}
    check_residual(fn, plan, removed)
    cut_blocks = _check_blocks(fn, plan, attention, removed)
    in_blocks = {x for a in _heads.active(attention, list(removed)) for x in (a.q[0], a.k[0], a.v[0])}
    by_name = {i.name: i for i in plan.layers}
    # the attributes the blocks' forward reads, from a forward of the copy before anything is cut (the chains'
    # norms below are cut at once, and a conv's BatchNorm cut before its conv would fail that forward)
    blocks = [a for a in attention if a.module and a.module in mods]
    reads = _attribute_reads(module, list(dict.fromkeys(a.module for a in blocks)), example_inputs) \
        if cut_blocks else {}
    cut = _Cut(mods)
    for info in plan.layers:
        r = removed[info.name]
        if not bool(r.any()):
            continue
        if _grouped(info.module):
            raise _fail(fn, info.name, "it is a grouped convolution")
        cut.drop_rows(info.name, r)
        _cut_chain(mods, info.chain, info.n, ~r)
        if info.name in in_blocks:
            continue
        readers = list(info.consumers)
        if not readers:
            group = next((g for g in plan.coupled if info.name in g), [])
            ok = [x for x in group if x in by_name and by_name[x].consumers and bool((removed[x] == r).all())]
            if not ok:
                raise _fail(fn, info.name, "no layer reading its neurons is known (nor a coupled layer with the "
                                           "same slice that has one)")
        for cname, cols in readers:
            cut.drop_cols(cname, _consumer_cols(fn, mods, info.name, cname, cols, r))
    for a, gone in cut_blocks:
        cut.drop_cols(a.out, _heads.out_columns(a)[gone].flatten())
    drop = torch.ones(mods[head].weight.shape[0], dtype=torch.bool)
    drop[list(classes)] = False
    if bool(drop.any()):
        cut.drop_rows(head, drop)
    cut.apply()
    for a, gone in cut_blocks:
        _cut_per_head(module, a, gone)
    return module.eval(), _count_candidates(module, blocks, cut_blocks, reads)
