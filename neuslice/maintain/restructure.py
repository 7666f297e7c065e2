"""Restructure: keep the classes T (critical-neuron preservation; see docs/method.md).

``mask`` mode hooks a copy of the model so every neuron outside the slice of T is zeroed at the end of
its layer → norm → activation chain, and restricts the logits to T. ``physical`` mode builds a smaller
module: our code decides which neurons go (the slice), Torch-Pruning's dependency graph removes them with
everything coupled to them (the next layers' reading weights, BatchNorm entries, residual adds,
depthwise convolutions, flatten into Linear), and the head keeps only the rows of T. With attention blocks
recorded (a transformer), whole heads and FFN neurons are cut along the plan's couplings instead
(``_surgery``); the residual width never changes. Output ``i`` of the
result is class ``T[i]``; the result carries that class map. The input model is never modified.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import heads as _heads
from ..engine.graph import LayerInfo, Plan, discover
from ..engine.hooks import ChainHooks, zero_outside
from ..engine.capture import call_model, logits_of, model_device, to_device
from ..engine.slices import Slices
from . import _common as C

__all__ = ["RestructuredModel", "RestructureReport", "FinetuneReport", "restructure", "finetune", "removable_layers"]

class RestructuredModel(nn.Module):
    """A classifier serving the classes T of a larger model: ``forward(x) -> logits [B, |T|]`` (float32),
    output ``i`` is original class ``class_map[i]``.

    Attributes:
        module: the (copied) network. mode: ``"mask"`` or ``"physical"``.
        class_map: int64 ``[|T|]`` buffer, the original class id of each output. class_names: T's names.
        original_params: parameter count of the model it came from (the compression reference).
        kept: ``{layer: neurons kept}`` per sliced layer.
    """

    def __init__(self, module: nn.Module, classes: Sequence[int], class_names: Sequence[str], *, mode: str,
                 original_params: int, kept: Dict[str, int], infos: Optional[List[LayerInfo]] = None,
                 masks: Optional[Dict[str, Tensor]] = None):
        super().__init__()
        self.module = module
        self.mode = mode
        # On the module's device, as a buffer moves with it later: predict indexes it with the logits' argmax
        # (a CPU map indexed by CUDA indices failed: neuslice demo --device cuda).
        self.register_buffer("class_map", torch.as_tensor(list(classes), dtype=torch.int64, device=model_device(module)))
        self.class_names = list(class_names)
        self.original_params = int(original_params)
        self.kept = dict(kept)
        self._infos = infos or []
        for i, info in enumerate(self._infos):
            self.register_buffer(f"_mask{i}", masks[info.name].clone())

    @property
    def num_params(self) -> int:
        return C.param_count(self.module)

    @property
    def compression_rate(self) -> float:
        """Fraction of the original model's parameters physically removed (0 in mask mode)."""
        return 1.0 - self.num_params / self.original_params if self.original_params else 0.0

    def _zero(self, i: int, t: Tensor) -> Tensor:
        return zero_outside(t, getattr(self, f"_mask{i}"), self._infos[i].module)

    def forward(self, *args, **kwargs) -> Tensor:
        if self.mode == "physical":
            return logits_of(self.module(*args, **kwargs))
        hooks = ChainHooks(self.module, self._infos, self._zero, point="end")
        try:
            out = logits_of(self.module(*args, **kwargs))
        finally:
            hooks.remove()
        return out[..., self.class_map]

    @torch.no_grad()
    def predict(self, x) -> Tensor:
        """Original class ids of the argmax outputs: int64 ``[B]``."""
        idx = call_model(self, x).argmax(-1)
        return self.class_map.to(idx.device)[idx]

    def targets(self, labels: Tensor) -> Tensor:
        """Original class ids ``[B]`` → output indices ``[B]`` int64; a label outside T is an error."""
        eq = labels.reshape(-1, 1).to(self.class_map.device) == self.class_map.view(1, -1)
        if not bool(eq.any(1).all()):
            bad = labels.reshape(-1)[~eq.any(1).to(labels.device)][0]
            raise ValueError(f"neuslice.RestructuredModel.targets: label {int(bad)} is not one of the kept classes "
                             f"{self.class_map.tolist()}")
        return eq.long().argmax(1).view(labels.shape).to(labels.device)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, classes={self.class_map.tolist()}, params={self.num_params} "
                f"(of {self.original_params})")


