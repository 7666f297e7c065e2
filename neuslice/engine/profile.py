"""Hooks → statistics (see docs/method.md, "Statistics"): ``neuslice.profile``, one offline pass.
Every statistic is added by ``neuslice.ops.accumulate_``; ``neuslice.Profiler`` (profiler.py) does
the same inside a user's training loop.

A batch is all-or-nothing: each layer's sums go into batch-local buffers first, and the profile's
float64 totals change only after every layer of the batch succeeded. The batch buffers hold only the
classes present in the batch (``capture.present_classes``), so they do not grow with K, and only the
statistics the metrics need (``metrics.kept_stats``). Padding (``attention_mask``, or a batch's third
element) and labels equal to ``ignore_index`` are left out inside the op (``valid``, ``ignore_index``).
DeepLIFT's reference is one forward of the baseline for unpadded batches, and per sample (the baseline padded
as the sample is, cached per mask row: ``refrows.RowRefs``) for batches whose ``attention_mask`` pads.
"""
from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from .._errors import NonFiniteError
from ..ops.reference import acc_dtype
from .capture import (GRADIENT_METRICS, add_present, at_path, batch_mask, call_model, call_valid, call_views,
                      check_calls, find_attention_mask, path_name, warn_ambiguous_masks,
                      check_ignore_index, check_labels, check_metrics, check_num_classes, compact_ignore, dl_forms,
                      drop_unused, layer_entries, mask_facts, model_device, new_stats, new_totals, nonfinite_what,
                      present_classes, ref_positions_error, shared_ref, tap_views, target_of, to_device, unwrap,
                      warn_unmasked, warn_unseen, StatusWords)
from .deeplift import Rescale
from .graph import discover, head_entries, nonlinearity_modules
from .hooks import ChainHooks, activation_modules, in_backward, no_inplace
from .metrics import kept_stats
from .refrows import RowRefs
from .slices import Profile

__all__ = ["profile"]


