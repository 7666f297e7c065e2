"""What ``profile`` and ``Profiler`` share: argument checks, calling a model on a batch, the target
whose gradient is taken, and the view of a tapped output that ``neuslice.ops.accumulate_`` reads.
"""
from __future__ import annotations

import dataclasses
import mmap
import warnings
import weakref
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import NeusliceError, raise_for_status
from ..io.container import layer_entry
from ..ops._layout import bns, ref_fits
from .graph import LayerInfo, Plan
from .calls import call_model, logits_of, model_device, to_device  # noqa: F401  (re-exported)
from .metrics import METRICS, STATS

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


def check_ignore_index(fn: str, ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int (the label of samples/tokens that do not count), "
                        f"got {type(ignore_index).__name__} {ignore_index!r}")
    return ignore_index


def host_copy(t: Tensor) -> Tensor:
    """``t`` on the CPU: ``t`` itself there, else a copy. On a GPU that is a read of device memory, which waits
    for the device; the engine reads each batch's labels and mask once, before the forward (docs/architecture.md,
    "Deferred status"), and decides everything that needs their values from these copies, so nothing in the
    backward waits for the device."""
    return t if t.device.type == "cpu" else t.cpu()


def check_labels(fn: str, labels, num_classes: int, ignore_index: int = -100) -> Tuple[Tensor, Tensor]:
    """``labels`` as int64 ``[B]`` or ``[B, T]`` in ``[0, num_classes)`` or equal to ``ignore_index`` (skipped),
    and their :func:`host_copy` (int64), which the check read; raises naming ``fn`` otherwise."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{fn}: labels must be an integer tensor [B] or [B, T], got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: labels must be an integer tensor (class indices), got {labels.dtype}")
    if labels.dim() not in (1, 2):
        raise ValueError(f"{fn}: labels must be [B] (per sample) or [B, T] (per token), got {list(labels.shape)}")
    host = host_copy(labels).long()
    if host.numel():
        lo, hi = torch.stack(torch.aminmax(host)).tolist()
        if lo < 0 or hi >= num_classes:
            bad = host[(host != ignore_index) & ((host < 0) | (host >= num_classes))]
            if bad.numel():
                raise ValueError(f"{fn}: labels must lie in [0, {num_classes}) (num_classes={num_classes}) or equal "
                                 f"ignore_index ({ignore_index}), got label {int(bad[0])}")
    return labels.long(), host


def check_mask(fn: str, mask, labels: Tensor, what: str = "mask") -> Tuple[Tensor, Tensor]:
    """A batch's valid positions as bool ``[B, T]`` (True = the position counts; docs/method.md §2), on the mask's
    device, and their :func:`host_copy`: ``mask`` bool, or integer 0/1 (``attention_mask``: 1 = token,
    0 = padding), with B the labels' batch size."""
    hint = ("; pass an explicit bool [B, T] mask (True = the position counts) as the batch's third element "
            "(profile) or mask= (Profiler.batch)") if what.endswith("attention_mask") else ""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{fn}: {what} must be a bool or integer tensor [B, T], got {type(mask).__name__}")
    if mask.dim() != 2 or mask.shape[0] != labels.shape[0]:
        raise ValueError(f"{fn}: {what} must be [B, T] with B = {labels.shape[0]} (the labels' batch size), got "
                         f"{list(mask.shape)}{hint}")
    if labels.dim() == 2 and mask.shape[1] != labels.shape[1]:
        raise ValueError(f"{fn}: {what} {list(mask.shape)} and per-token labels {list(labels.shape)} must have the "
                         "same T")
    if mask.dtype == torch.bool:
        return mask, host_copy(mask)
    if mask.dtype.is_complex or (mask.dtype.is_floating_point and not what.endswith("attention_mask")):
        raise TypeError(f"{fn}: {what} must be bool (True = the position counts) or integer 0/1, got {mask.dtype}")
    host = host_copy(mask)
    if host.numel():
        lo, hi = torch.stack(torch.aminmax(host)).tolist()
        if lo < 0 or hi > 1:
            raise ValueError(f"{fn}: {what} must hold 0 (padding) and 1 (a token) only, got values in "
                             f"[{lo}, {hi}]{hint}")
    return mask != 0, host != 0


