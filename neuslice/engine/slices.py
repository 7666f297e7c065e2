"""The ``Profile`` and ``Slices`` objects and their files (docs/method.md §5).

``Profile``: per layer, the docs/method.md §2 sums (float64): ``count [K]`` and those of ``act_sum``, ``act_sq``,
``taylor_sum``, ``deeplift_sum`` ``[K, N]`` that its metrics need (``metrics.kept_stats``). Sums merge by
addition (``p1 + p2``, :meth:`Profile.all_reduce`). ``Slices``: per layer, the critical sets ``bool [K, N]`` of a slicing run.
"""
from __future__ import annotations

import abc
import hashlib
import json
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..io import container as _io
from . import heads as _heads, masking, merge, metrics as _metrics
from .graph import check_model
from .classes import ClassSpec, class_indices

__all__ = ["Profile", "Slices", "STATS"]

STATS = _metrics.STATS
_COMPAT = ("num_classes", "metrics", "target", "deeplift")
_BASE_METRICS = ("avg", "var", "taylor", "deeplift")
_DEEPLIFT = ("rescale", "gradient")
_MODES = ("global", "category", "semantic")


def _attention_meta(attention) -> dict:
    """The ``attention`` field, written only when there are blocks (files without attention stay as before)."""
    return {"attention": [_heads.to_entry(a) for a in attention]} if attention else {}


class _LayerSet(abc.ABC):
    """What a Profile and a Slices share: per-layer entries (``layers``) and ``class_names``."""

    layers: List[dict]
    heads: List[dict]
    class_names: List[str]

    @property
    def layer_names(self) -> List[str]:
        return [e["name"] for e in self.layers]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_indices(self, fn: str, classes: ClassSpec) -> List[int]:
        """``classes`` (an index, a class name, or an iterable of them) as sorted class indices; each must be
        usable here (a profile: has samples; slices: has a critical set)."""
        return class_indices(fn, self.class_names, classes, self._unavailable)

    @abc.abstractmethod
    def _unavailable(self, k: int) -> str:
        """Why class ``k`` cannot be used, or ``""``."""

    @property
    def signature(self) -> str:
        """Hash of the sliced layers' names, types, shapes and widths in order, and of the head (docs/method.md §5)."""
        return _io.signature(self.layers, self.heads)

    def check_model(self, fn: str, model: nn.Module) -> None:
        """:class:`~neuslice.SignatureError` unless ``model`` is the model these layers were made for
        (docs/method.md §5: sliced layers' names, types, widths and order, and the head)."""
        check_model(fn, self.layers, self.heads, model)

    @staticmethod
    def _common_fields(f: _io.Fields, layer_keys: dict):
        """What both files hold: layers, heads, class names (K), coupled groups, attention blocks (optional:
        none in a file written before they were recorded); the signature checked."""
        layers = f.layers("layers", layer_keys)
        heads = f.heads()
        f.signature(layers, heads)
        names = f.names(f.get("class_names"), "class_names")
        return layers, heads, names, f.coupled("coupled", layers), _heads.blocks_of(f.attention("attention", layers))


