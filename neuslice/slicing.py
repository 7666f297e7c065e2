"""Global, category-wise and semantic slicing, and the merge of critical sets (SPEC §4).

Selection goes through ``neuslice.ops.select`` (cumulative Θ) and ``neuslice.ops.select_topk`` (p).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops
from ._graph import discover
from ._hooks import ChainHooks
from ._io import check_model
from .metrics import check_metric
from .slices import Profile, Slices

__all__ = ["global_slice", "category_slice", "semantic_slice", "categories", "similarity", "groups",
           "compression_rate", "MaskedModel"]


def _check_common(fn: str, profile, metric: str, value, name: str, lo_open: bool, min_keep) -> None:
    if not isinstance(profile, Profile):
        raise TypeError(f"{fn}: profile must be a neuslice.Profile, got {type(profile).__name__}")
    check_metric(fn, metric, profile.metrics)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (0.0 < value <= 1.0):
        raise ValueError(f"{fn}: {name} must lie in (0, 1], got {value!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"{fn}: min_keep must be an int >= 0, got {min_keep!r}")


def _classes(fn: str, profile: Profile, classes) -> List[int]:
    """Classes to slice for (all by default); each must have samples in the profile."""
    k = profile.num_classes
    idx = list(range(k)) if classes is None else [int(c) for c in ([classes] if isinstance(classes, int)
                                                                     else classes)]
    if not idx:
        raise ValueError(f"{fn}: classes must name at least one class, got none")
    counts = profile.counts
    for c in idx:
        if not 0 <= c < k:
            raise ValueError(f"{fn}: class {c} is outside [0, {k})")
        if float(counts[c]) <= 0:
            raise ValueError(f"{fn}: class {c} ({profile.class_names[c]!r}) has no samples in the profile, so it "
                             "has no score; profile data with that class or pass classes= without it")
    return sorted(set(idx))


def _min_keep(crit: Tensor, scores: Tensor, min_keep: int) -> Tensor:
    """Rows of ``crit`` [R, N] with fewer than ``min_keep`` neurons get their top-scored ones added."""
    n = crit.shape[1]
    if min_keep == 0 or crit.shape[0] == 0:
        return crit
    short = crit.sum(1) < min(min_keep, n)
    if bool(short.any()):
        crit = crit.clone()
        crit[short] |= ops.select_topk(scores[short].contiguous(), min(min_keep, n) / n)
    return crit


def _couple(crit: Dict[str, Tensor], coupled: Sequence[Sequence[str]]) -> Dict[str, Tensor]:
    for group in coupled:
        names = [g for g in group if g in crit]
        if len(names) > 1:
            union = torch.stack([crit[g] for g in names]).any(0)
            for g in names:
                crit[g] = union.clone()
    return crit


def _build(profile: Profile, crit: Dict[str, Tensor], sliced_idx: List[int], scores, **kw) -> Slices:
    sliced = torch.zeros(profile.num_classes, dtype=torch.bool)
    sliced[sliced_idx] = True
    crit = _couple({n: c.cpu() for n, c in crit.items()}, profile.coupled)
    layers = [{k: e[k] for k in ("name", "type", "weight_shape", "n")} for e in profile.layers]
    return Slices(layers, profile.class_names, crit, sliced, {n: s.double().cpu() for n, s in scores.items()},
                  coupled=profile.coupled, **kw)


def global_slice(profile: Profile, metric: str, ratio: float, *, min_keep: int = 1) -> Slices:
    """Per layer, the top ⌈ratio·N⌉ neurons by the class-agnostic score; one set serves every class.

    Returns :class:`Slices` whose ``critical`` rows are all that set (bool ``[K, N]`` per layer)."""
    fn = "neuslice.global_slice"
    _check_common(fn, profile, metric, ratio, "ratio", True, min_keep)
    agn = profile.class_agnostic(metric)
    k = profile.num_classes
    crit, scores = {}, {}
    for name, s in agn.items():
        row = s.unsqueeze(0).contiguous()
        sel = _min_keep(ops.select_topk(row, float(ratio)), row, min_keep)
        crit[name] = sel.expand(k, -1).clone()
        scores[name] = row.expand(k, -1)
    return _build(profile, crit, list(range(k)), scores, mode="global", metric=metric, value=ratio,
                  min_keep=min_keep)


def category_slice(profile: Profile, metric: str, ratio: float, *, min_keep: int = 1,
                   classes: Optional[Sequence[int]] = None) -> Slices:
    """Per class and layer, the top ⌈ratio·N⌉ neurons by that class's score (bool ``[K, N]`` per layer)."""
    fn = "neuslice.category_slice"
    _check_common(fn, profile, metric, ratio, "ratio", True, min_keep)
    idx = _classes(fn, profile, classes)
    return _per_class(profile, metric, idx, lambda s: ops.select_topk(s, float(ratio)), min_keep,
                      mode="category", value=ratio)