@dataclass
class RestructureReport(C.Report):
    """What one :func:`restructure` run made (the same numbers the :class:`RestructuredModel` carries)."""
    mode: str                  # "mask" or "physical"
    classes: List[int]         # the kept classes T, sorted: output i is class classes[i]
    class_names: List[str]
    original_params: int       # parameters of the input model
    params: int                # parameters of the result (equal to original_params in mask mode)
    compression_rate: float    # fraction of original_params physically removed (0 in mask mode)
    kept: Dict[str, int]       # neurons kept per sliced layer

    @classmethod
    def of(cls, model: RestructuredModel) -> "RestructureReport":
        return cls(model.mode, model.class_map.tolist(), list(model.class_names), model.original_params,
                   model.num_params, model.compression_rate, dict(model.kept))


@dataclass
class FinetuneReport(C.Report):
    """Numbers of one :func:`finetune` run; accuracies are fractions in [0, 1] (None: no eval_data given)."""
    steps: int
    accuracy_before: Optional[float]
    accuracy_after: Optional[float]


def _kept(plan: Plan, keep: Dict[str, Tensor]) -> Dict[str, int]:
    return {i.name: int(keep[i.name].sum()) for i in plan.layers}


def _mask_model(fn, model, slices, idx, keep, plan) -> RestructuredModel:
    module = copy.deepcopy(model)
    infos = C.rebind(plan, module)
    return RestructuredModel(module, idx, [slices.class_names[k] for k in idx], mode="mask",
                             original_params=C.param_count(model), kept=_kept(plan, keep), infos=infos,
                             masks={i.name: keep[i.name].cpu() for i in plan.layers})


def restructure(model: nn.Module, slices: Slices, classes, *, mode: str = "physical",
                example_inputs=None) -> Tuple[RestructuredModel, RestructureReport]:
    """A model serving only ``classes`` (critical-neuron preservation; see docs/method.md).

    Args:
        model: the classifier the slices were made for (logits ``[B, K]``); never modified.
        slices: its :class:`~neuslice.Slices`. classes: class indices or names (T), at least one.
        mode: ``"mask"`` (hooks zero the neurons outside the slice; logits restricted to T) or ``"physical"``
            (a smaller module built with Torch-Pruning's dependency graph).
        example_inputs: one input batch (tensor, tuple or dict), needed by ``physical`` mode to trace.

    Returns:
        ``(RestructuredModel, RestructureReport)``: the model in eval mode, ``forward(x) -> [B, |T|]``,
        ``predict(x) -> class ids``.
    """
    fn = "neuslice.restructure"
    C.check_module(fn, model)
    if mode not in ("mask", "physical"):
        raise ValueError(f"{fn}: mode must be 'mask' or 'physical', got {mode!r}")
    C.check_slices(fn, slices, model)
    idx = slices.class_indices(fn, classes)
    plan = C.plan_of(fn, slices, model, run=None if example_inputs is None else lambda: call_model(model, example_inputs))
    C.head_module(fn, plan, model, slices.num_classes)
    keep = slices.mask(idx)
    masked = _mask_model(fn, model, slices, idx, keep, plan).eval()
    if mode == "mask":
        return masked, RestructureReport.of(masked)
    if example_inputs is None:
        raise ValueError(f"{fn}: physical mode needs example_inputs (one input batch, e.g. x[:2]) to trace the "
                         "model's dependency graph; got None")
    from . import _prune
    # On the model's device: Torch-Pruning's graph build calls the model on them as they are (a GPU model
    # given CPU example inputs failed there: the CLI's restructure --device cuda).
    example_inputs = to_device(example_inputs, model_device(model))
    module = _prune.physical(fn, model, plan, keep, idx, example_inputs, masked,
                             attention=slices.attention or plan.attention)
    out = RestructuredModel(module, idx, masked.class_names, mode="physical", original_params=C.param_count(model),
                            kept=_kept(plan, keep)).eval()
    return out, RestructureReport.of(out)