class _Offline:
    """State of one ``profile`` pass. Hooks: DeepLIFT's Rescale first, then the taps."""

    def __init__(self, fn, model, plan, k, metrics, target, baseline, ignore_index=-100):
        self.fn, self.model, self.plan, self.k, self.ignore_index = fn, model, plan, k, ignore_index
        self.kept = plan                # the plan without unused layers, once the first batch has run
        self.target, self.baseline = target, baseline
        self.grad = any(m in GRADIENT_METRICS for m in metrics)
        self.want_dl = "deeplift" in metrics
        self.device = model_device(model)
        self.keep = kept_stats(metrics)     # count and the statistics the metrics need, nothing else
        self.totals = {i.name: new_totals(k, i.n, self.device, self.keep) for i in plan.layers}
        self.missed: Dict[str, list] = {}   # layers with positions a mask could not apply to (warned once)
        self.warned = False
        self.taps: List[List[Tensor]] = [[] for _ in plan.layers]     # one tensor per call of the layer
        self.refs: Optional[Tuple[object, List[Tensor], dict]] = None   # the shared reference (unpadded batches)
        self.rows = RowRefs()           # per mask row: the references of padded batches (docs/method.md §2)
        self.warned_masks = False       # several attention masks in the inputs: warned once per call
        self.recording = False
        self.num_batches = 0
        self.rescale = self.hooks = None
        try:
            acts = [n for n, _ in activation_modules(model, nonlinearity_modules(model))]
            functional = any(i.functional and i.tap_stage == len(i.chain) for i in plan.layers)
            self.rescale = Rescale(model, acts) if (self.want_dl and (acts or functional)) else None
            self.forms = dl_forms(fn, plan, self.rescale is not None, self.want_dl) if self.want_dl else {}
            self.hooks = ChainHooks(model, plan.layers, self._on_tap,
                                    on_functional=None if self.rescale is None else self.rescale.functional)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the hooks and let go of every tensor but the totals. The run's objects reference one another
        (hooks call its methods), so without this the taps, the reference rows and Rescale's buffers lived until
        Python's cyclic collector ran: 0.8 GB per call on the padded MiniLM-config bench, and RSS grew from 1.9 to
        5.8 GB over 6 calls while the time per call went from 6.5 to 8.7 s (a scratch loop)."""
        for h in (self.hooks, self.rescale):
            if h is not None:
                h.remove()
        self.hooks = self.rescale = self.refs = None
        self.rows = RowRefs()
        self.taps = [[] for _ in self.plan.layers]

    def _on_tap(self, i: int, t):
        if in_backward():               # gradient checkpointing recomputes a block: its taps were read in forward
            return None
        if self.grad and not self.recording and isinstance(t, Tensor) and t.is_floating_point() \
                and not t.requires_grad:
            t = t.detach().requires_grad_(True)   # frozen upstream: the tap becomes the leaf
            self.taps[i].append(t)
            return t
        self.taps[i].append(t)
        return None

    def _forward(self, x) -> object:
        self.taps = [[] for _ in self.taps]
        self.hooks.reset()
        out = call_model(self.model, x)
        missing = [info for info, t in zip(self.plan.layers, self.taps) if not t]
        if missing:
            info = missing[0]
            raise RuntimeError(f"{self.fn}: layer {info.name!r} was not tapped at {info.tap!r} in the forward "
                               f"pass (tap source: {info.tap_source}); the module is not called, or the "
                               "activation found by module order does not follow it: pass tap='layer' or "
                               "choose layers=")
        for info, ts, calls in zip(self.plan.layers, self.taps, self.hooks.calls):
            check_calls(self.fn, info, calls, len(ts))
        return out

    def _record(self, base, u: int) -> Tuple[List[Tuple[Tensor, bool]], dict]:
        """One no-grad forward of the reference input ``base`` (``u`` samples): per layer accumulate_'s view of
        its taps (``[u, ...]``, channels-last or not), and every nonlinearity call's input and output."""
        self.recording = True
        if self.rescale is not None:
            self.rescale.record(True)
        try:
            with torch.no_grad():
                self._forward(base)
            lab = torch.zeros(u, dtype=torch.int64, device=self.device)
            views = [call_views(self.fn, info, ts, lab)[:2] for info, ts in zip(self.plan.layers, self.taps)]
            dl = self.rescale.recorded() if self.rescale is not None else {}
        finally:
            self.recording = False
            if self.rescale is not None:
                self.rescale.record(False)
        return views, dl

    def _ensure_ref(self, x, path: Optional[tuple]) -> List[Optional[Tensor]]:
        """The references of a batch ``x`` (accumulate_'s ``ref`` per layer; Rescale's are set): shared ``[N, S]``
        from one forward of the baseline (again only when the per-sample shape or dtype changes), or, when
        ``x``'s ``attention_mask`` pads, per sample from the baseline with each sample's mask row
        (docs/method.md §2, Reference r). ``path``: where ``x`` holds its attention mask, or None."""
        am = at_path(x, path) if path is not None else None
        if isinstance(am, Tensor) and am.dim() == 2 and am.numel() and not bool((am != 0).all()):
            return self._row_refs(x, am, path)
        key = _shape_key(x)
        if self.refs is None or self.refs[0] != key:
            views, dl = self._record(_baseline(self.fn, self.baseline, x), 1)
            self.refs = (key, [shared_ref(r, cl) for r, cl in views], dl)
        if self.rescale is not None:
            self.rescale.use(self.refs[2])
        return self.refs[1]

    def _row_refs(self, x, am: Tensor, path: tuple) -> List[Tensor]:
        """Per-sample references of a padded batch: each distinct mask row's from the cache, or from one forward
        of the baseline over the rows not cached; assembled into ``[B, ...]``."""
        rows, inv = torch.unique(am, dim=0, return_inverse=True)
        skey = _shape_key(x)
        keys = [(skey, tuple(r)) for r in rows.tolist()]
        entries = self.rows.lookup(keys)
        miss = [j for j, e in enumerate(entries) if e is None]
        if miss:
            sel = rows[torch.tensor(miss, device=rows.device)]
            views, dl = self._record(_baseline_rows(self.fn, self.baseline, x, sel, path), len(miss))
            for j, e in zip(miss, self.rows.split([v for v, _ in views], dl, len(miss))):
                entries[j] = e          # held for this batch even if the cache's bound evicts it
                self.rows.insert(keys[j], e)
        taps, dl = self.rows.assemble([entries[j] for j in inv.tolist()])
        if self.rescale is not None:
            self.rescale.use(dl)
        return taps

    def batch(self, x, labels, mask=None) -> None:
        """Profile one batch: forward, the target's gradient(s) at the taps, then accumulate. ``mask``: the
        valid positions ``[B, T]`` (else the inputs' ``attention_mask``, if any; docs/method.md §2)."""
        # Labels and mask are read once, here (their host copies decide what needs their values: on a GPU
        # nothing after the forward waits for the device but the status words' read; capture.host_copy).
        y, y_host = check_labels(self.fn, labels, self.k, self.ignore_index)
        y = y.to(self.device)
        path, several = find_attention_mask(x)      # (also where DeepLIFT's references put each mask row)
        got = batch_mask(self.fn, x, mask, y, path)
        if several and not self.warned_masks:
            self.warned_masks = True
            warn_ambiguous_masks(self.fn, several, stacklevel=4)
        mask, mask_host = got or (None, None)
        mask, every_sample = None if mask is None else mask.to(self.device), mask_facts(mask_host)
        x = to_device(x, self.device)
        refs = self._ensure_ref(x, path) if self.want_dl else [None] * len(self.taps)
        with torch.set_grad_enabled(self.grad):
            out = self._forward(x)
            views = [tap_views(self.fn, info, ts, y) for info, ts in zip(self.plan.layers, self.taps)]
            for info, ts, vs in zip(self.plan.layers, self.taps, views):
                call_views(self.fn, info, ts, y, views=vs)       # shape errors before the backward
            grads = mults = [None] * len(self.taps)
            if self.grad:
                tgt = target_of(self.fn, out, y, self.target, self.ignore_index, mask)
                grads = self._grad(tgt, retain=self.rescale is not None)
                if self.rescale is not None:
                    self.rescale.switch.on = True
                    try:
                        mults = self._grad(tgt, retain=False)
                    finally:
                        self.rescale.switch.on = False
        if self.num_batches == 0:       # the first batch tells which layers no gradient reaches: unused
            dead = [i.name for i, g in zip(self.plan.layers, grads) if self.grad and all(v is None for v in g)]
            self.kept = drop_unused(self.fn, self.plan, dead)
            for name in dead:
                del self.totals[name]
        present, yc = present_classes(y_host, self.ignore_index)    # [Kp, N] batch buffers, Kp = classes present
        yc = yc.to(self.device)
        partial, applied, missed = {}, False, {}
        words = StatusWords(len(self.plan.layers))
        for j, (info, ts, vs, g, m, r) in enumerate(zip(self.plan.layers, self.taps, views, grads, mults, refs)):
            if info.name not in self.totals:
                continue
            valid, hit, miss = call_valid(self.fn, info, ts, y, mask, every_sample, vs)
            applied = applied or hit
            if miss is not None:
                missed[info.name] = miss
            if not len(present):                                # every sample/token is ignore_index
                continue
            xv, cl, gv = call_views(self.fn, info, ts, y, g, vs)
            mv = None if m is None else call_views(self.fn, info, ts, y, m, vs)[2]
            try:
                partial[info.name] = self._accumulate(info, xv.detach(), cl, gv, mv, r, yc, len(present), valid,
                                                      words.slot(j, xv.device))
            except NonFiniteError as e:          # a synchronous call (CPU): at once
                self._nonfinite(info, e)
        for j, e in words.failed()[:1]:          # deferred calls (GPU), one read per device: the first that failed
            self._nonfinite(self.plan.layers[j], e)
        if mask is not None and (missed or not applied) and not self.warned:
            self.warned = True
            warn_unmasked(self.fn, missed, mask.shape[1], stacklevel=4)
        for name, st in partial.items():                        # all layers succeeded: commit
            add_present(self.totals[name], st, present)
        self.num_batches += 1

    def _grad(self, tgt: Tensor, retain: bool) -> List[List[Optional[Tensor]]]:
        """The gradient at every call's tap, grouped per layer (None: that call does not reach ``tgt``)."""
        flat = [t for ts in self.taps for t in ts]
        try:
            gs = iter(torch.autograd.grad(tgt, flat, retain_graph=retain, allow_unused=True))
        except RuntimeError as e:
            if "incompatible with .grad()" not in str(e) and "not compatible with .grad()" not in str(e):
                raise
            raise RuntimeError(f"{self.fn}: the model uses reentrant gradient checkpointing (use_reentrant=True), "
                               "which torch runs only under .backward(), and profile takes gradients with "
                               "torch.autograd.grad: pass use_reentrant=False to checkpoint, or profile in the "
                               "training loop with neuslice.Profiler (docs/method.md §2)") from None
        return [[next(gs) for _ in ts] for ts in self.taps]

    def _nonfinite(self, info, e: Exception):
        raise NonFiniteError(f"{self.fn}: layer {info.name!r} (tapped at {info.tap!r}): {nonfinite_what(e)}; "
                             "the batch was rejected and no statistic changed") from None

    def _accumulate(self, info, x, cl, gv, mv, r, y, kp, valid, word) -> Dict[str, Tensor]:
        """The batch's sums ``[kp, N]`` of one layer (the kept statistics only); ``y`` are compact labels in
        ``[0, kp)`` or ``compact_ignore(ignore_index)``; ``valid`` the positions that count, or None. A data
        error goes into the layer's status ``word`` on a GPU (read once the batch's calls are all made); with
        ``word`` None (CPU) the call raises. The arguments are the engine's own (taps checked against the layer,
        these statistics, compact labels), so the op runs without its argument checks (``accumulate_trusted_``)."""
        e = ref_positions_error(self.fn, info, x, cl, r, "pass a baseline with each batch's shape after the batch "
                                "dim (pad the baseline and the batches to one length), or leave baseline=None: zeros "
                                "like each batch")
        if e is not None:
            raise e
        st = new_stats(kp, info.n, acc_dtype(x.dtype), x.device, self.keep)
        ig = compact_ignore(self.ignore_index)
        first = (st.get("act_sum"), st.get("act_sq"), st.get("taylor_sum"))
        if mv is None:   # m = g: one call gives taylor (ref None) and deeplift (ref r) alike
            ops.accumulate_trusted_(x, gv, r, y, cl, st["count"], *first, st.get("deeplift_sum"), valid, ig, word)
        else:            # Rescale: deeplift from the multipliers, in a call of its own
            count = st["count"]
            if any(t is not None for t in first):
                ops.accumulate_trusted_(x, gv, None, y, cl, count, *first, None, valid, ig, word)
                count = torch.zeros_like(count)
            ops.accumulate_trusted_(x, mv, r, y, cl, count, None, None, None, st["deeplift_sum"], valid, ig, word)
        return st