class Profile(_LayerSet):
    """Per-class neuron statistics of a model's sliced layers (docs/method.md §2).

    Attributes:
        layers: one dict per layer: ``name``, ``type``, ``weight_shape``, ``n`` (neurons), ``tap`` (module
            whose output was read), ``tap_source`` (``"graph"``, ``"probe"``, ``"module order"`` or ``"layer"``),
            ``deeplift`` (``"rescale"`` or ``"gradient"``: gradient × Δ).
        stats: ``{layer: {stat: Tensor}}``; ``count`` float64 ``[K]``, the others float64 ``[K, N]``: only
            those the metrics need (:attr:`statistics`; files of older versions hold all five).
        class_names: K names. metrics: the metrics whose statistics were collected.
        target: ``"logit"`` or ``"loss"``. deeplift: ``"rescale"``, ``"gradient"`` (gradient × Δ on some
            or all layers), or None when not collected. num_batches: batches added.
        coupled: lists of layer names whose channels must stay equal in number (residual adds,
            depthwise convolutions): slicing keeps their union.
        heads: the model's head layer(s) (``name``, ``type``, ``n``), part of the signature; empty when unknown.
        attention: the model's attention blocks (:class:`~neuslice.engine.graph.Attention`); slicing selects
            whole heads in those whose q, k and v layers are all sliced (docs/method.md §4).
    """

    def __init__(self, layers: List[dict], class_names: Sequence[str], stats: Dict[str, Dict[str, Tensor]], *,
                 metrics: Sequence[str], target: str, deeplift: Optional[str], num_batches: int = 0,
                 coupled: Sequence[Sequence[str]] = (), heads: Sequence[dict] = (), attention: Sequence = ()):
        self.layers = [dict(e) for e in layers]
        self.heads = [dict(h) for h in heads]
        self.coupled = [list(g) for g in coupled]
        self.attention = _heads.blocks_of(attention)
        self.class_names = [str(c) for c in class_names]
        self.stats = stats
        self.metrics = tuple(metrics)
        self.target = target
        self.deeplift = deeplift
        self.num_batches = int(num_batches)
        kept = [tuple(s for s in STATS if s in st) for st in stats.values()]
        if any(k != kept[0] or "count" not in k or len(k) != len(st) for k, st in zip(kept, stats.values())):
            raise ValueError(f"neuslice.Profile: every layer must hold count and the same statistics of {STATS}, "
                             f"got {[list(st) for st in stats.values()]}")
        self._statistics = kept[0] if kept else ("count",)

    # -- views -----------------------------------------------------------------------------
    @property
    def statistics(self) -> tuple:
        """The statistics this profile keeps (``count`` and those its metrics need), in ``STATS`` order."""
        return self._statistics

    @property
    def counts(self) -> Tensor:
        """Samples (or tokens) per class, float64 ``[K]`` (of the first layer; every layer sees the same)."""
        return self.stats[self.layers[0]["name"]]["count"]

    def score(self, metric: str) -> Dict[str, Tensor]:
        """Per-class scores ``{layer: float64 [K, N]}`` (docs/method.md §3); NaN rows for classes without samples."""
        return _metrics.score(self, metric)

    def class_agnostic(self, metric: str) -> Dict[str, Tensor]:
        """Count-weighted mean over classes of :meth:`score`: ``{layer: float64 [N]}``."""
        return _metrics.class_agnostic(self, metric)

    def _unavailable(self, k: int) -> str:
        if float(self.counts[k]) > 0:
            return ""
        return ("has no samples in the profile, so it has no score; profile data with that class or pass "
                "classes= without it")

    def __repr__(self) -> str:
        return (f"Profile({len(self.layers)} layers, {self.num_classes} classes, "
                f"{int(self.counts.sum())} samples, metrics={self.metrics}, target={self.target!r})")

    # -- merging -----------------------------------------------------------------------------
    def _check_compatible(self, fn: str, other: "Profile") -> None:
        if not isinstance(other, Profile):
            raise TypeError(f"{fn}: expected a Profile, got {type(other).__name__}")
        if self.signature != other.signature:
            raise ValueError(f"{fn}: the profiles are of different layers: {self.layer_names} vs "
                             f"{other.layer_names} (signatures {self.signature} vs {other.signature})")
        for attr in _COMPAT + ("class_names",):
            if getattr(self, attr) != getattr(other, attr):
                raise ValueError(f"{fn}: the profiles differ in {attr}: {getattr(self, attr)!r} vs "
                                 f"{getattr(other, attr)!r}")

    def __add__(self, other: "Profile") -> "Profile":
        """A new profile holding both profiles' sums (profiles of disjoint data merge exactly this way)."""
        self._check_compatible("neuslice.Profile.__add__", other)
        both = [k for k in self.statistics if k in other.statistics]   # equal metrics: both hold what they need
        stats = {n: {k: self.stats[n][k] + other.stats[n][k].to(self.stats[n][k].device) for k in both}
                 for n in self.layer_names}
        return Profile(self.layers, self.class_names, stats, metrics=self.metrics, target=self.target,
                       deeplift=self.deeplift, num_batches=self.num_batches + other.num_batches,
                       coupled=self.coupled, heads=self.heads, attention=self.attention)

    def all_reduce(self, group=None) -> "Profile":
        """Sum this profile over the ranks of ``torch.distributed`` ``group`` in place; returns self.

        One ``all_reduce(SUM)`` per tensor (on the current CUDA device under NCCL, else where the
        tensors are). Every rank must hold a profile of the same layers and classes: checked first,
        on every rank, with one more all_reduce of a signature hash (all ranks raise together)."""
        import torch.distributed as dist
        fn = "neuslice.Profile.all_reduce"
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{fn}: torch.distributed is not initialised; call init_process_group first")
        dev = self.counts.device
        if dist.get_backend(group) == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        key = json.dumps([self.signature, self.class_names, self.metrics, self.target, self.deeplift,
                          self.statistics])
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")
        hs = torch.tensor([h, -h], dtype=torch.int64, device=dev)
        dist.all_reduce(hs, op=dist.ReduceOp.MAX, group=group)
        if int(hs[0]) != h or int(hs[1]) != -h:
            raise ValueError(f"{fn}: ranks hold profiles of different layers, classes or metrics "
                             f"(this rank: signature {self.signature}, classes {self.class_names})")
        for name in self.layer_names:
            for k, v in self.stats[name].items():
                t = v.to(dev)
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
                v.copy_(t)
        nb = torch.tensor([self.num_batches], dtype=torch.int64, device=dev)
        dist.all_reduce(nb, op=dist.ReduceOp.SUM, group=group)
        self.num_batches = int(nb)
        return self

    def to(self, device) -> "Profile":
        """A copy with every statistic on ``device``."""
        stats = {n: {k: v.to(device, copy=True) for k, v in s.items()} for n, s in self.stats.items()}
        return Profile(self.layers, self.class_names, stats, metrics=self.metrics, target=self.target,
                       deeplift=self.deeplift, num_batches=self.num_batches, coupled=self.coupled,
                       heads=self.heads, attention=self.attention)

    # -- files -----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the profile to one safetensors file at ``path``, atomically (write, then rename)."""
        tensors = {f"{i}.{k}": v for i, n in enumerate(self.layer_names) for k, v in self.stats[n].items()}
        meta = {"layers": self.layers, "class_names": self.class_names, "metrics": list(self.metrics),
                "target": self.target, "deeplift": self.deeplift, "num_batches": self.num_batches,
                "coupled": self.coupled, "heads": self.heads, "signature": self.signature,
                **_attention_meta(self.attention)}
        _io.write("neuslice.Profile.save", path, "profile", tensors, meta)

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None) -> "Profile":
        """Read a profile written by :meth:`save`. With ``model``, it must be the model the profile was made
        for (else :class:`~neuslice.SignatureError` naming the layer that differs). A truncated, corrupt or
        invalid file raises :class:`~neuslice.FileFormatError` naming the file and the field (docs/method.md
        §5); nothing is unpickled."""
        fn = "neuslice.Profile.load"
        tensors, doc = _io.read(fn, path, "profile")
        f = _io.Fields(fn, path, "profile", doc, tensors)
        layer_keys = {"tap": f.str,
                      "tap_source": lambda v, field: f.str(v, field, ("graph", "probe", "module order", "layer")),
                      "deeplift": lambda v, field: f.str(v, field, _DEEPLIFT, none=True)}
        layers, heads, names, coupled, attention = cls._common_fields(f, layer_keys)
        metrics = f.names(f.get("metrics"), "metrics", choices=_BASE_METRICS)
        deeplift = f.str(f.get("deeplift"), "deeplift", _DEEPLIFT, none=True)
        if (deeplift is None) != ("deeplift" not in metrics):
            raise f.error("deeplift", f"is {deeplift!r} but the metrics are {metrics}")
        for i, e in enumerate(layers):
            if (e["deeplift"] is None) != (deeplift is None) or (deeplift == "rescale" and e["deeplift"] != deeplift):
                raise f.error(f"layers[{i}].deeplift", f"is {e['deeplift']!r} but the profile's is {deeplift!r}")
        k = len(names)
        need = _metrics.kept_stats(metrics)     # files of older versions hold all five: the rest load too
        kept = [s for s in STATS if s in need or (layers and f"0.{s}" in f.tensors)]
        stats = {e["name"]: {s: f.tensor(f"{i}.{s}", [k] if s == "count" else [k, e["n"]], torch.float64)
                             for s in kept} for i, e in enumerate(layers)}
        f.no_other_tensors()
        prof = cls(layers, names, stats, metrics=metrics, target=f.str(f.get("target"), "target", ("logit", "loss")),
                   deeplift=deeplift, num_batches=f.int(f.get("num_batches"), "num_batches"), coupled=coupled,
                   heads=heads, attention=attention)
        if model is not None:
            prof.check_model(fn, model)
        return prof