def mask_facts(host: Optional[Tensor]) -> Optional[bool]:
    """What :func:`call_valid` needs of a batch's mask values, from its host copy: whether every sample has a
    valid position (None without a mask)."""
    return None if host is None else bool(host.any(1).all())


MASK_DEPTH = 3   # how deep find_attention_mask looks into nested mappings, lists and tuples


def find_attention_mask(inputs) -> Tuple[Optional[tuple], List[str]]:
    """Where a batch's inputs hold the Hugging Face ``attention_mask``: ``(path, [])`` with ``path`` the keys and
    indices leading to it (``("attention_mask",)`` for a mapping of inputs), or ``(None, [])`` when there is
    none. A mapping nested in the inputs counts too, searched breadth first (MASK_DEPTH levels of mappings,
    lists and tuples): a wrapper's argument, as sentence-transformers' ``model(features={"input_ids": ...,
    "attention_mask": ...})``, would otherwise let its padding count unseen (docs/method.md §2). Different
    tensors found at the shallowest level holding one: ``(None, their paths)``, for the caller's warning."""
    level = [((), inputs)]
    for _ in range(MASK_DEPTH + 1):
        found, seen, nxt = [], set(), []
        for path, obj in level:
            if isinstance(obj, Mapping):
                am = obj.get("attention_mask")
                if isinstance(am, Tensor):
                    if id(am) not in seen:
                        seen.add(id(am))
                        found.append(path + ("attention_mask",))
                    continue
                nxt.extend((path + (k,), v) for k, v in obj.items())
            elif isinstance(obj, (list, tuple)):
                nxt.extend((path + (i,), v) for i, v in enumerate(obj))
        if len(found) == 1:
            return found[0], []
        if found:
            return None, [path_name(f) for f in found]
        level = nxt
    return None, []


def path_name(path: Sequence) -> str:
    """A path of :func:`find_attention_mask` as text: ``features.attention_mask``, ``[0].attention_mask``."""
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(path))


def at_path(obj, path: Sequence):
    for k in path:
        obj = obj[k]
    return obj


def warn_ambiguous_masks(fn: str, paths: Sequence[str], stacklevel: int = 3) -> None:
    """Warn (once per run: the caller remembers) that the inputs hold several attention masks, none applied."""
    warnings.warn(f"{fn}: the inputs hold {len(paths)} different attention_mask tensors ({', '.join(paths)}); "
                  "neuslice cannot tell which one marks the padding of the sliced layers, so every position counts. "
                  "Pass the valid positions yourself: bool [B, T], as the batch's third element (profile) or "
                  "mask= (Profiler.batch)", stacklevel=stacklevel)