def removable_layers(model: nn.Module, example_inputs) -> List[str]:
    """The sliceable layers whose neurons ``restructure(mode="physical")`` can remove, for ``profile(...,
    layers=...)``: every Conv/Linear but the head, less those whose width is the residual stream's
    (``Plan.residual``: attention out projections, FFN output layers, ...), less the q/k/v layers of an
    attention block that cannot be sliced whole, less layers called more than once in forward (shared
    weights, e.g. ALBERT's layer groups: restructure refuses them); in a model without attention blocks, less
    what Torch-Pruning's dependency graph shows restructure would refuse (channels reaching a LayerNorm, a
    coupled layer outside the slices: ConvNeXt's residual stream). ``example_inputs``: one input batch (the
    layers are found by what the model does on it). See docs/method.md §6 "Restructure"."""
    fn = "neuslice.removable_layers"
    C.check_module(fn, model)
    example_inputs = to_device(example_inputs, model_device(model))   # (as restructure: Torch-Pruning's graph)
    plan = discover(model, None, fn=fn, run=lambda: call_model(model, example_inputs))
    names = [i.name for i in plan.layers]
    whole = {x for a in _heads.active(plan.attention, names) for x in (a.q[0], a.k[0], a.v[0])}
    part = {x for a in plan.attention for x in (a.q[0], a.k[0], a.v[0])} - whole
    shared = [i.name for i in plan.layers if i.calls > 1]
    out = [n for n in names if n not in plan.residual and n not in part and n not in shared]
    refused = {}
    if not plan.attention and out:     # Torch-Pruning's path: what its dependency graph would refuse
        from . import _prune
        refused = _prune.refusals(fn, model, plan, [n for n in out if n not in plan.heads], example_inputs)
        out = [n for n in out if n not in refused]
    elif out:                          # the plan's own path (maintain/_surgery.py): what it would refuse
        from . import _surgery
        refused = _surgery.refusals(model, plan, [n for n in out if n not in whole and n not in plan.heads])
        out = [n for n in out if n not in refused]
    if not out:
        why = []
        if plan.residual:
            why.append(f"writing into the residual stream ({dict(list(plan.residual.items())[:3])})")
        if shared:
            why.append(f"called more than once in forward, with shared weights ({shared[:3]})")
        if part:
            why.append(f"q/k/v layers of attention blocks that cannot be sliced whole ({sorted(part)[:3]})")
        if refused:
            first = next(iter(refused))
            why.append(f"refused by the dependency graph ({list(refused)[:3]}; e.g. {refused[first]})")
        raise ValueError(f"{fn}: no layer of the model can be narrowed physically: every sliceable layer is one "
                         f"of: {'; '.join(why)}; use mode='mask'")
    return out


def _loss(model: RestructuredModel, x, y: Tensor) -> Tensor:
    out = call_model(model, x)
    return F.cross_entropy(out, model.targets(y).to(out.device))


def finetune(model: RestructuredModel, data, *, epochs: int = 1, lr: float = 1e-3, optimizer: str = "adamw",
             momentum: float = 0.9, weight_decay: float = 0.0, eval_data=None,
             seed: int = 0) -> Tuple[RestructuredModel, FinetuneReport]:
    """Fine-tune a copy of a restructured model with cross-entropy over its outputs.

    Args:
        model: a :class:`RestructuredModel` (from :func:`restructure`); never modified.
        data: ``(inputs, labels int64 [B])`` batches, labels the original class ids, all among the kept classes.
        epochs, lr, optimizer (``"adamw"`` or ``"sgd"``), momentum (sgd), weight_decay: the training. Every
            parameter trains (through ``ops.masked_sgd_``/``masked_adamw_`` with full masks).
        eval_data: held-out data of the kept classes, scored before and after; None: not scored (unlike
            :func:`compress`, which needs an accuracy after every iteration and so falls back to ``data``).
        seed: seeds the training (batch order of an unseeded shuffling loader, dropout).

    Returns:
        ``(fine-tuned copy in eval mode, FinetuneReport)``.
    """
    fn = "neuslice.finetune"
    if not isinstance(model, RestructuredModel):
        raise TypeError(f"{fn}: model must be a RestructuredModel (from neuslice.restructure), "
                        f"got {type(model).__name__}")
    C.check_training(fn, epochs, lr, optimizer)
    C.scan_labels(fn, data, model.class_map.tolist(), "data")
    out = copy.deepcopy(model).eval()
    before = C.score(out.predict, eval_data)
    masks = {n: None for n, _ in out.named_parameters()}
    steps = C.fit_masked(out, data, masks, epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, loss_fn=_loss, seed=seed)
    out.eval()
    return out, FinetuneReport(steps, before, C.score(out.predict, eval_data))
