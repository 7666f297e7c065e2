"""Global, category-wise and semantic slicing, and the merge of critical sets (docs/method.md §4).

Selection goes through ``neuslice.ops.select`` (cumulative Θ) and ``neuslice.ops.select_topk`` (p). When the
profile records attention blocks whose q, k and v layers are all sliced, those layers are selected by whole
heads (key/value groups under grouped-query attention): :mod:`neuslice.engine.heads`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from . import heads as _heads
from .metrics import check_metric
from .slices import Profile, Slices

__all__ = ["global_slice", "category_slice", "semantic_slice"]


def _check_common(fn: str, profile, metric: str, value, name: str, min_keep) -> None:
    if not isinstance(profile, Profile):
        raise TypeError(f"{fn}: profile must be a neuslice.Profile, got {type(profile).__name__}")
    check_metric(fn, metric, profile.metrics, profile.statistics)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (0.0 < value <= 1.0):
        raise ValueError(f"{fn}: {name} must lie in (0, 1], got {value!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"{fn}: min_keep must be an int >= 0, got {min_keep!r}")


def _classes(fn: str, profile: Profile, classes) -> List[int]:
    """Classes to slice for (all by default); each must have samples in the profile."""
    return profile.class_indices(fn, range(profile.num_classes) if classes is None else classes)


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


def _select_rows(profile: Profile, rows: Dict[str, Tensor], select, min_keep: int) -> Dict[str, Tensor]:
    """Per layer, ``select(rows [R, N]) -> bool [R, N]`` with min_keep; layers of the profile's attention blocks
    whose q, k and v are all sliced are selected by units (docs/method.md §4 "Head units")."""
    crit = {name: _min_keep(select(r), r, min_keep) for name, r in rows.items()}
    for a in _heads.active(profile.attention, list(rows)):
        u = _heads.unit_scores(a, rows).contiguous()
        _heads.expand(a, _min_keep(select(u), u, min_keep), crit)
    return crit


def _units_whole(profile: Profile, crit: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """After coupling, a unit is kept wherever any of its channels is (so every mask stays constant on units)."""
    for a in _heads.active(profile.attention, list(crit)):
        _heads.expand(a, _heads.unit_keep(a, crit), crit)
    return crit


def _build(profile: Profile, crit: Dict[str, Tensor], sliced_idx: List[int], scores, **kw) -> Slices:
    sliced = torch.zeros(profile.num_classes, dtype=torch.bool)
    sliced[sliced_idx] = True
    crit = _units_whole(profile, _couple({n: c.cpu() for n, c in crit.items()}, profile.coupled))
    layers = [{k: e[k] for k in ("name", "type", "weight_shape", "n")} for e in profile.layers]
    return Slices(layers, profile.class_names, crit, sliced, {n: s.double().cpu() for n, s in scores.items()},
                  coupled=profile.coupled, heads=profile.heads, attention=profile.attention, **kw)


def global_slice(profile: Profile, metric: str, ratio: float, *, min_keep: int = 1) -> Slices:
    """Per layer, the top ⌈ratio·N⌉ neurons by the class-agnostic score; one set serves every class.

    Returns :class:`Slices` whose ``critical`` rows are all that set (bool ``[K, N]`` per layer)."""
    fn = "neuslice.global_slice"
    _check_common(fn, profile, metric, ratio, "ratio", min_keep)
    agn = profile.class_agnostic(metric)
    k = profile.num_classes
    rows = {name: s.unsqueeze(0).contiguous() for name, s in agn.items()}
    sel = _select_rows(profile, rows, lambda r: ops.select_topk(r, float(ratio)), min_keep)
    crit = {name: sel[name].expand(k, -1).clone() for name in rows}
    scores = {name: rows[name].expand(k, -1) for name in rows}
    return _build(profile, crit, list(range(k)), scores, mode="global", metric=metric, value=ratio,
                  min_keep=min_keep)


def category_slice(profile: Profile, metric: str, ratio: float, *, min_keep: int = 1,
                   classes: Optional[Sequence[int]] = None) -> Slices:
    """Per class and layer, the top ⌈ratio·N⌉ neurons by that class's score (bool ``[K, N]`` per layer)."""
    fn = "neuslice.category_slice"
    _check_common(fn, profile, metric, ratio, "ratio", min_keep)
    idx = _classes(fn, profile, classes)
    return _per_class(profile, metric, idx, lambda s: ops.select_topk(s, float(ratio)), min_keep,
                      mode="category", value=ratio)


def semantic_slice(profile: Profile, metric: str, theta: float, *, share: float = 0.5, tau: float = 0.5,
                   min_keep: int = 1, classes: Optional[Sequence[int]] = None) -> Slices:
    """Per class and layer, the critical set: the fewest neurons, in descending score order, whose score
    sum reaches ``theta`` × the row total (docs/method.md §4). ``share`` (ρ) and ``tau`` (τ) parametrise
    :meth:`Slices.categories` and :meth:`Slices.groups`. Classes without samples must be left out via
    ``classes``."""
    fn = "neuslice.semantic_slice"
    _check_common(fn, profile, metric, theta, "theta", min_keep)
    for name, v, lo in (("share", share, 0.0), ("tau", tau, -1e-12)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo < v <= 1.0):
            raise ValueError(f"{fn}: {name} must lie in {'(0, 1]' if name == 'share' else '[0, 1]'}, got {v!r}")
    idx = _classes(fn, profile, classes)
    return _per_class(profile, metric, idx, lambda s: ops.select(s, float(theta)), min_keep, mode="semantic",
                      value=theta, share=share, tau=tau)


def _per_class(profile, metric, idx, select, min_keep, **kw) -> Slices:
    scores = profile.score(metric)
    sel = _select_rows(profile, {name: s[idx].contiguous() for name, s in scores.items()}, select, min_keep)
    crit = {}
    for name, s in scores.items():
        c = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
        c[idx] = sel[name]
        crit[name] = c
    return _build(profile, crit, idx, scores, metric=metric, min_keep=min_keep, **kw)