def _shape_key(x):
    if isinstance(x, Tensor):
        return (tuple(x.shape[1:]), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_shape_key(v) for v in x)
    if isinstance(x, Mapping):
        return tuple((k, _shape_key(v)) for k, v in sorted(x.items()))
    return None


def _baseline(fn: str, baseline, x):
    """The reference input ``[1, ...]``: zeros like one sample of ``x`` unless the user gave one."""
    if baseline is None:
        return _zeros_one(x)
    if isinstance(x, Tensor):
        if not isinstance(baseline, Tensor):
            raise TypeError(f"{fn}: baseline must be a tensor like one input sample, got {type(baseline).__name__}")
        b = baseline.to(device=x.device, dtype=x.dtype)
        if tuple(b.shape) == tuple(x.shape[1:]):
            b = b.unsqueeze(0)
        if tuple(b.shape) != (1, *x.shape[1:]):
            raise ValueError(f"{fn}: baseline must be {list(x.shape[1:])} or {[1, *x.shape[1:]]} (one input "
                             f"sample), got {list(baseline.shape)}")
        return b
    return to_device(baseline, _first_device(x))


def _baseline_rows(fn: str, baseline, x, rows: Tensor, path: tuple = ("attention_mask",)):
    """The reference inputs of padded samples: the baseline (zeros like one sample of ``x`` unless the user gave
    one, structured as ``x``) as ``u`` samples, with ``rows`` ``[u, T]`` (their attention_mask rows) as the
    attention mask at ``path`` (where ``x`` holds it: capture.find_attention_mask): each reference is padded as
    its sample is (docs/method.md §2)."""
    u = rows.shape[0]
    if baseline is None:
        base = _zeros_rows(x, u)
    else:
        base = _rows_of(baseline, u, _first_device(x))
    try:
        return _replace_at(base, path, rows)
    except (KeyError, IndexError, TypeError):
        raise TypeError(f"{fn}: the inputs' attention_mask (at {path_name(path)}) pads, so baseline must be one "
                        "sample's inputs structured as each batch's, holding the mask there too (DeepLIFT's "
                        "reference is the baseline padded as each sample is, docs/method.md §2), got "
                        f"{type(baseline).__name__}") from None


