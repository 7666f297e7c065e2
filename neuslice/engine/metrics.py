"""Statistics → scores (docs/method.md §3). Every score is ``[K, N]`` per layer, never negative.

A class with no samples (count 0) has no score: its row is NaN, and slicing for it is an error.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

__all__ = ["METRICS", "NEEDS", "score", "class_agnostic", "check_metric"]

METRICS = ("avg", "var", "taylor", "deeplift", "ens")
# statistic each metric reads beyond count/act_sum/act_sq (which every profile has)
NEEDS = {"avg": (), "var": (), "taylor": ("taylor",), "deeplift": ("deeplift",), "ens": ("taylor", "deeplift")}


def check_metric(fn: str, metric: str, collected) -> None:
    """Raise naming ``fn`` unless ``metric`` is known and its statistics were collected (``collected``: metric names)."""
    if metric not in METRICS:
        raise ValueError(f"{fn}: unknown metric {metric!r}; expected one of {METRICS}")
    missing = [m for m in NEEDS[metric] if m not in collected]
    if missing:
        raise ValueError(f"{fn}: metric {metric!r} needs the {' and '.join(missing)} statistics, but this profile "
                         f"collected metrics {tuple(collected)}; profile again with metrics including {missing}")


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
    check_metric("neuslice.Profile.score", metric, profile.metrics)
    return {name: _per_class(profile.stats[name], metric) for name in profile.layer_names}


def class_agnostic(profile, metric: str) -> Dict[str, Tensor]:
    """Count-weighted mean over classes of the per-class score: ``{layer: float64 [N]}`` (global slicing)."""
    fn = "neuslice.Profile.class_agnostic"
    check_metric(fn, metric, profile.metrics)
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
