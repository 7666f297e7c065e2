"""``neuslice.Profiler``: statistics from a user's own training loop, with no extra forward or backward.

Forward hooks keep a reference to each tap (no copy) and hang a tensor hook on it; the tensor hook
reads the gradient of the user's loss as it passes during ``loss.backward()`` and hands both to
``neuslice.ops.accumulate_``. Hooks return nothing, so the gradients the user trains with are never
altered. DeepLIFT here is gradient × Δ (m = g), as the profile records.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from .._errors import NeusliceError, NonFiniteError
from ..ops.reference import acc_dtype
from .capture import (GRADIENT_METRICS, StatusWords, add_present_all, at_path, call_model, call_valid, call_views,
                      check_calls, compiled_hint, find_attention_mask, path_name, warn_ambiguous_masks,
                      check_ignore_index, check_labels, check_mask, check_metrics, check_num_classes,
                      compact_ignore, drop_unused, layer_entries, mask_facts, model_device, new_stats, new_totals,
                      nonfinite_what, present_classes, ref_positions_error, shared_ref, tap_view, unwrap,
                      warn_unmasked, warn_unseen)
from .graph import discover, head_entries, traceable
from .hooks import ChainHooks, compiler_loaded, eager, in_backward
from .metrics import kept_stats
from .slices import Profile

__all__ = ["Profiler"]


class Profiler:
    """Profile inside a training loop (docs/method.md §2 with ``target="loss"``: the gradient is the user's loss's).

    Usage::

        with neuslice.Profiler(model, num_classes=10) as prof:
            for x, y in loader:
                with prof.batch(y):              # labels: int [B] (or [B, T] per token); mask= for padding
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

    A model that cannot be traced is probed once (docs/method.md §1): with ``baseline`` at construction (and again
    on a first batch of two samples or more where a layer folds the batch, whose order one sample cannot show),
    otherwise by one extra forward (eval mode, no grad) of the first batch's input, when its forward
    starts; the layers, their call counts and the head come from it. A layer called more than once per
    forward is accumulated over all its calls when the block ends (docs/method.md §2).

    Training loops as users write them (docs/method.md §1, §2): a model wrapped in ``DistributedDataParallel``
    (or ``DataParallel``) is profiled as the bare model (names without ``module.``; merge ranks with
    :meth:`~neuslice.Profile.all_reduce`); blocks recomputed by gradient checkpointing count once; under
    ``torch.autocast`` the statistics still accumulate in float32 and float64. Layers that are never called,
    or that no gradient reaches in the first batch, are left out with one warning.

    Positions that do not count (docs/method.md §2): ``batch(y, mask=...)`` (bool ``[B, T]``, True = the
    position counts), or else the ``attention_mask`` the model's forward receives (the Hugging Face
    convention), leaves padding out of every tap ``[B, T, N]``; labels equal to ``ignore_index`` (default −100)
    are skipped (your loss should skip them too, e.g. ``F.cross_entropy(..., ignore_index=-100)``). Only the
    statistics the metrics need are kept.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, layers=None,
                 metrics: Sequence[str] = ("avg", "var", "taylor"), baseline=None,
                 class_names: Optional[Sequence[str]] = None, tap: str = "auto", on_nonfinite: str = "raise",
                 ignore_index: int = -100):
        fn = "neuslice.Profiler"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"{fn}: on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self._compiled = compiled_hint(model)
        model = unwrap(model)
        self.metrics = check_metrics(fn, metrics)
        self.ignore_index = check_ignore_index(fn, ignore_index)
        self.keep = kept_stats(self.metrics)
        self._warned_mask = False
        self._warned_masks = False      # several attention masks among the forward's arguments: warned once
        try:
            self._forward_sig: Optional[inspect.Signature] = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._forward_sig = None
        self.class_names = check_num_classes(fn, num_classes, class_names)
        self.model, self.k, self.on_nonfinite = model, num_classes, on_nonfinite
        self.grad = any(m in GRADIENT_METRICS for m in self.metrics)
        self.skipped = 0
        self._batch: Optional[_Batch] = None
        self._hooks: Optional[ChainHooks] = None
        self._discover = lambda run=None: discover(model, layers, tap=tap, fn=fn, run=run)
        self._baseline = baseline if "deeplift" in self.metrics else None
        self._probing, self._tap = False, tap
        self.plan, self._root = None, None
        if baseline is not None:
            self._check_baseline(baseline)
        if traceable(model):
            self._start(self._discover())
        elif baseline is not None:
            self._start(self._discover(lambda: call_model(model, baseline.to(model_device(model)))))
        else:
            self.reset()
        self._root = model.register_forward_pre_hook(eager(self._on_forward), with_kwargs=True)
        self._root_eager = compiler_loaded()

    # -- public ---------------------------------------------------------------------------
    def batch(self, labels: Tensor, mask: Optional[Tensor] = None) -> "_Batch":
        """Context for one training step whose forward and ``backward()`` run inside it. ``mask``: bool
        ``[B, T]``, the positions that count (default: the ``attention_mask`` the forward receives, if any)."""
        fn = "neuslice.Profiler.batch"
        if self._root is None:
            raise RuntimeError(f"{fn}: the profiler is closed")
        if self._batch is not None:
            raise RuntimeError(f"{fn}: a batch is already open (batches do not nest)")
        labels, host = check_labels(fn, labels, self.k, self.ignore_index)
        if compiler_loaded() and not self._root_eager:
            self._rewrap()
        return _Batch(self, labels, host, None if mask is None else check_mask(fn, mask, labels))

    def _rewrap(self) -> None:
        """Hooks made before dynamo was imported are plain functions (hooks.eager): made again, wrapped, before a
        compiled model can trace them (torch.compile imports dynamo; it traces at the first call)."""
        self._root.remove()
        self._root = self.model.register_forward_pre_hook(eager(self._on_forward), with_kwargs=True)
        self._root_eager = True
        if self._hooks is not None and not self._hooks.eager:
            self._hooks.remove()
            self._hooks = ChainHooks(self.model, self.plan.layers, self._on_tap)

    def profile(self) -> Profile:
        """A snapshot :class:`~neuslice.Profile` (copies) of everything accumulated so far."""
        if self.plan is None:
            raise NeusliceError("neuslice.Profiler.profile: no batch was profiled yet; the model cannot be traced, "
                                "so its layers are found on the first batch (or pass baseline=)")
        stats = {n: {s: v.clone() for s, v in st.items()} for n, st in self.totals.items()}
        dl = {i.name: "gradient" for i in self.plan.layers} if "deeplift" in self.metrics else {}
        return Profile(layer_entries(self.plan, dl), self.class_names, stats, metrics=self.metrics, target="loss",
                       deeplift="gradient" if dl else None, num_batches=self.num_batches,
                       coupled=self.plan.coupled, heads=head_entries(self.model, self.plan),
                       attention=self.plan.attention)

    def reset(self) -> None:
        """Zero the accumulated statistics."""
        dev = model_device(self.model)
        layers = self.plan.layers if self.plan is not None else []
        self.totals = {i.name: new_totals(self.k, i.n, dev, self.keep) for i in layers}
        # per layer name: ((Kp, dtype, device), zeroed batch buffers) left by the last committed batch, so a
        # batch with the same classes present allocates and zeroes nothing per layer (zeroed in one call)
        self._spare: Dict[str, Tuple[tuple, Dict[str, Tensor]]] = {}
        self.num_batches = 0

    def close(self) -> None:
        """Remove every hook (the statistics stay readable)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._root is not None:
            self._root.remove()
            self._root = None

    def __enter__(self) -> "Profiler":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # -- internals --------------------------------------------------------------------------
    def _start(self, plan) -> None:
        """Adopt ``plan``: warn about unseen nonlinearities, zero the totals, reference, tap hooks."""
        self.plan = plan
        warn_unseen("neuslice.Profiler", plan, self._tap)
        self.refs: List[Optional[Tensor]] = [None] * len(plan.layers)
        self.reset()
        if self._baseline is not None:
            self._reference(self._baseline)
        self._hooks = ChainHooks(self.model, plan.layers, self._on_tap)

    def _on_forward(self, module, args, kwargs):
        """Root pre-hook: counts the forwards of an open batch; probes an untraceable model on the first."""
        b = self._batch
        if self._probing or b is None:
            return None
        if self.plan is None or (self.num_batches == 0 and b.forwards == 0 and self._unordered_folds()
                                 and b.labels.shape[0] > 1):
            # (a plan probed on the batch-of-one baseline cannot show the order of a batch fold, docs/method.md §1:
            # the first batch of two samples or more probes again, before anything is accumulated)
            if self._hooks is not None:
                self._hooks.remove()
                self._hooks = None
            self._probing = True
            try:
                self._start(self._discover(lambda: self.model(*args, **kwargs)))
            finally:
                self._probing = False
        b.forwards += 1
        if b.mask is None and b.forwards == 1:
            try:
                got = self._attention_mask(args, kwargs, b)
                if got is not None:
                    b.set_mask(*got)
            except (TypeError, ValueError) as e:        # reported when the block ends; the batch is rejected
                b.errors.append(e)
        return None

    def _unordered_folds(self) -> bool:
        """Some layer's batch fold came from a probe of one sample, which cannot show its order."""
        return self.plan is not None and any(i.fold > 1 and not i.fold_ordered for i in self.plan.layers)

    def _attention_mask(self, args, kwargs, b: "_Batch") -> Optional[Tuple[Tensor, Tensor]]:
        """The attention mask the forward receives, checked, and its host copy; or None: the ``attention_mask``
        argument (by name or position), or one in a mapping among the arguments (capture.find_attention_mask;
        several: none, and their paths kept for the block's warning)."""
        named = self._named_arguments(args, kwargs)
        path, b.several_masks = find_attention_mask(named)
        if path is None:
            return None
        return check_mask(_Batch.FN, at_path(named, path), b.labels, path_name(path))

    def _named_arguments(self, args, kwargs) -> dict:
        """The forward's arguments by parameter name (``**kwargs`` flattened in; positions as ints when the
        signature is unknown or does not bind)."""
        sig = self._forward_sig
        if sig is not None:
            try:
                bound = sig.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = None
            if bound is not None:
                out: dict = {}
                for name, v in bound.items():
                    if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                        out.update(v)
                    else:
                        out[name] = v
                return out
        out = dict(kwargs)
        out.update(enumerate(args))
        return out

    def _narrow(self, plan) -> None:
        """Adopt ``plan``, the current one without its unused layers (after the first batch)."""
        keep = {i.name for i in plan.layers}
        self.refs = [r for r, i in zip(self.refs, self.plan.layers) if i.name in keep]
        self.totals = {n: st for n, st in self.totals.items() if n in keep}
        self._spare = {n: v for n, v in self._spare.items() if n in keep}
        self._hooks.remove()
        self.plan = plan
        self._hooks = ChainHooks(self.model, plan.layers, self._on_tap)

    @staticmethod
    def _check_baseline(baseline) -> None:
        if not isinstance(baseline, Tensor) or baseline.dim() < 1 or baseline.shape[0] != 1:
            shape = list(baseline.shape) if isinstance(baseline, Tensor) else type(baseline).__name__
            raise ValueError(f"neuslice.Profiler: baseline must be one input as a batch of one, [1, ...], got {shape}")

    def _reference(self, baseline) -> None:
        """Reference activations of ``baseline`` (eval mode, no grad; modes restored), every call joined."""
        x = baseline.to(model_device(self.model))
        got: Dict[int, List[Tensor]] = {}
        training = {m: m.training for m in self.model.modules()}
        hooks = ChainHooks(self.model, self.plan.layers, lambda i, t: got.setdefault(i, []).append(t.detach()))
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
                r, cl, _ = call_views("neuslice.Profiler", info, got[i], one)
                self.refs[i] = shared_ref(r, cl)

    def _on_tap(self, i: int, t) -> None:
        b = self._batch
        if b is not None:
            b.on_tap(i, t)
        return None