def _rows_of(v, u: int, dev):
    """The user's baseline of one sample as ``u`` samples: each tensor of batch size 1 expanded."""
    if isinstance(v, Tensor):
        return v.to(dev).expand(u, *v.shape[1:]).contiguous() if v.dim() and v.shape[0] == 1 else v
    if isinstance(v, (list, tuple)):
        return type(v)(_rows_of(w, u, dev) for w in v)
    if isinstance(v, Mapping):
        return {k: _rows_of(w, u, dev) for k, w in v.items()}
    return v


def _replace_at(obj, path: Sequence, value):
    """``obj`` with ``value`` at ``path`` (keys and indices), rebuilt along the path (tuples are immutable)."""
    if not path:
        return value
    k, rest = path[0], path[1:]
    if isinstance(obj, Mapping):
        if rest and k not in obj:
            raise KeyError(k)
        out = dict(obj)
        out[k] = _replace_at(obj[k], rest, value) if rest else value
        return out
    if isinstance(obj, (list, tuple)):
        items = list(obj)
        items[k] = _replace_at(items[k], rest, value)
        return type(obj)(items)
    raise TypeError(type(obj).__name__)


def _zeros_rows(v, u: int):
    if isinstance(v, Tensor):
        return torch.zeros((u, *v.shape[1:]), dtype=v.dtype, device=v.device) if v.dim() else torch.zeros_like(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_zeros_rows(w, u) for w in v)
    if isinstance(v, Mapping):
        return {k: _zeros_rows(w, u) for k, w in v.items()}
    return v


