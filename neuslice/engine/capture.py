"""What ``profile`` and ``Profiler`` share: argument checks, calling a model on a batch, the target
whose gradient is taken, and the view of a tapped output that ``neuslice.ops.accumulate_`` reads.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io.container import layer_entry
from .graph import LayerInfo, Plan
from .calls import call_model, logits_of, model_device, to_device  # noqa: F401  (re-exported)
from .metrics import METRICS
from .slices import STATS

GRADIENT_METRICS = ("taylor", "deeplift")


def check_metrics(fn: str, metrics: Sequence[str]) -> Tuple[str, ...]:
    """Validated metric names; ``ens`` implies all four base metrics."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"{fn}: metrics must be a non-empty subset of {METRICS}, got {tuple(metrics)!r}")
    if "ens" in metrics:
        metrics = ("avg", "var", "taylor", "deeplift")
    return tuple(m for m in ("avg", "var", "taylor", "deeplift") if m in metrics)


def check_labels(fn: str, labels, num_classes: int) -> Tensor:
    """``labels`` as int64 ``[B]`` or ``[B, T]`` in ``[0, num_classes)``; raises naming ``fn`` otherwise."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{fn}: labels must be an integer tensor [B] or [B, T], got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: labels must be an integer tensor (class indices), got {labels.dtype}")
    if labels.dim() not in (1, 2):
        raise ValueError(f"{fn}: labels must be [B] (per sample) or [B, T] (per token), got {list(labels.shape)}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{fn}: labels must lie in [0, {num_classes}) (num_classes={num_classes}), "
                             f"got label {bad}")
    return labels.long()


def check_num_classes(fn: str, num_classes, class_names) -> List[str]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{fn}: num_classes must be an int >= 1, got {num_classes!r}")
    if class_names is None:
        return [str(k) for k in range(num_classes)]
    names = [str(c) for c in class_names]
    if len(names) != num_classes or len(set(names)) != num_classes:
        raise ValueError(f"{fn}: class_names must be {num_classes} distinct names, got {names!r}")
    return names


def tap_view(fn: str, info: LayerInfo, t: Tensor, labels: Tensor) -> Tuple[Tensor, bool]:
    """A tapped output as accumulate_'s ``[B, N]``, ``[B, N, S]`` or channels-last ``[B, S, N]``."""
    b, n = labels.shape[0], info.n
    linear = isinstance(info.module, nn.Linear)
    ok = isinstance(t, Tensor) and t.dim() >= 2 and t.shape[0] == b and (t.shape[-1] if linear else t.shape[1]) == n
    if not ok:
        shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
        want = f"[B, ..., N] = [{b}, ..., {n}]" if linear else f"[B, N, ...] = [{b}, {n}, ...]"
        raise ValueError(f"{fn}: layer {info.name!r} (tapped at {info.tap!r}) gave output {shape}; expected {want} "
                         "with B the batch size of the labels")
    if t.dim() == 2:
        x, cl = t, False
    elif linear:
        x, cl = t.reshape(b, -1, n), True
    else:
        x, cl = t.flatten(2), False
    if labels.dim() == 2 and not (cl and x.shape[1] == labels.shape[1]):
        raise ValueError(f"{fn}: per-token labels {list(labels.shape)} need a channels-last layer output "
                         f"[B, T, N] with T = {labels.shape[1]}; layer {info.name!r} gave {list(t.shape)}")
    return x, cl