def semantic_slice(profile: Profile, metric: str, theta: float, *, share: float = 0.5, tau: float = 0.5,
                   min_keep: int = 1, classes: Optional[Sequence[int]] = None) -> Slices:
    """Per class and layer, the critical set: the fewest neurons, in descending score order, whose score
    sum reaches ``theta`` × the row total (SPEC §4). ``share`` (ρ) and ``tau`` (τ) parametrise
    :meth:`Slices.categories` and :meth:`Slices.groups`. Classes without samples must be left out via
    ``classes``."""
    fn = "neuslice.semantic_slice"
    _check_common(fn, profile, metric, theta, "theta", True, min_keep)
    for name, v, lo in (("share", share, 0.0), ("tau", tau, -1e-12)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo < v <= 1.0):
            raise ValueError(f"{fn}: {name} must lie in {'(0, 1]' if name == 'share' else '[0, 1]'}, got {v!r}")
    idx = _classes(fn, profile, classes)
    return _per_class(profile, metric, idx, lambda s: ops.select(s, float(theta)), min_keep, mode="semantic",
                      value=theta, share=share, tau=tau)


def _per_class(profile, metric, idx, select, min_keep, **kw) -> Slices:
    scores = profile.score(metric)
    crit = {}
    for name, s in scores.items():
        rows = s[idx].contiguous()
        c = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
        c[idx] = _min_keep(select(rows), rows, min_keep)
        crit[name] = c
    return _build(profile, crit, idx, scores, metric=metric, min_keep=min_keep, **kw)


# ---------------------------------------------------------------------------------------------
# merge: categories, similarity, groups

def categories(slices: Slices) -> Dict[str, Dict[str, Tensor]]:
    """Per neuron, how many sliced classes it is critical for, as ``{category: {layer: bool [N]}}``."""
    idx = torch.nonzero(slices.sliced).flatten()
    thr = max(2, math.ceil(round(slices.share * len(idx), 9)))
    out: Dict[str, Dict[str, Tensor]] = {c: {} for c in Slices.CATEGORIES}
    for name, c in slices.critical_sets.items():
        m = c[idx].sum(0)
        out["shared"][name] = m >= thr
        out["group"][name] = (m >= 2) & (m < thr)
        out["specific"][name] = m == 1
        out["free"][name] = m == 0
    return out


def similarity(slices: Slices) -> Tensor:
    """S[k, k'] = Σ_l N_l · Jaccard(C_{k,l}, C_{k',l}) / Σ_l N_l, float64 ``[K, K]`` (NaN: class not sliced;
    the Jaccard index of two empty sets is 1)."""
    k = slices.num_classes
    num = torch.zeros(k, k, dtype=torch.float64)
    total = 0
    for c in slices.critical_sets.values():
        cf = c.double()
        inter = cf @ cf.t()
        size = cf.sum(1)
        union = size[:, None] + size[None, :] - inter
        num += c.shape[1] * torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
        total += c.shape[1]
    s = num / total
    ok = slices.sliced
    return torch.where(ok[:, None] & ok[None, :], s, torch.full_like(s, float("nan")))


