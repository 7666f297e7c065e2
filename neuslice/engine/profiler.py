"""``neuslice.Profiler``: statistics from a user's own training loop, with no extra forward or backward.

Forward hooks keep a reference to each tap (no copy) and hang a tensor hook on it; the tensor hook
reads the gradient of the user's loss as it passes during ``loss.backward()`` and hands both to
``neuslice.ops.accumulate_``. Hooks return nothing, so the gradients the user trains with are never
altered. DeepLIFT here is gradient × Δ (m = g), as the profile records.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from .._errors import NeusliceError, NonFiniteError
from ..ops.reference import acc_dtype
from .capture import (GRADIENT_METRICS, tap_view, call_model, check_labels, check_metrics, check_num_classes,
                      layer_entries, model_device, new_stats, nonfinite_what)
from .graph import discover, head_entries
from .hooks import ChainHooks
from .slices import Profile

__all__ = ["Profiler"]


class Profiler:
    """Profile inside a training loop (docs/method.md §2 with ``target="loss"``: the gradient is the user's loss's).

    Usage::

        with neuslice.Profiler(model, num_classes=10) as prof:
            for x, y in loader:
                with prof.batch(y):              # labels: int [B] (or [B, T] per token)
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                opt.step(); opt.zero_grad()
        profile = prof.profile()

    Only forwards inside ``batch`` are profiled (one forward and one backward per batch). The gradient
    is the user's loss as reduced (a mean over B scales taylor by 1/B). A batch is all-or-nothing: a
    non-finite activation or gradient raises :class:`~neuslice.NonFiniteError` naming the layer when
    the ``batch`` block exits (``on_nonfinite="skip"`` warns and skips it instead, e.g. under AMP).
    ``baseline``: DeepLIFT's reference input as a batch of one, ``[1, ...]``; its activations are computed
    once, at construction (eval mode, no grad); without it the reference is zero.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, layers=None,
                 metrics: Sequence[str] = ("avg", "var", "taylor"), baseline=None,
                 class_names: Optional[Sequence[str]] = None, tap: str = "auto", on_nonfinite: str = "raise"):
        fn = "neuslice.Profiler"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"{fn}: on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.metrics = check_metrics(fn, metrics)
        self.class_names = check_num_classes(fn, num_classes, class_names)
        self.model, self.k, self.on_nonfinite = model, num_classes, on_nonfinite
        self.plan = discover(model, layers, tap=tap, fn=fn)
        self.grad = any(m in GRADIENT_METRICS for m in self.metrics)
        self.refs: List[Optional[Tensor]] = [None] * len(self.plan.layers)
        self.skipped = 0
        self._batch: Optional[_Batch] = None
        self._hooks = None
        self.reset()
        if "deeplift" in self.metrics and baseline is not None:
            self._reference(baseline)
        self._hooks = ChainHooks(model, self.plan.layers, self._on_tap)

    # -- public ---------------------------------------------------------------------------
    def batch(self, labels: Tensor) -> "_Batch":
        """Context for one training step whose forward and ``backward()`` run inside it."""
        if self._hooks is None:
            raise RuntimeError("neuslice.Profiler.batch: the profiler is closed")
        if self._batch is not None:
            raise RuntimeError("neuslice.Profiler.batch: a batch is already open (batches do not nest)")
        return _Batch(self, check_labels("neuslice.Profiler.batch", labels, self.k))

    def profile(self) -> Profile:
        """A snapshot :class:`~neuslice.Profile` (copies) of everything accumulated so far."""
        stats = {n: {s: v.clone() for s, v in st.items()} for n, st in self.totals.items()}
        dl = {i.name: "gradient" for i in self.plan.layers} if "deeplift" in self.metrics else {}
        return Profile(layer_entries(self.plan, dl), self.class_names, stats, metrics=self.metrics, target="loss",
                       deeplift="gradient" if dl else None, num_batches=self.num_batches,
                       coupled=self.plan.coupled, heads=head_entries(self.model, self.plan))

    def reset(self) -> None:
        """Zero the accumulated statistics."""
        dev = model_device(self.model)
        self.totals = {i.name: new_stats(self.k, i.n, torch.float64, dev) for i in self.plan.layers}
        self.num_batches = 0

    def close(self) -> None:
        """Remove every hook (the statistics stay readable)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def __enter__(self) -> "Profiler":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # -- internals --------------------------------------------------------------------------
    def _reference(self, baseline) -> None:
        """Reference activations of ``baseline`` (eval mode, no grad; modes restored)."""
        if not isinstance(baseline, Tensor) or baseline.dim() < 1 or baseline.shape[0] != 1:
            shape = list(baseline.shape) if isinstance(baseline, Tensor) else type(baseline).__name__
            raise ValueError(f"neuslice.Profiler: baseline must be one input as a batch of one, [1, ...], got {shape}")
        x = baseline.to(model_device(self.model))
        got: Dict[int, Tensor] = {}
        training = {m: m.training for m in self.model.modules()}
        hooks = ChainHooks(self.model, self.plan.layers, lambda i, t: got.__setitem__(i, t.detach()))
        try:
            self.model.eval()
            with torch.no_grad():
                call_model(self.model, x)
        finally:
            hooks.remove()
            for m, t in training.items():
                m.training = t
        one = torch.zeros(1, dtype=torch.int64)
        for i, info in enumerate(self.plan.layers):
            if i in got:
                r, cl = tap_view("neuslice.Profiler", info, got[i], one)
                self.refs[i] = (r[0].t() if cl else r[0]).contiguous()

    def _on_tap(self, i: int, t) -> None:
        b = self._batch
        if b is not None:
            b.on_tap(i, t)
        return None


class _Batch:
    """One ``with profiler.batch(labels):`` block; its sums reach the totals only when it ends cleanly."""

    FN = "neuslice.Profiler.batch"

    def __init__(self, prof: Profiler, labels: Tensor):
        self.p, self.labels = prof, labels
        self.stats: Dict[int, Dict[str, Tensor]] = {}
        self.saved: Dict[int, tuple] = {}
        self.seen, self.graded = set(), set()
        self.errors: List[Exception] = []
        self.error_layers: List[int] = []   # layer of each non-finite error: report the first in forward order

    def __enter__(self) -> "_Batch":
        self.p._batch = self
        return self

    def on_tap(self, i: int, t) -> None:
        info = self.p.plan.layers[i]
        if i in self.seen:
            self.errors.append(NeusliceError(f"{self.FN}: layer {info.name!r} ran twice in one batch block; "
                                             "open one block per forward"))
            return
        self.seen.add(i)
        try:
            if self.labels.device != t.device:
                self.labels = self.labels.to(t.device)
            x, cl = tap_view(self.FN, info, t, self.labels)
        except ValueError as e:
            self.errors.append(e)
            return
        x = x.detach()
        if not self.p.grad:
            self._acc(i, x, cl, None)
        elif not t.requires_grad:
            self.errors.append(NeusliceError(f"{self.FN}: layer {info.name!r}'s output (at {info.tap!r}) does not "
                                             "require grad, so no gradient can reach it; unfreeze something "
                                             "upstream or profile without gradient metrics"))
        else:
            self.saved[i] = (x, cl, x._version)
            t.register_hook(self._grad_hook(i))

    def _grad_hook(self, i: int):
        def hook(g: Tensor) -> None:
            if self.p._batch is not self or i not in self.saved:
                return None
            x, cl, version = self.saved.pop(i)
            self.graded.add(i)
            if x._version != version:
                name = self.p.plan.layers[i].name
                self.errors.append(NeusliceError(f"{self.FN}: layer {name!r}'s activation was modified in place "
                                                 "after it was tapped; the profile cannot read it"))
            else:
                self._acc(i, x, cl, g.reshape(x.shape))
            return None
        return hook

    def _acc(self, i: int, x: Tensor, cl: bool, g: Optional[Tensor]) -> None:
        info = self.p.plan.layers[i]
        st = self.stats.setdefault(i, new_stats(self.p.k, info.n, acc_dtype(x.dtype), x.device))
        r = self.p.refs[i]
        r = None if r is None else r.to(device=x.device, dtype=x.dtype)
        try:
            ops.accumulate_(x, g, r, self.labels, cl, st["count"], st["act_sum"], st["act_sq"], st["taylor_sum"],
                            st["deeplift_sum"])
        except NonFiniteError as e:
            self.errors.append(NonFiniteError(f"{self.FN}: layer {info.name!r} (tapped at {info.tap!r}): "
                                              f"{nonfinite_what(e)}; the batch was rejected and no statistic "
                                              "changed"))
            self.error_layers.append(i)

    def _problems(self) -> List[Exception]:
        order = sorted(range(len(self.error_layers)), key=lambda j: self.error_layers[j])
        out = [self.errors[j] for j in order] + [e for e in self.errors if not isinstance(e, NonFiniteError)]
        for i, info in enumerate(self.p.plan.layers):
            if i not in self.seen:
                out.append(NeusliceError(f"{self.FN}: layer {info.name!r} was not tapped at {info.tap!r} in this "
                                         "batch: run the model's forward inside the block"))
            elif self.p.grad and i not in self.graded and not self.errors:
                out.append(NeusliceError(f"{self.FN}: no gradient reached layer {info.name!r} in this batch: call "
                                         "loss.backward() inside the block"))
        return out

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.p._batch = None
        self.saved.clear()
        if exc_type is not None:
            return False
        problems = self._problems()
        if problems:
            if self.p.on_nonfinite == "skip" and all(isinstance(e, NonFiniteError) for e in problems):
                self.p.skipped += 1
                warnings.warn(f"{problems[0]} (skipped; {self.p.skipped} batch(es) skipped so far)", stacklevel=2)
                return False
            raise problems[0]
        dl, grad = "deeplift" in self.p.metrics, self.p.grad
        for i, st in self.stats.items():
            tot = self.p.totals[self.p.plan.layers[i].name]
            for s, v in st.items():
                if (s == "taylor_sum" and not grad) or (s == "deeplift_sum" and not dl):
                    continue
                tot[s].add_(v)
        self.p.num_batches += 1
        return False