def join_calls(fn: str, info: LayerInfo, views: Sequence[Tuple[Tensor, bool]], labels: Tensor) -> Tuple[Tensor, bool]:
    """The :func:`tap_view` of each call of a layer in one forward, concatenated along s (docs/method.md
    §2): channels-first ``[B, N, S_1 + S_2 + …]`` (a ``[B, N]`` call counts one position), or
    channels-last ``[B, S_1 + …, N]`` when any call is. One call is returned as it is (no copy)."""
    if len(views) == 1:
        return views[0]
    if labels.dim() == 2:
        raise ValueError(f"{fn}: layer {info.name!r} is called {len(views)} times in one forward, and per-token "
                         f"labels {list(labels.shape)} cannot label the tokens of several calls; choose layers= "
                         f"without {info.name!r}")
    if any(cl for _, cl in views):
        return torch.cat([x if cl else x.unsqueeze(1) for x, cl in views], 1), True
    return torch.cat([x.unsqueeze(2) if x.dim() == 2 else x for x, _ in views], 2), False


def call_views(fn: str, info: LayerInfo, ts: Sequence[Tensor], labels: Tensor,
               grads: Optional[Sequence[Optional[Tensor]]] = None) -> Tuple[Tensor, bool, Optional[Tensor]]:
    """``(x, channels_last, g)``: a layer's taps ``ts`` (one per call) and their gradients joined along s;
    a missing gradient (None: that call does not reach the target) counts as zero."""
    views = [tap_view(fn, info, t, labels) for t in ts]
    x, cl = join_calls(fn, info, views, labels)
    if grads is None:
        return x, cl, None
    gs = [(torch.zeros_like(v) if g is None else g.reshape(v.shape), c) for g, (v, c) in zip(grads, views)]
    return x, cl, join_calls(fn, info, gs, labels)[0]


def check_calls(fn: str, info: LayerInfo, calls: int, taps: int) -> None:
    """Every call of a layer must reach its tap: a call that does not would be left out of the profile."""
    if calls > taps:
        raise RuntimeError(f"{fn}: layer {info.name!r} was called {calls} times in one forward but tapped at "
                           f"{info.tap!r} only {taps} times (tap source: {info.tap_source}); its calls are "
                           "followed by different modules: pass tap='layer' or choose layers= without it")


def warn_unseen(fn: str, plan: Plan, tap: str) -> None:
    """Warn once where a model cannot be traced and a layer is read at its own output: a functional
    nonlinearity after it would go unseen (docs/method.md §1)."""
    names = [i.name for i in plan.layers if i.tap_stage == 0]
    if tap == "auto" and plan.trace_error is not None and not plan.probed and names:
        warnings.warn(f"{fn}: layer(s) {names} are tapped at their own output: the model cannot be traced "
                      f"({plan.trace_error}), so a functional nonlinearity after them (F.relu, torch.tanh, "
                      "x.relu(), …) cannot be seen and avg/var would read its input. Use nonlinearity modules "
                      "(nn.ReLU, …), or pass tap='layer' to read the layer outputs", stacklevel=3)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside ``DistributedDataParallel`` / ``DataParallel`` (docs/method.md §1): hooks go on
    it and layer names carry no ``module.`` prefix, so a profile from the wrapper is the bare model's."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def drop_unused(fn: str, plan: Plan, no_grad: Sequence[str] = (), stacklevel: int = 4) -> Plan:
    """``plan`` without the layers ``no_grad`` (called, but no gradient of the target reaches them), after
    one warning naming those and the Conv/Linear modules never called in forward (docs/method.md §1). Named
    layers (``layers=[...]``) are never dropped: naming an unused one is an error."""
    named = [n for n in no_grad if n in plan.named]
    if named:
        raise ValueError(f"{fn}: layer(s) {named} were named in layers= but no gradient reaches them (their "
                         "output does not reach the loss: unused); choose layers= without them or profile "
                         "without gradient metrics")
    unused = list(plan.unused) + list(no_grad)
    if not unused:
        return plan
    why = [f"never called in forward: {list(plan.unused)}"] if plan.unused else []
    why += [f"called, but no gradient reaches them: {list(no_grad)}"] if no_grad else []
    warnings.warn(f"{fn}: unused layer(s) are excluded and not in the profile ({'; '.join(why)})",
                  stacklevel=stacklevel)
    if not no_grad:
        return plan
    gone = set(no_grad)
    if all(i.name in gone for i in plan.layers):
        raise RuntimeError(f"{fn}: no gradient of the target reached any sliced layer {list(gone)}")
    coupled = [g for g in ([n for n in grp if n not in gone] for grp in plan.coupled) if len(g) > 1]
    return dataclasses.replace(plan, layers=[i for i in plan.layers if i.name not in gone], coupled=coupled,
                               unused=unused)