def _zeros_one(x):
    """Zeros like one sample of ``x``; an ``attention_mask`` of a mapping is all ones (the reference input has
    no padding, so its activations at a position never depend on the batch's padded length)."""
    if isinstance(x, Tensor):
        return torch.zeros_like(x[:1])
    if isinstance(x, (list, tuple)):
        return type(x)(_zeros_one(v) for v in x)
    if isinstance(x, Mapping):
        return {k: (torch.ones_like(v[:1]) if k == "attention_mask" and isinstance(v, Tensor) else _zeros_one(v))
                for k, v in x.items()}
    return x


def _probe_samples(x, labels, n: int = 2):
    """The first ``n`` samples of a batch's inputs ``x``: every tensor whose first dimension is the labels' batch
    size, sliced to ``[:n]`` (what the probe forward of an untraceable model runs, docs/method.md §1: two
    samples, so that the probe shows whether a layer's batch dim keeps the samples apart, as windowed attention
    folds each sample's windows into it)."""
    b = labels.shape[0] if isinstance(labels, Tensor) and labels.dim() else None
    if isinstance(x, Tensor):
        return x[:n] if b is not None and x.dim() and x.shape[0] == b else x
    if isinstance(x, (list, tuple)):
        return type(x)(_probe_samples(v, labels, n) for v in x)
    if isinstance(x, Mapping):
        return {k: _probe_samples(v, labels, n) for k, v in x.items()}
    return x


def _first_device(x):
    if isinstance(x, Tensor):
        return x.device
    vals = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()
    for v in vals:
        d = _first_device(v)
        if d is not None:
            return d
    return None


def _unpack(fn: str, batch) -> Tuple[object, Tensor, Optional[Tensor]]:
    """``(inputs, labels, mask)`` of one batch: a pair or triple, or a mapping holding ``labels`` (a Hugging Face
    collator's batch), whose other entries are the inputs (the model is not given the labels)."""
    if isinstance(batch, (list, tuple)) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    if isinstance(batch, Mapping) and "labels" in batch:
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"], None
    what = f"{type(batch).__name__}{'' if not hasattr(batch, '__len__') else f' of length {len(batch)}'}"
    if isinstance(batch, Mapping):
        what += f" with keys {sorted(map(str, batch))} and no 'labels'"
    raise ValueError(f"{fn}: data must yield (inputs, labels), (inputs, labels, mask) or a mapping of inputs "
                     f"holding 'labels', got {what}")


