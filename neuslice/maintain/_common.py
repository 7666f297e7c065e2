"""Pieces the maintenance operators share: argument checks, label checks, the masked training loop
(every optimizer step goes through ``neuslice.ops.masked_sgd_`` / ``masked_adamw_``), norm-statistics
guards, accuracy, the reports' base and the renamed-keyword shim.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .. import ops
from ..engine.graph import NORMS, LayerInfo, Plan, discover
from ..engine.evaluate import accuracy, restricted_predict
from ..engine.capture import call_model
from ..engine.hooks import per_neuron
from ..engine.slices import Slices

__all__ = ["check_module", "check_slices", "plan_of", "head_module", "scan_labels", "fit_masked", "NormGuard",
           "param_count", "evaluate", "head_inputs", "check_positive", "check_training", "chain_norms", "rebind",
           "restricted_predict", "score", "Report", "renamed_kwargs", "with_replay", "TrainStep", "on_train_step"]


def renamed_kwargs(fn: str, **renames: str):
    """Decorator: the operator ``fn`` still accepts each old keyword (``old="new"``) for one release, warning
    with a DeprecationWarning and passing the value on under its new name; giving both is a TypeError."""
    def deco(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn}: got both {old!r} (deprecated) and {new!r}; pass only {new!r}")
                    warnings.warn(f"{fn}: the keyword {old!r} is deprecated and will be removed in the next release; "
                                  f"use {new!r}", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return f(*args, **kwargs)
        return wrapper
    return deco


class Report:
    """Base of the operators' report dataclasses: ``as_dict()`` (plain values, JSON-ready)."""

    def as_dict(self) -> dict:
        return asdict(self)


def check_module(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def check_slices(fn: str, slices, model: nn.Module) -> None:
    """``slices`` must be a :class:`Slices` made for ``model`` (SignatureError naming the layer otherwise)."""
    if not isinstance(slices, Slices):
        raise TypeError(f"{fn}: slices must be a neuslice.Slices, got {type(slices).__name__}")
    slices.check_model(fn, model)


def check_positive(fn: str, name: str, value, *, integer: bool = False, zero: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        kind = "an int" if integer else "a finite number"
        raise ValueError(f"{fn}: {name} must be {kind} {'>= 0' if zero else '> 0'}, got {value!r}")


def check_training(fn: str, epochs, lr, optimizer, *, zero_epochs: bool = False) -> None:
    """``epochs`` an int > 0 (>= 0 with ``zero_epochs``), ``lr`` a finite number > 0, ``optimizer`` sgd/adamw."""
    check_positive(fn, "epochs", epochs, integer=True, zero=zero_epochs)
    check_positive(fn, "lr", lr)
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"{fn}: optimizer must be 'sgd' or 'adamw', got {optimizer!r}")


def rebind(plan: Plan, module: nn.Module) -> List[LayerInfo]:
    """Copies of ``plan.layers`` whose ``module`` is the same-named module of ``module`` (a deep copy)."""
    mods = dict(module.named_modules())
    infos = [copy.copy(i) for i in plan.layers]
    for info in infos:
        info.module = mods[info.name]
    return infos


def plan_of(fn: str, slices: Slices, model: nn.Module, run: Optional[Callable[[], object]] = None) -> Plan:
    """The sliced layers of ``model`` named by ``slices``, with chains and consumers (see ``_graph``); ``run``
    (one forward of real inputs) lets discovery watch the model where tracing fails."""
    return discover(model, slices.layer_names, fn=fn, run=run)


def head_module(fn: str, plan: Plan, model: nn.Module, num_classes: int) -> Tuple[str, nn.Linear]:
    """The classifier head: the one Linear whose output is the model's output, with ``num_classes`` rows."""
    modules = dict(model.named_modules())
    heads = [h for h in plan.heads if isinstance(modules[h], nn.Linear)]
    if len(heads) != 1:
        raise ValueError(f"{fn}: expected one Linear classifier head producing the logits, found {heads or 'none'} "
                         f"(trace: {plan.trace_error or 'ok'})")
    head = modules[heads[0]]
    if head.out_features != num_classes:
        raise ValueError(f"{fn}: the head {heads[0]!r} has {head.out_features} outputs but the slices have "
                         f"{num_classes} classes; profile with the model's class count (neuslice.profile(..., "
                         f"num_classes={head.out_features}), or `neuslice profile`, which takes it from the head), "
                         "then slice again")
    return heads[0], head


def head_inputs(plan: Plan, head_name: str) -> List[str]:
    """The sliced layers that feed the head ``head_name`` directly."""
    return [i.name for i in plan.layers if any(c == head_name for c, _ in i.consumers)]


def chain_norms(plan: Plan, model: nn.Module) -> Dict[str, Tuple[str, nn.Module]]:
    """``{norm module name: (sliced layer name, module)}`` for the BatchNorms in the sliced layers' chains."""
    modules = dict(model.named_modules())
    out = {}
    for info in plan.layers:
        for name in info.chain[1:]:
            m = modules[name]
            if isinstance(m, NORMS) and m.num_features == info.n:
                out[name] = (info.name, m)
    return out


def scan_labels(fn: str, data: Iterable, allowed: Optional[Sequence[int]], what: str) -> List[int]:
    """Iterate ``data`` once, before training: it must yield ``(inputs, labels int [B])`` with every label in
    ``allowed`` (None: any label >= 0). Returns the sorted labels present. (Per batch, inside a profiling
    pass, labels are checked by :func:`neuslice.engine.capture.check_labels` instead.)"""
    allowed_t = None if allowed is None else torch.as_tensor(sorted(set(int(a) for a in allowed)), dtype=torch.int64)
    seen, n = set(), 0
    for batch in data:
        if not (isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[1], Tensor)):
            raise ValueError(f"{fn}: {what} must yield (inputs, labels) pairs with labels an int64 tensor [B], "
                             f"got {type(batch).__name__}")
        y = batch[1]
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
            raise ValueError(f"{fn}: {what} labels must be an integer tensor [B], got {y.dtype} {list(y.shape)}")
        bad = (y.long().cpu() < 0) if allowed_t is None else ~torch.isin(y.long().cpu(), allowed_t)
        if bool(bad.any()):
            raise ValueError(f"{fn}: {what} has label {int(y[bad][0])}, outside the declared classes "
                             f"{'>= 0' if allowed_t is None else allowed_t.tolist()}")
        seen |= set(y.tolist())
        n += y.numel()
    if n == 0:
        raise ValueError(f"{fn}: {what} yielded no sample")
    return sorted(seen)


