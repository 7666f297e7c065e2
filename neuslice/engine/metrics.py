"""Statistics → scores (docs/method.md §3). Every score is ``[K, N]`` per layer, never negative.

A class with no samples (count 0) has no score: its row is NaN, and slicing for it is an error.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["METRICS", "NEEDS", "STATS", "kept_stats", "score", "class_agnostic", "check_metric"]

METRICS = ("avg", "var", "taylor", "deeplift", "ens")
STATS = ("count", "act_sum", "act_sq", "taylor_sum", "deeplift_sum")
# the statistics each metric reads besides count (which every profile keeps); docs/method.md §3
NEEDS = {"avg": ("act_sum",), "var": ("act_sum", "act_sq"), "taylor": ("taylor_sum",),
         "deeplift": ("deeplift_sum",), "ens": ("act_sum", "act_sq", "taylor_sum", "deeplift_sum")}
_GRADIENT = {"taylor_sum": "taylor", "deeplift_sum": "deeplift"}


def kept_stats(metrics: Sequence[str]) -> Tuple[str, ...]:
    """The statistics a profile of ``metrics`` keeps, in ``STATS`` order: ``count`` and what they need."""
    need = {s for m in metrics for s in NEEDS[m]}
    return tuple(s for s in STATS if s == "count" or s in need)


def check_metric(fn: str, metric: str, collected: Sequence[str], kept: Optional[Sequence[str]] = None) -> None:
    """Raise naming ``fn`` unless ``metric`` is known and the statistics it needs are in the profile.

    ``collected``: the metrics the profile was made for; ``kept``: the statistics it holds (by default those
    ``collected`` needs). A gradient statistic counts only where its metric was collected (files of older
    versions hold every statistic, zeros where the metric was not asked)."""
    if metric not in METRICS:
        raise ValueError(f"{fn}: unknown metric {metric!r}; expected one of {METRICS}")
    kept = kept_stats(collected) if kept is None else tuple(kept)
    missing = [s for s in NEEDS[metric] if s not in kept or (s in _GRADIENT and _GRADIENT[s] not in collected)]
    if missing:
        have = [s for s in kept if s not in _GRADIENT or _GRADIENT[s] in collected]
        raise ValueError(f"{fn}: metric {metric!r} needs the statistic(s) {missing}, but this profile kept only "
                         f"{have} (it was made for metrics {tuple(collected)}, and keeps only what they need); "
                         f"profile again with metrics including {metric!r}")


def _per_class(stats: Dict[str, Tensor], metric: str) -> Tensor:
    count = stats["count"].unsqueeze(1)                                      # [K, 1]
    safe = torch.where(count > 0, count, torch.ones_like(count))
    if metric == "avg":
        out = (stats["act_sum"] / safe).clamp_min(0)
    elif metric == "var":
        mean = stats["act_sum"] / safe
        out = (stats["act_sq"] / safe - mean * mean).clamp_min(0)
    elif metric == "taylor":
        out = stats["taylor_sum"] / safe
    elif metric == "deeplift":
        out = stats["deeplift_sum"] / safe
    else:
        parts = [_row_normalised(_per_class(stats, m)) for m in ("avg", "var", "taylor", "deeplift")]
        out = torch.stack(parts).mean(0)
    return torch.where(count > 0, out, torch.full_like(out, float("nan")))


def _row_normalised(s: Tensor) -> Tensor:
    total = s.sum(1, keepdim=True)
    return torch.where(total > 0, s / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(s))


def score(profile, metric: str) -> Dict[str, Tensor]:
    """Per-class scores: ``{layer: float64 [K, N]}``; rows of classes without samples are NaN."""
    check_metric("neuslice.Profile.score", metric, profile.metrics, profile.statistics)
    return {name: _per_class(profile.stats[name], metric) for name in profile.layer_names}


def class_agnostic(profile, metric: str) -> Dict[str, Tensor]:
    """Count-weighted mean over classes of the per-class score: ``{layer: float64 [N]}`` (global slicing)."""
    fn = "neuslice.Profile.class_agnostic"
    check_metric(fn, metric, profile.metrics, profile.statistics)
    out = {}
    for name in profile.layer_names:
        st = profile.stats[name]
        count = st["count"]
        if float(count.sum()) <= 0:
            raise ValueError(f"{fn}: the profile holds no sample (every class count is 0)")
        per = _per_class(st, metric)
        per = torch.where(count.unsqueeze(1) > 0, per, torch.zeros_like(per))
        out[name] = (count.unsqueeze(1) * per).sum(0) / count.sum()
    return out