class _Batch:
    """One ``with profiler.batch(labels):`` block; its sums reach the totals only when it ends cleanly.

    Each call of a layer is kept (its tap, and with gradient metrics its gradient as it passes in the
    backward); a layer is accumulated once all its calls are complete, over all of them joined along s
    (docs/method.md §2): with gradients when the last call's gradient arrives, otherwise when the block ends.
    """

    FN = "neuslice.Profiler.batch"

    def __init__(self, prof: Profiler, labels: Tensor, host: Tensor, mask: Optional[Tuple[Tensor, Tensor]] = None):
        # Labels and mask, and their host copies (read once, before the forward: on a GPU nothing in the
        # backward waits for the device; capture.host_copy). The compact labels go to each tap's device once.
        self.p, self.labels = prof, labels
        self.mask, self.every_sample = None, None
        if mask is not None:
            self.set_mask(*mask)
        self.applied, self.missed = False, {}      # the mask applied to some tap; layers it could not apply to
        self.several_masks: List[str] = []         # paths of the attention masks the forward got, when several
        self.stats: Dict[int, Dict[str, Tensor]] = {}    # per layer: [Kp, N] sums over the classes present
        self.present, self.compact_host = present_classes(host, prof.ignore_index)   # on the CPU
        self.compact: Dict[torch.device, Tensor] = {}   # the compact labels on each tap's device
        self.saved: Dict[int, List[tuple]] = {}          # per layer, per call: (tap, tap version, its tap_view)
        self.grads: Dict[int, Dict[int, Tensor]] = {}   # per layer: {call: gradient}
        self.forwards = 0
        self.ntaps: Dict[int, int] = {}
        self.seen, self.graded = set(), set()
        # per layer: calls run without grad (reentrant checkpointing) that await their recompute's tap
        self.awaiting: Dict[int, List[int]] = {}
        self.errors: List[Exception] = []
        self.error_layers: List[int] = []   # layer of each non-finite error: report the first in forward order
        self.words: Optional[StatusWords] = None   # the accumulate_ status words, made at the first call

    def set_mask(self, mask: Tensor, host: Tensor) -> None:
        """The batch's valid positions (on their device) and what the engine needs of their values (read from
        ``host``, their host copy, now: not in the backward)."""
        self.mask, self.every_sample = mask, mask_facts(host)

    def __enter__(self) -> "_Batch":
        self.p._batch = self
        return self

    def on_tap(self, i: int, t) -> None:
        info = self.p.plan.layers[i]
        if in_backward():
            self._recomputed(i, t)
            return
        if self.forwards > 1:
            self.errors.append(NeusliceError(f"{self.FN}: layer {info.name!r} ran in a second forward in one batch "
                                             "block; open one block per forward"))
            return
        self.seen.add(i)
        x = t.detach() if isinstance(t, Tensor) else t
        try:
            if self.labels.device != t.device:
                self.labels = self.labels.to(t.device)
            view = tap_view(self.FN, info, x, self.labels)     # (kept: _finish reads the tap through it)
        except ValueError as e:
            self.errors.append(e)
            return
        calls = self.saved.setdefault(i, [])
        if self.p.grad and not t.requires_grad and not torch.is_grad_enabled():
            # reentrant checkpointing: the recompute's tap gets the gradient
            calls.append((x, x._version, view))
            self.awaiting.setdefault(i, []).append(len(calls) - 1)
            self.ntaps[i] = self.ntaps.get(i, 0) + 1
            return
        if self.p.grad and not t.requires_grad:
            self.errors.append(NeusliceError(f"{self.FN}: layer {info.name!r}'s output (at {info.tap!r}) does not "
                                             "require grad, so no gradient can reach it; unfreeze something "
                                             "upstream or profile without gradient metrics"))
            return
        calls.append((x, x._version, view))
        self.ntaps[i] = self.ntaps.get(i, 0) + 1
        if self.p.grad:
            t.register_hook(self._grad_hook(i, len(calls) - 1))

    def _recomputed(self, i: int, t) -> None:
        """Layer ``i`` tapped again while gradient checkpointing recomputes a block in the backward (docs/method.md
        §2). Non-reentrant: the forward's taps receive the gradients, so the recompute is ignored. Reentrant: the
        forward ran without grad and the gradient arrives at the recompute's tap (the same values, the RNG state
        restored); it takes the place of one waiting call, so the block still counts once."""
        waiting = self.awaiting.get(i)
        if self.p._batch is not self or not waiting or not isinstance(t, Tensor) or not t.requires_grad:
            return
        c = waiting.pop(0)
        x = t.detach()
        self.saved[i][c] = (x, x._version, tap_view(self.FN, self.p.plan.layers[i], x, self.labels))
        t.register_hook(self._grad_hook(i, c))

    def _grad_hook(self, i: int, c: int):
        def hook(g: Tensor) -> None:
            if self.p._batch is not self or i in self.graded:
                return None
            got = self.grads.setdefault(i, {})
            got[c] = g
            if len(got) == len(self.saved[i]):
                self._finish(i)
            return None
        return hook

    def _finish(self, i: int) -> None:
        """Accumulate layer ``i`` over all its calls (missing gradients count as zero)."""
        self.graded.add(i)
        info = self.p.plan.layers[i]
        calls = self.saved.pop(i, [])
        if any(x._version != v for x, v, _ in calls):
            self.errors.append(NeusliceError(f"{self.FN}: layer {info.name!r}'s activation was modified in place "
                                             "after it was tapped; the profile cannot read it"))
            return
        got = self.grads.pop(i, {})
        grads = [got.get(c) for c in range(len(calls))] if self.p.grad else None
        try:
            taps, views = [c[0] for c in calls], [c[2] for c in calls]
            x, cl, g = call_views(self.FN, info, taps, self.labels, grads, views)
            valid, hit, miss = call_valid(self.FN, info, taps, self.labels, self.mask, self.every_sample, views)
        except ValueError as e:
            self.errors.append(e)
            return
        self.applied = self.applied or hit
        if miss is not None:
            self.missed[info.name] = miss
        self._acc(i, x, cl, g, valid)

    def _acc(self, i: int, x: Tensor, cl: bool, g: Optional[Tensor], valid: Optional[Tensor] = None) -> None:
        info = self.p.plan.layers[i]
        present = self.present
        if not len(present):                    # every sample/token is ignore_index
            return
        yc = self.compact.get(x.device)
        if yc is None:
            yc = self.compact[x.device] = self.compact_host.to(x.device)
        st = self.stats.get(i)
        if st is None:
            key = (len(present), acc_dtype(x.dtype), x.device)
            spare = self.p._spare.pop(info.name, None)
            st = spare[1] if spare is not None and spare[0] == key else new_stats(key[0], info.n, *key[1:], self.p.keep)
            self.stats[i] = st
        r = self.p.refs[i]
        if r is not None:
            e = ref_positions_error(self.FN, info, x, cl, r, "pass a baseline shaped as every batch after the batch "
                                    "dim (pad the baseline and the batches to one length), or use neuslice.profile, "
                                    "whose default baseline (zeros) takes each batch's shape")
            if e is not None:
                self.errors.append(e)
                return
            r = r.to(device=x.device, dtype=x.dtype)
        if self.words is None:
            self.words = StatusWords(len(self.p.plan.layers))
        # On a GPU a data error goes into the layer's status word, read once when the block ends
        # (_deferred_errors); on the CPU the call raises at once. The arguments are the engine's own (a tap
        # checked against the layer, its statistics, compact labels): the op without its argument checks.
        try:
            ops.accumulate_trusted_(x, g, r, yc, cl, st["count"], st.get("act_sum"), st.get("act_sq"),
                            st.get("taylor_sum"), st.get("deeplift_sum"), valid, compact_ignore(self.p.ignore_index),
                            self.words.slot(i, x.device))
        except NonFiniteError as e:
            self._nonfinite(i, e)

    def _nonfinite(self, i: int, e: Exception) -> None:
        info = self.p.plan.layers[i]
        self.errors.append(NonFiniteError(f"{self.FN}: layer {info.name!r} (tapped at {info.tap!r}): "
                                          f"{nonfinite_what(e)}; the batch was rejected and no statistic changed"))
        self.error_layers.append(i)

    def _deferred_errors(self) -> None:
        """The layers whose deferred accumulate_ calls found a non-finite value (one read of the status words)."""
        if self.words is not None:
            for i, e in self.words.failed():
                self._nonfinite(i, e)

    def _unused(self) -> List[int]:
        """In the first batch, the layers tapped that no gradient reached while others got theirs: their output
        does not reach the loss (docs/method.md §1)."""
        if not self.p.grad or self.p.num_batches or self.errors or not self.graded or self.forwards > 1:
            return []
        return [i for i in sorted(self.seen) if i not in self.graded and i not in self.grads
                and not self.awaiting.get(i)]

    def _problems(self, unused: Sequence[int]) -> List[Exception]:
        hooks = self.p._hooks
        for i, info in enumerate(self.p.plan.layers):
            if i in self.seen and self.forwards <= 1:
                try:
                    check_calls(self.FN, info, hooks.calls[i], self.ntaps.get(i, 0))
                except RuntimeError as e:
                    self.errors.append(NeusliceError(str(e)))
        order = sorted(range(len(self.error_layers)), key=lambda j: self.error_layers[j])
        out = [self.errors[j] for j in order] + [e for e in self.errors if not isinstance(e, NonFiniteError)]
        for i, info in enumerate(self.p.plan.layers):
            if i in unused:
                continue
            if self.awaiting.get(i):
                out.append(NeusliceError(f"{self.FN}: layer {info.name!r}'s output (at {info.tap!r}) was computed "
                                         "without grad (torch.no_grad, or a checkpointed block that was not "
                                         "recomputed), so no gradient reached it; call loss.backward() inside the "
                                         "block, or profile without gradient metrics"))
            elif i not in self.seen:
                out.append(NeusliceError(f"{self.FN}: layer {info.name!r} was not tapped at {info.tap!r} in this "
                                         f"batch: run the model's forward inside the block{self.p._compiled}"))
            elif self.p.grad and i not in self.graded and not self.errors:
                out.append(NeusliceError(f"{self.FN}: no gradient reached layer {info.name!r} in this batch: call "
                                         "loss.backward() inside the block"))
        return out

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and self.p.plan is not None:
            for i in sorted(self.saved):                 # forward only, or some calls got no gradient
                if self.saved[i] and (not self.p.grad or i in self.grads):
                    self._finish(i)
        self.p._batch = None
        if exc_type is not None:
            self.saved.clear()
            return False
        if self.p.plan is None:
            raise NeusliceError(f"{self.FN}: the model's forward did not run inside the block{self.p._compiled}")
        self._deferred_errors()
        unused = self._unused()
        problems = self._problems(unused)
        self.saved.clear()
        self.grads.clear()
        if problems:
            if self.p.on_nonfinite == "skip" and all(isinstance(e, NonFiniteError) for e in problems):
                self.p.skipped += 1
                warnings.warn(f"{problems[0]} (skipped; {self.p.skipped} batch(es) skipped so far)", stacklevel=2)
                return False
            raise problems[0]
        plan = self.p.plan
        if self.p.num_batches == 0:
            plan = drop_unused(self.FN, plan, [plan.layers[i].name for i in unused], stacklevel=3)
        if self.several_masks and not self.p._warned_masks:
            self.p._warned_masks = True
            warn_ambiguous_masks(self.FN, self.several_masks, stacklevel=3)
        if self.mask is not None and (self.missed or not self.applied) and not self.p._warned_mask:
            self.p._warned_mask = True
            warn_unmasked(self.FN, self.missed, self.mask.shape[1], stacklevel=3)
        layers = self.p.plan.layers
        add_present_all([(self.p.totals[layers[i].name], st) for i, st in self.stats.items()], self.present)
        if self.stats:      # the buffers, zeroed in one call, serve the next batch with the same classes present
            torch._foreach_zero_([v for st in self.stats.values() for v in st.values()])
            for i, st in self.stats.items():
                v = st["count"]
                self.p._spare[layers[i].name] = ((v.shape[0], v.dtype, v.device), st)
        if plan is not self.p.plan:
            self.p._narrow(plan)
        self.p.num_batches += 1
        return False