def batch_mask(fn: str, inputs, mask, labels: Tensor, path: Optional[tuple]) -> Optional[Tuple[Tensor, Tensor]]:
    """The valid positions of one batch and their host copy (:func:`check_mask`; docs/method.md §2): ``mask`` when
    given, else the ``attention_mask`` the inputs hold at ``path`` (:func:`find_attention_mask`: the Hugging Face
    convention, in a mapping of inputs or one nested in them), else None (every position counts)."""
    if mask is not None:
        return check_mask(fn, mask, labels)
    if path is None:
        return None
    return check_mask(fn, at_path(inputs, path), labels, path_name(path))


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
    if info.fold > 1 and isinstance(t, Tensor) and t.dim() == 3 and t.shape[0] == b * info.fold and t.shape[0] != b:
        why = info.fold_error
        if why is None and not info.fold_ordered and b > 1:
            why = ("the probe forward ran on one sample, which cannot show that its batch dim keeps the samples "
                   "apart; probe with two samples or more (neuslice.Profiler probes its first batch again when that "
                   "has two samples or more)")
        if why is not None:
            raise ValueError(f"{fn}: layer {info.name!r} (tapped at {info.tap!r}) gave output {list(t.shape)}, "
                             f"{info.fold} pieces per sample folded into the batch dim (windowed attention), but "
                             f"{why}; choose layers= without it")
        # [B * f, T, N], sample-major (docs/method.md §1): sample b's f pieces are its f * T positions
        # (those that pad the sample are left out by call_valid)
        t = t.reshape(b, info.fold * t.shape[1], n)
    ok = isinstance(t, Tensor) and t.dim() >= 2 and t.shape[0] == b and (t.shape[-1] if linear else t.shape[1]) == n
    if not ok:
        shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
        want = f"[B, ..., N] = [{b}, ..., {n}]" if linear else f"[B, N, ...] = [{b}, {n}, ...]"
        folded = ""
        if isinstance(t, Tensor) and t.dim() == 3 and b and t.shape[0] > b and t.shape[0] % b == 0:
            folded = (f" (its batch dim holds {t.shape[0] // b} rows per sample, as windowed attention folds windows "
                      "into it: such a fold is read from the probe forward of a model that torch.fx cannot trace, "
                      f"not from a traced graph; choose layers= without {info.name!r})" if info.fold == 1 else
                      f" (its batch dim holds {t.shape[0] // b} rows per sample where the probe forward saw "
                      f"{info.fold}: inputs of another size fold differently; profile one input size at a time)")
        raise ValueError(f"{fn}: layer {info.name!r} (tapped at {info.tap!r}) gave output {shape}; expected {want} "
                         f"with B the batch size of the labels{folded}")
    if t.dim() == 2:
        x, cl = t, False
    elif linear:     # (a [B, T, N] tap is its own view: no reshape, once per tap and per call of the engine)
        x, cl = (t if t.dim() == 3 else t.reshape(b, -1, n)), True
    else:
        x, cl = t.flatten(2), False
    if labels.dim() == 2 and not (cl and x.shape[1] == labels.shape[1]):
        raise ValueError(f"{fn}: per-token labels {list(labels.shape)} need a channels-last layer output "
                         f"[B, T, N] with T = {labels.shape[1]}; layer {info.name!r} gave {list(t.shape)}")
    return x, cl


def ref_positions_error(fn: str, info: LayerInfo, x: Tensor, cl: bool, r: Optional[Tensor],
                        fix: str) -> Optional[ValueError]:
    """The error for a reference ``r`` (from a forward of the baseline) that does not fit a layer's tap ``x``
    (accumulate_'s view: ``[B, N]``, ``[B, N, S]`` or channels-last ``[B, S, N]``): neither x's own shape (one
    per sample) nor a shared ``[N, S]`` / ``[N]``, as when the baseline has 8 tokens and the batch 12; else None.
    The engine calls the op without its argument checks, so this one is the engine's (``fix``: what the caller
    can do)."""
    if r is None or ref_fits(r, x, cl):
        return None
    _, n, s = bns(x, cl)
    got = (f"{r.shape[1]} in the baseline's forward" if r.dim() == 2 and r.shape[0] == n else
           f"a reference of shape {list(r.shape)} from the baseline's forward")
    return ValueError(f"{fn}: layer {info.name!r} (tapped at {info.tap!r}) has {s} positions in this batch and "
                      f"{got}, so the baseline gives no reference for them: {fix}")


def shared_ref(view: Tensor, cl: bool) -> Tensor:
    """accumulate_'s shared ``ref`` ``[N, S]`` from the reference's tap view of one sample (``[1, N, S]``, or
    channels-last ``[1, S, N]``), laid out as the tap is: channels-last, the ``[N, S]`` view of a contiguous
    ``[S, N]`` (strides ``(1, N)``), so the kernels read it along n with unit stride as they read x (a
    ``[N, S]``-contiguous copy made every ViT DeepLIFT call read it with stride S: 2.4x the taylor call)."""
    return view[0].contiguous().t() if cl else view[0].contiguous()


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