def _tensors(fn: str, data, what: str) -> Tuple[Tensor, Tensor]:
    xs, ys = [], []
    for x, y in data:
        if not isinstance(x, Tensor):
            raise TypeError(f"{fn}: with replay, {what} inputs must be tensors, got {type(x).__name__}")
        xs.append(x)
        ys.append(y.long())
    return torch.cat(xs), torch.cat(ys)


def with_replay(fn: str, data, replay_data, count: Callable[[int, int], int], seed: int
                ) -> Tuple[DataLoader, int]:
    """``data``'s samples plus ``n = count(new samples, old samples)`` samples of ``replay_data`` (drawn without
    replacement by a generator seeded with ``seed``), reshuffled (same seed) in batches of ``data``'s first batch
    size. Returns ``(loader, n)``; ValueError if ``replay_data`` has fewer than ``n`` samples or another input
    shape."""
    xb, yb = _tensors(fn, data, "data")
    xa, ya = _tensors(fn, replay_data, "replay_data")
    if xa.shape[1:] != xb.shape[1:]:
        raise ValueError(f"{fn}: replay_data inputs have shape {list(xa.shape[1:])} per sample, data's "
                         f"{list(xb.shape[1:])}")
    n = count(len(yb), len(ya))
    if n > len(ya):
        raise ValueError(f"{fn}: replay needs {n} old samples but replay_data has {len(ya)}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ya), generator=g)[:n]
    bs = next(iter(data))[1].shape[0]
    ds = TensorDataset(torch.cat([xb, xa[pick]]), torch.cat([yb, ya[pick]]))
    return DataLoader(ds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed)), n


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class NormGuard:
    """During training, frozen BatchNorm channels compute as in eval mode and keep their running statistics
    bit-identical.

    ``frozen``: ``{norm module: bool [C]}`` (True = frozen channel; a norm not named is all frozen). A norm
    whose channels are all frozen runs in eval mode. A mixed one trains; a forward hook replaces its frozen
    channels' output by the eval-mode normalisation with their (unchanged) running statistics, so what the
    trainable parts learn from sees the frozen channels as inference will; :meth:`restore` copies the frozen
    channels' ``running_mean``/``running_var`` and ``num_batches_tracked`` back after each step.
    """

    def __init__(self, model: nn.Module, frozen: Dict[nn.Module, Tensor]):
        self.saved = []
        self._handles = []
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                f = frozen.get(m, torch.ones(m.num_features, dtype=torch.bool)).to(m.running_mean.device)
                bufs = {k: getattr(m, k).detach().clone() for k in ("running_mean", "running_var", "num_batches_tracked")
                        if getattr(m, k, None) is not None}
                self.saved.append((m, f, bufs))

    def train_mode(self) -> None:
        for m, f, bufs in self.saved:
            if bool(f.all()):
                m.eval()
            elif bool(f.any()):
                self._handles.append(m.register_forward_hook(self._hook(f, bufs)))

    @staticmethod
    def _hook(frozen: Tensor, bufs: Dict[str, Tensor]):
        def hook(m, args, out):
            if not m.training:
                return None
            ev = F.batch_norm(args[0], bufs["running_mean"], bufs["running_var"], m.weight, m.bias, False, 0.0, m.eps)
            return torch.where(per_neuron(frozen, out, last=False), ev, out)
        return hook

    @torch.no_grad()
    def restore(self) -> None:
        for m, f, bufs in self.saved:
            for k, v in bufs.items():
                b = getattr(m, k)
                b.copy_(v if k == "num_batches_tracked" else torch.where(f, v, b))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class TrainStep:
    """What :func:`fit_masked` tells its step callback after each optimizer step: the epoch (1-based) of
    ``epochs``, the step (1-based) within the epoch of ``steps`` (None when the data has no length), and the
    step's loss."""
    epoch: int
    epochs: int
    step: int
    steps: Optional[int]
    loss: float


