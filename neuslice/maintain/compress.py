"""Magnitude compression in prune → fine-tune iterations (optional after restructuring; see docs/method.md).

Prunable: the weights of every Conv/Linear layer. Each iteration lowers the density (kept fraction of the
*reference* parameters: the original model's for a :class:`RestructuredModel`) by the factor
``1 - step``, clamped at ``1 - sparsity``; the last iteration lands on the target. Which weights go is
decided by the layerwise allocation ``method``:

- ``global``: one magnitude threshold over all layers.
- ``uniform+``: the same density in every layer, except the first layer stays dense and the last keeps at
  least 20% (Gale et al. 2019).
- ``erk``: Erdős–Rényi-Kernel densities ∝ (Σ dims) / (Π dims) of each weight (Evci et al. 2020).
- ``lamp``: a global threshold on LAMP scores w_u² / Σ_{|w_v| ≥ |w_u|} w_v² within the layer (Lee et al. 2021).

Pruned weights are zeroed and stay zero: fine-tuning steps go through ``ops.masked_sgd_`` /
``masked_adamw_`` with the per-weight masks.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.graph import LAYER_TYPES
from ..engine.capture import call_model
from . import _common as C
from .restructure import RestructuredModel

__all__ = ["METHODS", "CompressReport", "compress", "allocate"]

METHODS = ("global", "uniform+", "erk", "lamp")


@dataclass
class CompressReport(C.Report):
    """Numbers of one :func:`compress` run; accuracies are fractions in [0, 1]."""
    method: str
    target: float
    compression_rate: float
    weight_sparsity: float
    iterations: int
    reference_params: int
    accuracy_before: float
    accuracy_after: float
    history: List[Tuple[int, float, float]] = field(default_factory=list)   # (iteration, rate, accuracy)


def _lamp(w: Tensor, alive: Tensor) -> Tensor:
    s = torch.where(alive, w.detach().abs().flatten().double() ** 2, torch.zeros((), dtype=torch.float64))
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    tail = sorted_s.flip(0).cumsum(0).flip(0)          # Σ of the scores at or above each position
    out = torch.empty_like(s)
    out[order] = sorted_s / tail.clamp_min(1e-300)
    return out


def _top(scores: Tensor, alive: Tensor, k: int) -> Tensor:
    """bool mask of the ``k`` highest ``scores`` among ``alive`` (ties: lower index first)."""
    s = torch.where(alive, scores.double(), torch.full_like(scores, -1.0, dtype=torch.float64))
    keep = torch.zeros_like(alive)
    if k > 0:
        keep[torch.argsort(-s, stable=True)[:k]] = True
    return keep & alive


def _per_layer(densities: List[float], sizes: List[int]) -> List[int]:
    return [min(n, math.floor(d * n)) for d, n in zip(densities, sizes)]


def _solve(keep_total: int, sizes: List[int], density_of) -> List[int]:
    """Per-layer keep counts from ``density_of(x) -> [density per layer]`` (monotone in x), the largest x
    whose total stays within ``keep_total``, by bisection."""
    lo, hi = 0.0, 1.0
    while sum(_per_layer(density_of(hi), sizes)) < keep_total and hi < 1e12:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(_per_layer(density_of(mid), sizes)) <= keep_total:
            lo = mid
        else:
            hi = mid
    return _per_layer(density_of(lo), sizes)


def allocate(method: str, weights: List[Tensor], alive: List[Tensor], keep_total: int) -> List[Tensor]:
    """New keep masks (each ``bool`` like its weight, a subset of ``alive``) keeping at most ``keep_total``
    weights in all, allocated across layers by ``method``."""
    flat = [w.detach().flatten() for w in weights]
    live = [a.flatten() for a in alive]
    sizes = [w.numel() for w in flat]
    if method in ("global", "lamp"):
        scores = [_lamp(w, a) if method == "lamp" else w.abs().double() for w, a in zip(flat, live)]
        keep = _top(torch.cat(scores), torch.cat(live), keep_total)
        return [k.view(w.shape) for k, w in zip(torch.split(keep, sizes), weights)]
    if method == "erk":
        raw = [sum(w.shape) / w.numel() for w in weights]
        counts = _solve(keep_total, sizes, lambda x: [min(1.0, x * r) for r in raw])
    else:
        last = len(sizes) - 1
        counts = _solve(keep_total, sizes, lambda x: [1.0 if i == 0 and last > 0 else
                                                      max(min(x, 1.0), 0.2) if i == last else min(x, 1.0)
                                                      for i in range(len(sizes))])
    return [_top(w.abs(), a, c).view(wt.shape) for w, a, c, wt in zip(flat, live, counts, weights)]


def _prunable(model: nn.Module) -> List[Tuple[str, Tensor]]:
    return [(f"{n}.weight" if n else "weight", m.weight) for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and isinstance(getattr(m, "weight", None), Tensor)]


def _loss(model, x, y):
    out = call_model(model, x)
    target = model.targets(y) if isinstance(model, RestructuredModel) else y
    return F.cross_entropy(out, target.to(out.device))


def _predict(model):
    if isinstance(model, RestructuredModel):
        return model.predict
    return lambda x: call_model(model, x).argmax(-1)


def _check(fn, model, sparsity, method, step, epochs, lr, optimizer, reference_params):
    C.check_module(fn, model)
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}")
    for name, v in (("sparsity", sparsity), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
            raise ValueError(f"{fn}: {name} must lie in (0, 1), got {v!r}")
    C.check_training(fn, epochs, lr, optimizer, zero_epochs=True)
    ref = reference_params if reference_params is not None else \
        model.original_params if isinstance(model, RestructuredModel) else C.param_count(model)
    if isinstance(ref, bool) or not isinstance(ref, int) or ref < C.param_count(model):
        raise ValueError(f"{fn}: reference_params must be an int >= the model's {C.param_count(model)} "
                         f"parameters, got {ref!r}")
    weights = _prunable(model)
    if not weights:
        raise ValueError(f"{fn}: the model has no Conv or Linear weight to prune")
    removed = ref - C.param_count(model)
    need = math.ceil(round(sparsity * ref, 6)) - removed
    pool = sum(w.numel() for _, w in weights) - (weights[0][1].numel() if method == "uniform+" else 0)
    if need > pool - (math.ceil(0.2 * weights[-1][1].numel()) if method == "uniform+" else 0):
        raise ValueError(f"{fn}: sparsity {sparsity} needs {need} more zero weights of the {ref} reference "
                         f"parameters, but method {method!r} can prune at most "
                         f"{pool - (math.ceil(0.2 * weights[-1][1].numel()) if method == 'uniform+' else 0)}")
    return ref, removed


def compress(model: nn.Module, data, sparsity: float, *, method: str = "global", step: float = 0.2,
             epochs: int = 1, lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9,
             weight_decay: float = 0.0, eval_data=None, reference_params: Optional[int] = None,
             seed: int = 0) -> Tuple[nn.Module, CompressReport]:
    """Prune ``model`` by magnitude to ``sparsity`` of its reference parameters, fine-tuning after each step.

    Args:
        model: a classifier or a :class:`RestructuredModel` (labels then map through its class map); never
            modified. data: ``(inputs, labels int64 [B])`` batches to fine-tune on.
        sparsity: target compression rate in (0, 1): removed (physically, against ``reference_params``) plus
            zeroed parameters over ``reference_params`` (default: the original model's count for a
            RestructuredModel, else the model's own).
        method: ``global``, ``uniform+``, ``erk`` or ``lamp``. step: the density falls by ``1 - step`` per
            iteration.
        epochs, lr, optimizer (``"sgd"`` or ``"adamw"``), momentum (sgd), weight_decay: fine-tuning per
            iteration; ``epochs=0`` prunes without fine-tuning. The defaults differ from the other operators'
            (AdamW at 1e-3) on purpose: SGD with momentum at 0.01 is the prune → fine-tune recipe the README's
            compression results were measured with (bench/eval_maintenance.py), kept so that existing calls
            give what they gave.
        eval_data: held-out data of the task ``model`` serves, scored before and after each iteration
            (default: ``data``, since the report's history needs an accuracy after every iteration).
        reference_params: see ``sparsity``.
        seed: seeds the fine-tuning of the first iteration (``seed + i`` for iteration ``i``).

    Returns:
        ``(pruned copy in eval mode, CompressReport)``.
    """
    fn = "neuslice.compress"
    ref, removed = _check(fn, model, sparsity, method, step, epochs, lr, optimizer, reference_params)
    C.scan_labels(fn, data, model.class_map.tolist() if isinstance(model, RestructuredModel) else None, "data")
    new = copy.deepcopy(model).eval()
    weights = _prunable(new)
    names = [n for n, _ in weights]
    alive = [torch.ones(w.shape, dtype=torch.bool, device=w.device) for _, w in weights]
    evald = data if eval_data is None else eval_data
    acc0 = C.evaluate(_predict(new), evald)
    density, goal = 1.0 - removed / ref, 1.0 - sparsity
    history, it = [], 0
    while density > goal + 1e-12:
        density = max(density * (1.0 - step), goal)
        keep_total = _keep_total(density, ref, new, weights)
        alive = allocate(method, [w for _, w in weights], alive, keep_total)
        with torch.no_grad():
            for (_, w), a in zip(weights, alive):
                w.mul_(a)
        masks = {n: None for n, _ in new.named_parameters()}
        masks.update({n: a for n, a in zip(names, alive)})
        if epochs:
            C.fit_masked(new, data, masks, epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, loss_fn=_loss, seed=seed + it)
        it += 1
        history.append((it, _rate(new, ref, alive), C.evaluate(_predict(new), evald)))
    acc = history[-1][2] if history else acc0
    zeros = sum(int((~a).sum()) for a in alive)
    return new, CompressReport(method, float(sparsity), _rate(new, ref, alive), zeros / sum(a.numel() for a in alive),
                               it, ref, acc0, acc, history)


def _keep_total(density: float, ref: int, model: nn.Module, weights) -> int:
    """Prunable weights to keep so that (kept parameters) ≤ density × ref."""
    other = C.param_count(model) - sum(w.numel() for _, w in weights)
    return max(0, math.floor(round(density * ref - other, 6)))


def _rate(model: nn.Module, ref: int, alive: List[Tensor]) -> float:
    zeros = sum(int((~a).sum()) for a in alive)
    return (ref - C.param_count(model) + zeros) / ref