# A layer's fold_valid (a CPU tensor of the plan) on each device it was asked for: copied once, not per batch (on
# a GPU each copy from host memory would wait for the device in the middle of the backward).
_DEVICE_COPIES: "weakref.WeakKeyDictionary[Tensor, Dict[torch.device, Tensor]]" = weakref.WeakKeyDictionary()


def _on_device(t: Tensor, device: torch.device) -> Tensor:
    if t.device == device:
        return t
    per = _DEVICE_COPIES.setdefault(t, {})
    got = per.get(device)
    if got is None:
        got = per[device] = t.to(device)
    return got


def call_valid(fn: str, info: LayerInfo, ts: Sequence[Tensor], labels: Tensor, mask: Optional[Tensor],
               every_sample: Optional[bool] = None, views: Optional[Sequence[Tuple[Tensor, bool]]] = None
               ) -> Tuple[Optional[Tensor], bool, Optional[list]]:
    """``(valid, applied, missed)`` for a layer's taps ``ts`` (one per call) and a batch's mask ``[B, T]``:
    accumulate_'s ``valid`` ``[B, S]`` (the calls joined along s as :func:`call_views` joins them; None where
    it would be all True), whether the mask applied to some call, and the tap shape of a call with positions
    it could not apply to (else None).

    ``mask`` applies to every call whose tap is ``[B, T, N]`` (channels-last) with the mask's T. A call of
    another shape keeps all its positions, except that a sample without any valid position counts nowhere
    (so every layer counts the same samples). ``every_sample``: whether every sample has a valid position, as
    :func:`mask_facts` found it before the forward; None reads it from ``mask`` (on a GPU, a wait for the device).
    A layer whose windows pad each sample (``info.fold_valid``, found by the probe: docs/method.md §1) leaves
    those positions out of its folded calls, with or without ``mask``. ``views``: the calls' :func:`tap_views`,
    where the caller has them."""
    pad = info.fold_valid
    if mask is None and pad is None:
        return None, False, None
    if mask is not None and mask.device != labels.device:
        mask = mask.to(labels.device)
    b = labels.shape[0]
    t = None if mask is None else mask.shape[1]
    sample: Optional[Tensor] = None            # per sample: has a valid position, [B, 1]
    parts, applied, any_false, missed = [], False, False, None
    for tap, (x, cl) in zip(ts, tap_views(fn, info, ts, labels) if views is None else views):
        s = x.shape[1] if cl else (1 if x.dim() == 2 else x.shape[2])
        folded = pad is not None and cl and tap.dim() == 3 and tap.shape[0] != b and s == pad.shape[0]
        if mask is not None and cl and tap.dim() == 3 and tap.shape[0] == b and tap.shape[1] == t:
            parts.append(mask)
            applied = True
            continue
        part = _on_device(pad, labels.device).expand(b, s) if folded else None
        any_false = any_false or folded
        if mask is not None:
            if tap.dim() >= 3 and missed is None:
                missed = list(tap.shape)
            if sample is None:
                sample = mask.any(1, keepdim=True)
                any_false = any_false or not (bool(sample.all()) if every_sample is None else every_sample)
            part = sample.expand(b, s) if part is None else part & sample
        parts.append(torch.ones(b, s, dtype=torch.bool, device=labels.device) if part is None else part)
    if not applied and not any_false:
        return None, False, missed
    return (parts[0] if len(parts) == 1 else torch.cat(parts, 1)), applied, missed


def tap_views(fn: str, info: LayerInfo, ts: Sequence[Tensor], labels: Tensor) -> List[Tuple[Tensor, bool]]:
    """The :func:`tap_view` of each call's tap ``ts``: the engine takes them once per tap and hands them to
    :func:`call_views` and :func:`call_valid` (three ``tap_view`` per tap and step before, 6-10 us each in a
    training step's backward)."""
    return [tap_view(fn, info, t, labels) for t in ts]