def groups(slices: Slices) -> List[List[int]]:
    """Average-linkage agglomerative clustering of the sliced classes on 1 − S; clusters stop merging when
    their average similarity falls below ``tau``. Sorted lists of class indices, by first member."""
    s = similarity(slices)
    clusters = [[int(i)] for i in torch.nonzero(slices.sliced).flatten()]
    while len(clusters) > 1:
        best, pair = -1.0, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                v = float(s[clusters[a]][:, clusters[b]].mean())
                if v > best + 1e-12:
                    best, pair = v, (a, b)
        if best < slices.tau:
            break
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters)


# ---------------------------------------------------------------------------------------------
# compression rate, masked evaluation

def _mark(removed: Dict[int, Tensor], p: Optional[Tensor], index) -> None:
    if p is None:
        return
    m = removed.get(id(p))
    if m is None:
        m = removed[id(p)] = torch.zeros(p.shape, dtype=torch.bool)
    m[index] = True


def _mark_consumer(removed, c: nn.Module, r: Tensor, cols: int) -> None:
    if isinstance(c, nn.Linear):
        _mark(removed, c.weight, (slice(None), r.repeat_interleave(cols)))
        return
    in_per, out_per = c.in_channels // c.groups, c.out_channels // c.groups
    for ch in torch.nonzero(r).flatten().tolist():
        g = ch // in_per
        _mark(removed, c.weight, (slice(g * out_per, (g + 1) * out_per), ch % in_per))


def compression_rate(slices: Slices, model: nn.Module, classes, *, restrict_head: bool = True) -> float:
    """Fraction of ``model``'s parameters removed by slicing for ``classes`` (SPEC §4), in [0, 1]."""
    fn = "neuslice.Slices.compression_rate"
    check_model(fn, slices.layers, model)
    keep = slices.mask(classes)
    idx = slices.class_indices(fn, classes)
    plan = discover(model, slices.layer_names, fn=fn)
    modules = dict(model.named_modules())
    removed: Dict[int, Tensor] = {}
    for info in plan.layers:
        r = ~keep[info.name].cpu()
        if not bool(r.any()):
            continue
        _mark(removed, info.module.weight, r)
        _mark(removed, info.module.bias, r)
        for name in info.chain[1:]:
            for p in modules[name].parameters(recurse=False):
                if p.dim() == 1 and p.shape[0] == info.n:
                    _mark(removed, p, r)
        for cname, cols in info.consumers:
            _mark_consumer(removed, modules[cname], r, cols)
    if restrict_head and len(plan.heads) == 1:
        head = modules[plan.heads[0]]
        rows = torch.ones(slices.num_classes, dtype=torch.bool)
        rows[idx] = False
        if head.weight.shape[0] == slices.num_classes and bool(rows.any()):
            _mark(removed, head.weight, rows)
            _mark(removed, head.bias, rows)
    total = sum(p.numel() for p in model.parameters())
    return float(sum(int(m.sum()) for m in removed.values())) / total if total else 0.0


class MaskedModel:
    """Context manager from :meth:`Slices.apply`: zeroes the neurons outside the slice; yields the model."""

    def __init__(self, slices: Slices, model: nn.Module, classes):
        fn = "neuslice.Slices.apply"
        check_model(fn, slices.layers, model)
        self.masks = slices.mask(classes)
        self.plan = discover(model, slices.layer_names, fn=fn)
        self.model = model
        self._hooks: Optional[ChainHooks] = None

    def _on_end(self, i: int, t: Tensor) -> Tensor:
        info = self.plan.layers[i]
        m = self.masks[info.name].to(device=t.device, dtype=t.dtype)
        if isinstance(info.module, nn.Linear):
            return t * m
        return t * m.view(1, -1, *([1] * (t.dim() - 2)))

    def __enter__(self) -> nn.Module:
        self._hooks = ChainHooks(self.model, self.plan.layers, self._on_end, point="end")
        return self.model

    def __exit__(self, *exc) -> bool:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        return False