def nonfinite_what(e: Exception) -> str:
    """The op's finding ("non-finite value in x") without its prefix and suffix."""
    return str(e).split(": ", 1)[-1].split(";")[0]


def new_stats(k: int, n: int, dtype: torch.dtype, device) -> Dict[str, Tensor]:
    return {s: torch.zeros((k,) if s == "count" else (k, n), dtype=dtype, device=device) for s in STATS}


def present_classes(labels: Tensor) -> Tuple[Tensor, Tensor]:
    """``(present, compact)``: the classes in a batch's ``labels`` (sorted, unique, ``[Kp]`` with Kp ≤ B, or
    ≤ B·T per token) and ``labels`` as indices into ``present`` (same shape). A batch accumulates into
    ``new_stats(Kp, ...)`` with the compact labels and is added to the ``[K, N]`` totals by
    :func:`add_present`, so its memory and time do not grow with K (docs/method.md §2)."""
    present, compact = torch.unique(labels, sorted=True, return_inverse=True)
    return present, compact.reshape(labels.shape)


def add_present(totals: Dict[str, Tensor], batch: Dict[str, Tensor], present: Tensor,
                skip: Sequence[str] = ()) -> None:
    """Add a batch's ``[Kp, ...]`` sums into the rows ``present`` of the float64 ``[K, ...]`` totals (each
    row once: the same numbers as adding a ``[K, ...]`` batch buffer whose absent rows are zero)."""
    for s, v in batch.items():
        if s in skip:
            continue
        tot = totals[s]
        tot.index_add_(0, present.to(tot.device), v.to(device=tot.device, dtype=tot.dtype))


def layer_entries(plan: Plan, deeplift: Dict[str, str]) -> List[dict]:
    return [{**layer_entry(i.name, i.module), "n": i.n, "tap": i.tap, "tap_source": i.tap_source,
             "deeplift": deeplift.get(i.name)} for i in plan.layers]


def target_of(fn: str, out, labels: Tensor, target: str) -> Tensor:
    """The scalar whose gradient is taken: Σ_b f_{y_b} (``"logit"``) or Σ_b loss_b (``"loss"``)."""
    if not isinstance(out, Tensor) or out.dim() != labels.dim() + 1 or out.shape[:-1] != labels.shape:
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        want = "[B, K]" if labels.dim() == 1 else "[B, T, K] (per-token labels)"
        raise ValueError(f"{fn}: the model output must be logits {want} matching labels {list(labels.shape)}, "
                         f"got {shape}")
    if int(labels.max()) >= out.shape[-1]:
        raise ValueError(f"{fn}: label {int(labels.max())} has no logit: the model gives {out.shape[-1]} outputs")
    if target == "logit":
        return out.gather(-1, labels.unsqueeze(-1)).sum()
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1), reduction="sum")


def dl_forms(fn: str, plan: Plan, rescale: bool, warn: bool) -> Dict[str, str]:
    """Per layer: ``"rescale"``, or ``"gradient"`` (m = g) where the nonlinearity is functional; warns once."""
    functional = [i.name for i in plan.layers if i.functional]
    if warn and (functional or not rescale):
        names = functional or [i.name for i in plan.layers]
        warnings.warn(f"{fn}: DeepLIFT uses gradient × Δ (m = g) for layer(s) {names}: their nonlinearity is "
                      "a functional call, not a module, so the Rescale rule cannot see it", stacklevel=3)
    return {i.name: ("rescale" if rescale and not i.functional else "gradient") for i in plan.layers}