def call_views(fn: str, info: LayerInfo, ts: Sequence[Tensor], labels: Tensor,
               grads: Optional[Sequence[Optional[Tensor]]] = None,
               views: Optional[Sequence[Tuple[Tensor, bool]]] = None) -> Tuple[Tensor, bool, Optional[Tensor]]:
    """``(x, channels_last, g)``: a layer's taps ``ts`` (one per call) and their gradients joined along s;
    a missing gradient (None: that call does not reach the target) counts as zero. ``views``: the taps'
    :func:`tap_views`, where the caller has them."""
    if views is None:
        views = tap_views(fn, info, ts, labels)
    x, cl = join_calls(fn, info, views, labels)
    if grads is None:
        return x, cl, None
    gs = [(torch.zeros_like(v) if g is None else g if g.shape == v.shape else g.reshape(v.shape), c)
          for g, (v, c) in zip(grads, views)]
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


def warn_unmasked(fn: str, missed: Dict[str, list], t: int, stacklevel: int = 3) -> None:
    """Warn (once per run: the caller remembers) that a batch's mask ``[B, T]`` could not apply to the
    positions of the layers ``missed`` (name: tap shape), whose taps are not ``[B, T, N]``, or (``missed``
    empty) to any layer (docs/method.md §2)."""
    where = (f"every position of layer(s) {missed} (name: tap shape) still counts" if missed else
             "no sliced layer has such a tap, so it changes nothing")
    warnings.warn(f"{fn}: the mask of valid positions [B, {t}] (attention_mask, or mask=) applies to taps "
                  f"[B, {t}, N] only; {where} (a sample without any valid position counts nowhere)",
                  stacklevel=stacklevel)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile``'s wrapper
    (docs/method.md §1): hooks go on it and layer names carry no ``module.`` / ``_orig_mod.`` prefix, so a
    profile from the wrapper is the bare model's."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):     # torch.compile(model): OptimizedModule
            model = model._orig_mod
        else:
            return model


def compiled_hint(model: nn.Module) -> str:
    """When ``model`` is compiled (``torch.compile``'s wrapper, or ``nn.Module.compile()`` on it or a submodule):
    why a hook added to it may never run, and what to do (appended to the engine's "not tapped" errors). Code
    compiled before the hooks were added does not see them: dynamo does not guard on module hooks
    (``torch._dynamo.config.skip_nnmodule_hook_guards``)."""
    if not (isinstance(getattr(model, "_orig_mod", None), nn.Module)
            or any(getattr(m, "_compiled_call_impl", None) is not None for m in unwrap(model).modules())):
        return ""
    return (". The model is compiled, and code compiled before the Profiler was attached does not run its hooks "
            "(torch._dynamo.config.skip_nnmodule_hook_guards): attach the Profiler before the first compiled call, "
            "or call torch._dynamo.reset() after attaching it")


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
    if not unused and not plan.batchless:
        return plan
    why = [f"never called in forward: {list(plan.unused)}"] if plan.unused else []
    why += [f"called, but no gradient reaches them: {list(no_grad)}"] if no_grad else []
    why += [f"run on no sample (outputs without the batch dim): {list(plan.batchless)}"] if plan.batchless else []
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


class StatusWords:
    """One batch's accumulate_ status words (docs/architecture.md, "Deferred status"): one int32 per layer
    and device, so that no call waits for the device (on a GPU each read is a synchronisation, and one per
    layer stalled the training step), and one read per device when the batch ends says which layers failed.

    Only on the device types in ``DEFERRED``: elsewhere ``slot`` gives None and the call raises at once, as
    the CPU backends run synchronously anyway (a status there only adds host time: 21.7 -> 28.6 us on a
    tiny call, docs/architecture.md "Deferred status")."""

    DEFERRED = ("cuda",)

    def __init__(self, n: int):
        self.n = n
        self.words: Dict[torch.device, Tensor] = {}

    def slot(self, i: int, device: torch.device) -> Optional[Tensor]:
        """Layer ``i``'s word on ``device`` (a one-element view), or None off ``DEFERRED`` devices."""
        if device.type not in self.DEFERRED:
            return None
        w = self.words.get(device)
        if w is None:
            w = self.words[device] = torch.zeros(self.n, dtype=torch.int32, device=device)
        return w[i:i + 1]

    def failed(self) -> List[Tuple[int, Exception]]:
        """``(layer, the error its calls deferred)`` of every layer whose word is nonzero, layers ascending."""
        codes: Dict[int, int] = {}
        for w in self.words.values():
            for i, c in enumerate(w.tolist()):
                if c:
                    codes[i] = codes.get(i, 0) | c
        out = []
        for i in sorted(codes):
            try:
                raise_for_status("accumulate_", codes[i], "status")
            except NeusliceError as e:
                out.append((i, e))
        return out