_ON_STEP: ContextVar[Optional[Callable[[TrainStep], None]]] = ContextVar("neuslice_on_train_step", default=None)


@contextmanager
def on_train_step(callback: Callable[[TrainStep], None]):
    """Within the ``with`` block, every training loop of the maintenance operators (finetune, compress, readapt,
    incremental) calls ``callback(TrainStep)`` after each optimizer step, e.g. to show the epoch and the loss::

        with neuslice.maintain.on_train_step(lambda s: print(s.epoch, s.step, s.loss)):
            neuslice.finetune(model, data, epochs=3)
    """
    token = _ON_STEP.set(callback)
    try:
        yield callback
    finally:
        _ON_STEP.reset(token)


def _step(opt: str, p: Tensor, mask: Tensor, state: dict, lr: float, momentum: float, weight_decay: float,
          step: int) -> None:
    g = p.grad
    if opt == "sgd":
        buf = state.setdefault("buf", torch.zeros_like(p))
        ops.masked_sgd_(p.data, g, buf, mask, lr, momentum, weight_decay)
    else:
        ea = state.setdefault("exp_avg", torch.zeros_like(p))
        eas = state.setdefault("exp_avg_sq", torch.zeros_like(p))
        ops.masked_adamw_(p.data, g, ea, eas, mask, lr, 0.9, 0.999, 1e-8, weight_decay, step)


def fit_masked(model: nn.Module, data: Iterable, masks: Dict[str, Optional[Tensor]], *, epochs: int, lr: float,
               optimizer: str = "adamw", momentum: float = 0.9, weight_decay: float = 0.0,
               loss_fn: Callable[[nn.Module, object, Tensor], Tensor] = None,
               frozen_norms: Optional[Dict[nn.Module, Tensor]] = None, seed: int = 0,
               on_step: Optional[Callable[[TrainStep], None]] = None) -> int:
    """Train ``model`` in place; returns the number of optimizer steps.

    ``masks``: ``{parameter name: bool mask}`` with the mask ``[param.shape[0]]`` (per neuron),
    ``param.shape`` (per weight) or None (all trainable). Parameters not named are frozen: no step at all.
    Every step is ``ops.masked_sgd_`` or ``ops.masked_adamw_``, so frozen entries and their optimizer
    state never move. ``loss_fn(model, inputs, labels)`` gives the scalar loss (cross-entropy by default).
    ``frozen_norms``: see :class:`NormGuard`; None freezes nothing. ``on_step(TrainStep)`` is called after each
    step (default: the callback of an enclosing :func:`on_train_step`, if any).
    """
    on_step = on_step or _ON_STEP.get()
    per_epoch = len(data) if hasattr(data, "__len__") else None
    params = dict(model.named_parameters())
    full = {n: (torch.ones(params[n].shape[0], dtype=torch.bool, device=params[n].device) if m is None
                else m.to(params[n].device)) for n, m in masks.items()}
    train = {n: m for n, m in full.items() if bool(m.any())}
    flags = {n: p.requires_grad for n, p in params.items()}
    guard = NormGuard(model, frozen_norms) if frozen_norms is not None else None
    loss_fn = loss_fn or _cross_entropy
    states: Dict[str, dict] = {n: {} for n in train}
    steps = 0
    try:
        for n, p in params.items():
            p.requires_grad_(n in train)
        model.train()
        if guard is not None:
            guard.train_mode()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for epoch in range(1, epochs + 1):
                for i, (x, y) in enumerate(data, 1):
                    for p in params.values():
                        p.grad = None
                    loss = loss_fn(model, x, y)
                    loss.backward()
                    steps += 1
                    for n, m in train.items():
                        if params[n].grad is not None:
                            _step(optimizer, params[n], m, states[n], lr, momentum, weight_decay, steps)
                    if guard is not None:
                        guard.restore()
                    if on_step is not None:
                        on_step(TrainStep(epoch, epochs, i, per_epoch, float(loss.detach())))
    finally:
        if guard is not None:
            guard.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
        model.eval()
    return steps


def _cross_entropy(model: nn.Module, x, y: Tensor) -> Tensor:
    out = call_model(model, x)            # moves the inputs to the model's device
    return F.cross_entropy(out, y.to(out.device))


evaluate = accuracy   # the one accuracy function, under the name the operators' reports use


def score(predict: Callable[[object], Tensor], data, classes=None) -> Optional[float]:
    """``evaluate(predict, data, classes)``, or None when ``data`` is None (no evaluation data given)."""
    return None if data is None else evaluate(predict, data, classes)