def profile(model: nn.Module, data: Iterable, num_classes: int, *, layers=None,
            metrics: Sequence[str] = ("avg", "var", "taylor", "deeplift"), target: str = "logit",
            baseline=None, progress: bool = True, class_names: Optional[Sequence[str]] = None,
            tap: str = "auto", ignore_index: int = -100) -> Profile:
    """Profile ``model`` over ``data`` in one pass (docs/method.md §2).

    Args:
        model: a classifier giving logits ``[B, K]`` (``[B, T, K]`` with per-token labels). It runs in
            eval mode (restored afterwards); its parameters, buffers and ``.grad`` are left untouched.
        data: a DataLoader or any iterable of ``(inputs, labels)`` or ``(inputs, labels, mask)``: inputs a
            tensor ``[B, ...]`` (or a tuple/dict of them, passed as ``model(*inputs)``/``model(**inputs)``),
            or of mappings holding ``labels`` (a Hugging Face collator's batches: the other entries are the
            inputs),
            labels integer ``[B]`` or ``[B, T]`` (per token; channels-last layers only) in
            ``[0, num_classes)`` or equal to ``ignore_index`` (skipped). Padding does not count
            (docs/method.md §2): ``mask`` bool ``[B, T]`` (True = the position counts), or else the
            ``attention_mask`` of dict inputs, applies to every tap ``[B, T, N]``.
        num_classes: K. layers: None (every Conv/Linear but the head), names, types or a predicate.
        metrics: any of ``avg``, ``var``, ``taylor``, ``deeplift``, ``ens`` (= all four). Forward only
            when neither ``taylor`` nor ``deeplift`` is asked.
        target: ``"logit"`` (f_y) or ``"loss"`` (cross-entropy of the sample).
        baseline: DeepLIFT reference input, one sample (``[...]`` or ``[1, ...]``); zeros by default. A padded
            sample's reference is the baseline with the sample's own ``attention_mask`` (docs/method.md §2), so
            with mapping inputs that pad, the baseline is a mapping too.
        progress: a progress line on stderr when it is a terminal. class_names: K names.
        tap: ``"auto"`` (after the layer's nonlinearity where one follows) or ``"layer"``.
        ignore_index: the label of samples (tokens) that count nowhere (default −100, as in cross-entropy).

    Returns:
        a :class:`~neuslice.Profile` with float64 sums on the model's device: ``count`` and the statistics
        the metrics need.
    """
    fn = "neuslice.profile"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    metrics = check_metrics(fn, metrics)
    ignore_index = check_ignore_index(fn, ignore_index)
    names = check_num_classes(fn, num_classes, class_names)
    if target not in ("logit", "loss"):
        raise ValueError(f"{fn}: target must be 'logit' or 'loss', got {target!r}")
    it = iter(data)
    first = next(it, None)
    if first is not None:
        data = itertools.chain([first], it)
    first_batch = None if first is None else (        # the probe needs two samples, not the whole batch
        lambda: call_model(model, to_device(_probe_samples(*_unpack(fn, first)[:2]), model_device(model))))
    plan = discover(model, layers, tap=tap, fn=fn, run=first_batch)   # the probe where tracing fails
    warn_unseen(fn, plan, tap)
    training = {m: m.training for m in model.modules()}
    run = None
    try:
        model.eval()
        with no_inplace(model):
            run = _Offline(fn, model, plan, num_classes, metrics, target, baseline, ignore_index)
            for i, batch in enumerate(data):
                run.batch(*_unpack(fn, batch))
                if progress and sys.stderr.isatty():
                    print(f"\r{fn}: {i + 1} batches", end="", file=sys.stderr, flush=True)
    finally:
        if run is not None:
            run.close()
        for m, t in training.items():
            m.training = t
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    if run.num_batches == 0:
        raise ValueError(f"{fn}: data yielded no batch")
    plan = run.kept
    forms = {i.name: run.forms[i.name] for i in plan.layers if i.name in run.forms}
    return Profile(layer_entries(plan, forms), names, run.totals, metrics=metrics, target=target,
                   deeplift=_overall(forms) if "deeplift" in metrics else None, num_batches=run.num_batches,
                   coupled=plan.coupled, heads=head_entries(model, plan), attention=plan.attention)


def _overall(forms: Dict[str, str]) -> str:
    return "rescale" if forms and all(v == "rescale" for v in forms.values()) else "gradient"