def new_stats(k: int, n: int, dtype: torch.dtype, device, keep: Sequence[str] = STATS) -> Dict[str, Tensor]:
    """Zeroed statistics ``keep`` (``count`` always): ``count [k]``, the others ``[k, n]``."""
    return {s: torch.zeros((k,) if s == "count" else (k, n), dtype=dtype, device=device)
            for s in STATS if s == "count" or s in keep}


_LAZY_BYTES = 1 << 20


def _lazy_zeros(shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A zero CPU tensor whose pages are mapped on first write (an anonymous mapping, as calloc gives): a
    ``[K, N]`` total costs time and resident memory only for the rows written, i.e. the classes seen."""
    nbytes = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        nbytes *= d
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)   # the tensor keeps the mapping


def new_totals(k: int, n: int, device, keep: Sequence[str] = STATS) -> Dict[str, Tensor]:
    """The float64 totals of one layer (:func:`new_stats` of ``keep``). On the CPU a large ``[K, N]`` total is
    mapped lazily (:func:`_lazy_zeros`), so creating, filling and freeing the totals costs time and memory in
    proportion to the classes present in the data, not to K (docs/method.md §2, Precision)."""
    device = torch.device(device)
    if device.type != "cpu" or k * n * 8 < _LAZY_BYTES:
        return new_stats(k, n, torch.float64, device, keep)
    return {s: (torch.zeros(k, dtype=torch.float64) if s == "count" else _lazy_zeros((k, n), torch.float64))
            for s in STATS if s == "count" or s in keep}


def compact_ignore(ignore_index: int) -> int:
    """The label that marks a skipped sample/token among the compact labels of :func:`present_classes`."""
    return ignore_index if ignore_index < 0 else -1


def present_classes(labels: Tensor, ignore_index: int = -100) -> Tuple[Tensor, Tensor]:
    """``(present, compact)``: the classes in a batch's ``labels`` (sorted, unique, ``[Kp]`` with Kp ≤ B, or
    ≤ B·T per token; ``ignore_index`` is no class) and ``labels`` as indices into ``present`` (same shape;
    skipped ones are ``compact_ignore(ignore_index)``). A batch accumulates into ``new_stats(Kp, ...)`` with the
    compact labels and is added to the ``[K, N]`` totals by :func:`add_present`, so its memory and time do not
    grow with K (docs/method.md §2). It reads the labels' values: the engine passes their :func:`host_copy`."""
    keep = labels != ignore_index
    if bool(keep.all()):
        present, compact = torch.unique(labels, sorted=True, return_inverse=True)
        return present, compact.reshape(labels.shape)
    present, inv = torch.unique(labels[keep], sorted=True, return_inverse=True)
    compact = torch.full_like(labels, compact_ignore(ignore_index))
    compact[keep] = inv
    return present, compact


def add_present(totals: Dict[str, Tensor], batch: Dict[str, Tensor], present: Tensor,
                skip: Sequence[str] = ()) -> None:
    """Add a batch's ``[Kp, ...]`` sums into the rows ``present`` of the float64 ``[K, ...]`` totals (each
    row once: the same numbers as adding a ``[K, ...]`` batch buffer whose absent rows are zero)."""
    on: Dict[torch.device, Tensor] = {}     # present on each device the totals use (one copy each, not one per sum)
    for s, v in batch.items():
        if s in skip:
            continue
        tot = totals[s]
        where = on.get(tot.device)
        if where is None:
            where = on[tot.device] = present.to(tot.device)
        tot.index_add_(0, where, v.to(device=tot.device, dtype=tot.dtype))