class Slices(_LayerSet):
    """Critical neuron sets of a slicing run (docs/method.md §4).

    Attributes:
        layers: per layer ``name``, ``type``, ``weight_shape``, ``n``. class_names: K names.
        critical: ``{layer: bool [K, N]}``: row k is class k's critical set (global mode: every row the same).
        sliced: bool ``[K]``: classes that have a critical set. scores: ``{layer: float64 [K, N]}`` used.
        mode: ``"global"``, ``"category"`` or ``"semantic"``; metric; value: p (ratio) or Θ;
        share (ρ), tau (τ), min_keep; coupled: lists of layer names whose channels are kept as one.
        heads: the model's head layer(s) (``name``, ``type``, ``n``), part of the signature; empty when unknown.
        attention: the model's attention blocks (from the profile); in those whose q, k and v layers are all
            sliced, every critical set is constant on each head (key/value group) (docs/method.md §4).
    """

    CATEGORIES = merge.CATEGORIES

    def __init__(self, layers: List[dict], class_names: Sequence[str], critical: Dict[str, Tensor], sliced: Tensor,
                 scores: Dict[str, Tensor], *, mode: str, metric: str, value: float, share: float = 0.5,
                 tau: float = 0.5, min_keep: int = 1, coupled: Sequence[Sequence[str]] = (),
                 heads: Sequence[dict] = (), attention: Sequence = ()):
        self.layers = [dict(e) for e in layers]
        self.heads = [dict(h) for h in heads]
        self.attention = _heads.blocks_of(attention)
        self.class_names = [str(c) for c in class_names]
        self.critical_sets = critical
        self.sliced = sliced
        self.scores = scores
        self.mode, self.metric, self.value = mode, metric, float(value)
        self.share, self.tau, self.min_keep = float(share), float(tau), int(min_keep)
        self.coupled = [list(g) for g in coupled]

    def _unavailable(self, k: int) -> str:
        if bool(self.sliced[k]):
            return ""
        return "has no critical set: it had no samples in the profile or was left out of the slicing"

    def __repr__(self) -> str:
        what = "ratio" if self.mode != "semantic" else "theta"
        return (f"Slices({self.mode}, metric={self.metric!r}, {what}={self.value}, {len(self.layers)} layers, "
                f"{int(self.sliced.sum())}/{self.num_classes} classes)")

    def critical(self, k: Union[int, str]) -> Dict[str, Tensor]:
        """Class ``k``'s critical sets: ``{layer: bool [N]}``."""
        (k,) = self.class_indices("neuslice.Slices.critical", [k])
        return {n: c[k].clone() for n, c in self.critical_sets.items()}

    def mask(self, classes: ClassSpec) -> Dict[str, Tensor]:
        """The slice serving ``classes``: per layer, the union of their critical sets, ``{layer: bool [N]}``."""
        idx = self.class_indices("neuslice.Slices.mask", classes)
        return {n: c[idx].any(0) for n, c in self.critical_sets.items()}

    def categories(self) -> Dict[str, Dict[str, Tensor]]:
        """``{"shared"|"group"|"specific"|"free": {layer: bool [N]}}`` (docs/method.md §4; a neuron is ``shared`` when
        critical for at least max(2, ⌈share·K⌉) of the K sliced classes, ``specific`` for exactly one)."""
        return merge.categories(self)

    def similarity(self) -> Tensor:
        """Class similarity ``S`` float64 ``[K, K]`` (neuron-weighted Jaccard of critical sets; NaN for
        classes without a critical set)."""
        return merge.similarity(self)

    def groups(self) -> List[List[int]]:
        """Semantic groups: average-linkage clusters of the sliced classes on 1 − S, cut below ``tau``."""
        return merge.groups(self)

    def compression_rate(self, model: nn.Module, classes: ClassSpec, *, restrict_head: bool = True,
                         example_inputs=None) -> float:
        """Fraction of ``model``'s parameters that belong to neurons outside the slice of ``classes``
        (incoming weights, bias, norm entries, the next layers' reading weights, attention heads' output
        columns; with ``restrict_head``, also the head rows of the other classes): exactly what physical
        restructure removes. An untraceable model not yet run through neuslice in this process needs
        ``example_inputs`` (one batch) to find who reads each layer."""
        return masking.compression_rate(self, model, classes, restrict_head=restrict_head,
                                        example_inputs=example_inputs)

    def apply(self, model: nn.Module, classes: ClassSpec):
        """Context manager: ``model`` computes with every neuron outside the slice of ``classes`` zeroed
        (at the end of its layer → norm → activation chain); hooks removed on exit."""
        return masking.MaskedModel(self, model, classes)

    # -- files -----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the slices to one safetensors file at ``path``, atomically."""
        tensors = {"sliced": self.sliced}
        for i, n in enumerate(self.layer_names):
            tensors[f"{i}.critical"] = self.critical_sets[n]
            tensors[f"{i}.scores"] = self.scores[n]
        meta = {"layers": self.layers, "class_names": self.class_names, "mode": self.mode, "metric": self.metric,
                "value": self.value, "share": self.share, "tau": self.tau, "min_keep": self.min_keep,
                "coupled": self.coupled, "heads": self.heads, "signature": self.signature,
                **_attention_meta(self.attention)}
        _io.write("neuslice.Slices.save", path, "slices", tensors, meta)

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None) -> "Slices":
        """Read slices written by :meth:`save`; with ``model``, it must be the model they were made for (else
        :class:`~neuslice.SignatureError` naming the layer). A truncated, corrupt or invalid file raises
        :class:`~neuslice.FileFormatError` naming the file and the field (docs/method.md §5); nothing is
        unpickled."""
        fn = "neuslice.Slices.load"
        tensors, doc = _io.read(fn, path, "slices")
        f = _io.Fields(fn, path, "slices", doc, tensors)
        layers, heads, names, coupled, attention = cls._common_fields(f, {})
        k = len(names)
        crit = {e["name"]: f.tensor(f"{i}.critical", [k, e["n"]], torch.bool) for i, e in enumerate(layers)}
        scores = {e["name"]: f.tensor(f"{i}.scores", [k, e["n"]], torch.float64) for i, e in enumerate(layers)}
        sliced = f.tensor("sliced", [k], torch.bool)
        f.no_other_tensors()
        out = cls(layers, names, crit, sliced, scores, mode=f.str(f.get("mode"), "mode", _MODES),
                  metric=f.str(f.get("metric"), "metric", _metrics.METRICS),
                  value=f.number(f.get("value"), "value", 0.0, 1.0, open_lo=True),
                  share=f.number(f.get("share"), "share", 0.0, 1.0), tau=f.number(f.get("tau"), "tau", 0.0, 1.0),
                  min_keep=f.int(f.get("min_keep"), "min_keep"), coupled=coupled, heads=heads, attention=attention)
        if model is not None:
            out.check_model(fn, model)
        return out
