"""The merge of critical sets (see docs/method.md, "Merge"): neuron categories, class similarity and
semantic groups. Each function reads a slices object's ``critical_sets`` (``{layer: bool [K, N]}``),
``sliced`` (bool ``[K]``), ``share`` and ``tau``; :class:`~neuslice.Slices` exposes them as methods.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import Tensor

__all__ = ["CATEGORIES", "categories", "similarity", "groups"]

CATEGORIES = ("shared", "group", "specific", "free")



def categories(slices) -> Dict[str, Dict[str, Tensor]]:
    """Per neuron, how many sliced classes it is critical for, as ``{category: {layer: bool [N]}}``."""
    idx = torch.nonzero(slices.sliced).flatten()
    thr = max(2, math.ceil(round(slices.share * len(idx), 9)))
    out: Dict[str, Dict[str, Tensor]] = {c: {} for c in CATEGORIES}
    for name, c in slices.critical_sets.items():
        m = c[idx].sum(0)
        out["shared"][name] = m >= thr
        out["group"][name] = (m >= 2) & (m < thr)
        out["specific"][name] = m == 1
        out["free"][name] = m == 0
    return out


def similarity(slices) -> Tensor:
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


def groups(slices) -> List[List[int]]:
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