def add_present_all(pairs: Sequence[Tuple[Dict[str, Tensor], Dict[str, Tensor]]], present: Tensor) -> None:
    """:func:`add_present` of every ``(totals, batch)`` pair (one per layer). When every class is present
    (``present`` is then ``0..K-1``, sorted) and all tensors share a device, it is one ``torch._foreach_add_``
    call: each float32 value is added to its float64 total exactly as ``index_add_`` adds it (one rounding
    of the float64 sum), for the cost of one Python call instead of two torch ops per statistic and layer."""
    if not pairs:
        return
    dst = [tot[s] for tot, st in pairs for s in st]
    src = [v for _, st in pairs for v in st.values()]
    k = dst[0].shape[0]
    dev = dst[0].device
    if present.numel() == k:
        # One tensor of each dict answers for all of it (new_totals and new_stats make a dict's tensors on one
        # device with one leading size): asking all 2 x 4 x 73 of a BERT's took 0.12 ms a step, one per dict 0.02.
        firsts = (next(iter(d.values())) for pair in pairs for d in pair)
        if all(t.device == dev and t.shape[0] == k for t in firsts):
            torch._foreach_add_(dst, src)
            return
    for tot, st in pairs:
        add_present(tot, st, present)


def layer_entries(plan: Plan, deeplift: Dict[str, str]) -> List[dict]:
    return [{**layer_entry(i.name, i.module), "n": i.n, "tap": i.tap, "tap_source": i.tap_source,
             "deeplift": deeplift.get(i.name)} for i in plan.layers]


def target_of(fn: str, out, labels: Tensor, target: str, ignore_index: int = -100,
              mask: Optional[Tensor] = None) -> Tensor:
    """The scalar whose gradient is taken: Σ_b f_{y_b} (``"logit"``) or Σ_b loss_b (``"loss"``), over the
    samples (tokens) that count: labels equal to ``ignore_index`` and, per token, positions where ``mask``
    ``[B, T]`` is False are left out (docs/method.md §2)."""
    if not isinstance(out, Tensor) or out.dim() != labels.dim() + 1 or out.shape[:-1] != labels.shape:
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        want = "[B, K]" if labels.dim() == 1 else "[B, T, K] (per-token labels)"
        raise ValueError(f"{fn}: the model output must be logits {want} matching labels {list(labels.shape)}, "
                         f"got {shape}")
    keep = labels != ignore_index
    if labels.dim() == 2 and mask is not None:
        keep = keep & mask.to(keep.device)
    if not bool(keep.all()):
        out, labels = out[keep], labels[keep]                 # [M, K], [M]: the samples/tokens that count
    if labels.numel() and int(labels.max()) >= out.shape[-1]:
        raise ValueError(f"{fn}: label {int(labels.max())} has no logit: the model gives {out.shape[-1]} outputs")
    if target == "logit":
        return out.gather(-1, labels.unsqueeze(-1)).sum()
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1), reduction="sum")


def dl_forms(fn: str, plan: Plan, rescale: bool, warn: bool) -> Dict[str, str]:
    """Per layer: ``"rescale"``, or ``"gradient"`` (m = g) for every layer when the model has no nonlinearity the
    Rescale rule can see (no module, no functional one at a sliced layer's tap); warns once then."""
    if warn and not rescale and plan.layers:
        warnings.warn(f"{fn}: DeepLIFT uses gradient × Δ (m = g) for layer(s) {[i.name for i in plan.layers]}: the "
                      "model has no nonlinearity module, nor a functional nonlinearity at a sliced layer's output, "
                      "that the Rescale rule can see", stacklevel=3)
    return {i.name: ("rescale" if rescale else "gradient") for i in plan.layers}
