"""Incremental development: learn new classes in non-critical neurons (see docs/method.md).

Frozen: the critical neurons of every old class (task A). Free: every other neuron of the sliced
layers. Training on task B changes a weight ``W[out, in]`` only where ``out`` or ``in`` is a free neuron
(per-weight masks through ``ops.masked_adamw_`` / ``masked_sgd_``), plus the head rows of the new
classes; frozen BatchNorm channels keep their running statistics bit-identical.

Inference is task-aware (:class:`TaskAwareModel`): ``task=A`` zeroes every free neuron and restricts
the logits to A; ``task=B`` uses every neuron and restricts the logits to B; ``task=None`` uses every
neuron and all logits. Since under ``task=A`` every changed weight multiplies a zero or feeds a zeroed
neuron, task-A predictions are bit-identical before and after learning B.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.graph import LAYER_TYPES, LayerInfo
from ..engine.hooks import ChainHooks, per_neuron, zero_outside
from ..engine.capture import call_model
from ..engine.slices import Slices
from . import _common as C

__all__ = ["TaskAwareModel", "IncrementalReport", "incremental", "free_weight_masks", "task_loss"]


class TaskAwareModel(nn.Module):
    """``forward(x, task=None)``: logits ``[B, |classes of task|]`` (output ``i`` is class
    ``tasks[task][i]``), or all ``[B, K]`` logits with every neuron for ``task=None``.

    Attributes: module (the network), tasks ``{name: sorted class ids}``, masked_task (the task whose free
    neurons are zeroed), class_names.
    """

    def __init__(self, module: nn.Module, infos: List[LayerInfo], keep: Dict[str, Tensor],
                 tasks: Dict[str, List[int]], masked_task: str, class_names: Sequence[str]):
        super().__init__()
        self.module = module
        self.tasks = {k: list(v) for k, v in tasks.items()}
        self.masked_task = masked_task
        self.class_names = list(class_names)
        self._infos = infos
        for i, info in enumerate(infos):
            self.register_buffer(f"_keep{i}", keep[info.name].clone())

    def _zero(self, i: int, t: Tensor) -> Tensor:
        return zero_outside(t, getattr(self, f"_keep{i}"), self._infos[i].module)

    def _classes(self, task) -> Tensor:
        if task not in self.tasks:
            raise ValueError(f"neuslice.TaskAwareModel: unknown task {task!r}; expected one of "
                             f"{list(self.tasks)} or None")
        return torch.as_tensor(self.tasks[task], dtype=torch.int64)

    def forward(self, x, task=None) -> Tensor:
        if task is None:
            return call_model(self.module, x)
        cls = self._classes(task)
        if task != self.masked_task:
            out = call_model(self.module, x)
        else:
            hooks = ChainHooks(self.module, self._infos, self._zero, point="end")
            try:
                out = call_model(self.module, x)
            finally:
                hooks.remove()
        return out[..., cls.to(out.device)]

    @torch.no_grad()
    def predict(self, x, task=None) -> Tensor:
        """Class ids int64 ``[B]`` of the argmax under ``task``."""
        out = self.forward(x, task=task)
        idx = out.argmax(-1)
        return idx if task is None else self._classes(task).to(idx.device)[idx]


@dataclass
class IncrementalReport(C.Report):
    """Numbers of one :func:`incremental` run; accuracies are fractions (None where no data was given):
    ``task_a_acc_*`` on ``eval_data``, ``task_b_acc_*`` on ``new_eval_data``.

    Task A: ``task_a_acc_before`` is the original model (every neuron, logits of A); ``task_a_acc_slice`` the
    task-A slice before learning B (``model(x, task=A)``: free neurons zeroed); ``task_a_acc_after`` the
    task-A slice after learning B, bit-identical to ``task_a_acc_slice`` by construction. The step from
    ``before`` to ``slice`` is the price of slicing, not forgetting. Task B: the original model
    (``before``; its new-class head rows untrained) and ``model(x, task=B)`` after learning B."""
    old_classes: List[int]
    new_classes: List[int]
    theta: float
    free_fraction: float
    trainable_params: int
    total_params: int
    steps: int
    replayed: int
    task_a_acc_before: Optional[float]
    task_a_acc_after: Optional[float]
    task_b_acc_before: Optional[float]
    task_b_acc_after: Optional[float]
    free_by_layer: Dict[str, int]   # free (trainable) neurons per sliced layer
    task_a_acc_slice: Optional[float] = None


def _warn_no_free_head_input(fn: str, plan, head_name: str, free: Dict[str, int], objective: str) -> None:
    """Warns when, under the joint objective, the sliced layers that feed the head have no free neuron while
    earlier layers do. The new classes can then reach the head only through frozen neurons, and training
    pushes the old classes' logits down by driving the early free neurons' fan-out into those frozen neurons:
    measured on digits (bench/eval_maintenance.py --seed 1, Θ = 0.7: 2 free neurons in the first conv, none
    in the last) task-B accuracy fell to chance (20%), against 96% with no free neuron at all and 99% at
    Θ = 0.6 (5 free in the last conv)."""
    feeding = C.head_inputs(plan, head_name)
    if objective != "joint" or not feeding or any(free[n] for n in feeding) or not any(free.values()):
        return
    warnings.warn(f"{fn}: no free neuron in {', '.join(repr(n) for n in feeding)} (the layer(s) feeding the head "
                  f"{head_name!r}) at this theta, while {sum(free.values())} earlier neuron(s) are free; with "
                  "objective='joint' the new classes can then collapse to chance (measured on digits). Use a "
                  "lower theta, or objective='task'.", UserWarning, stacklevel=4)


def _in_mask(consumer: nn.Module, free: Tensor, cols: int) -> Optional[Tensor]:
    """Weight-shaped bool mask of ``consumer``'s entries that read a free neuron (None if it reads elsewhere)."""
    w = consumer.weight
    if isinstance(consumer, nn.Linear):
        v = free.repeat_interleave(cols)
        return v.view(1, -1).expand(w.shape).clone() if v.numel() == w.shape[1] else None
    if free.numel() != consumer.in_channels:
        return None
    m = torch.zeros(w.shape, dtype=torch.bool)
    in_per, out_per = consumer.in_channels // consumer.groups, consumer.out_channels // consumer.groups
    for g in range(consumer.groups):
        sel = per_neuron(free[g * in_per:(g + 1) * in_per], w, last=False)
        m[g * out_per:(g + 1) * out_per] |= sel
    return m


def free_weight_masks(fn: str, model: nn.Module, slices: Slices, old: List[int], new: List[int]
                      ) -> Tuple[Dict[str, Tensor], Dict[nn.Module, Tensor], Dict[str, Tensor]]:
    """The weight-level rule (docs/method.md): ``({param name: bool mask, param.shape}, {chain norm: frozen [C]},
    {layer: frozen neurons [N]})`` for training new classes ``new`` with the critical neurons of ``old`` frozen."""
    plan = C.plan_of(fn, slices, model)
    head_name, head = C.head_module(fn, plan, model, slices.num_classes)
    frozen = {n: m.cpu() for n, m in slices.mask(old).items()}
    modules = dict(model.named_modules())
    out_free = {i.name: ~frozen[i.name] for i in plan.layers}
    rows = torch.zeros(head.out_features, dtype=torch.bool)
    rows[new] = True
    out_free[head_name] = rows
    in_free: Dict[str, Tensor] = {}
    for info in plan.layers:
        for cname, cols in info.consumers:
            m = _in_mask(modules[cname], ~frozen[info.name], cols)
            if m is not None:
                in_free[cname] = in_free[cname] | m if cname in in_free else m
    masks: Dict[str, Tensor] = {}
    for name, mod in modules.items():
        if not isinstance(mod, LAYER_TYPES) or (name not in out_free and name not in in_free):
            continue
        w = mod.weight
        mask = torch.zeros(w.shape, dtype=torch.bool)
        if name in out_free:
            mask |= out_free[name].view(-1, *([1] * (w.dim() - 1)))
            if mod.bias is not None:
                masks[f"{name}.bias"] = out_free[name].clone()
        if name in in_free:
            mask |= in_free[name]
        masks[f"{name}.weight"] = mask
    frozen_norms = {}
    for nname, (layer, norm) in C.chain_norms(plan, model).items():
        for pname, _ in norm.named_parameters(recurse=False):
            masks[f"{nname}.{pname}"] = out_free[layer].clone()
        frozen_norms[norm] = frozen[layer]
    return masks, frozen_norms, frozen


def _training_data(fn, data, replay, replay_data, seed: int):
    """``data`` itself, or its samples plus a ``replay`` fraction of ``replay_data`` (see ``_common.with_replay``);
    returns (data, number of replayed samples)."""
    if replay is None:
        return data, 0
    return C.with_replay(fn, data, replay_data, lambda n_new, n_old: max(1, round(float(replay) * n_old)), seed)


def _check_tasks(fn, slices, head_k, old_classes, new_classes, replay, replay_data):
    old = [int(i) for i in torch.nonzero(slices.sliced).flatten()] if old_classes is None else \
        slices.class_indices(fn, old_classes)
    new = [new_classes] if isinstance(new_classes, int) else list(new_classes or [])
    if not new:
        raise ValueError(f"{fn}: new_classes must name at least one class, got none")
    if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < head_k for c in new):
        raise ValueError(f"{fn}: new_classes must be ints in [0, {head_k}) (the head's outputs), got {new}")
    overlap = sorted(set(new) & set(old))
    if overlap:
        raise ValueError(f"{fn}: new_classes {sorted(set(new))} overlap the old classes {old} in {overlap}; "
                         "new classes must be ones the slices did not slice")
    if replay is not None:
        if isinstance(replay, bool) or not isinstance(replay, (int, float)) or not 0.0 < replay <= 1.0:
            raise ValueError(f"{fn}: replay must be a fraction in (0, 1] of replay_data, got {replay!r}")
        if replay_data is None:
            raise ValueError(f"{fn}: replay={replay} needs replay_data (old-task samples), got None")
    return old, sorted(set(new))


def _task_acc(model, data, classes, task=None) -> Optional[float]:
    predict = C.restricted_predict(model, classes) if task is None else lambda x: model.predict(x, task=task)
    return C.score(predict, data, classes)


def task_loss(num_classes: int, tasks: Sequence[Sequence[int]], objective: str = "task"):
    """``loss(model, inputs, labels [B]) -> scalar``, every neuron active. ``objective="task"``: each sample's
    cross-entropy over the logits of its own task (matching ``model(x, task=...)``); ``"joint"``: over the
    logits of all the tasks' classes together (plain fine-tuning of a classifier over old and new classes)."""
    task_of = torch.full((num_classes,), -1, dtype=torch.int64)
    for t, classes in enumerate(tasks):
        task_of[list(classes)] = 0 if objective == "joint" else t

    def loss(mod, x, y):
        logits = call_model(mod, x)
        y = y.to(logits.device)
        t = task_of.to(y.device)
        same = t[y].unsqueeze(1) == t.unsqueeze(0)
        return F.cross_entropy(logits.masked_fill(~same, float("-inf")), y)
    return loss


@C.renamed_kwargs("neuslice.incremental", data_b="data", eval_a="eval_data", eval_b="new_eval_data")
def incremental(model: nn.Module, slices: Slices, data, *, new_classes, replay: Optional[float] = None,
                replay_data=None, objective: str = "task", old_classes=None,
                task_names: Tuple[str, str] = ("A", "B"), epochs: int = 1, lr: float = 1e-3,
                optimizer: str = "adamw", momentum: float = 0.9, weight_decay: float = 0.0, eval_data=None,
                new_eval_data=None, seed: int = 0) -> Tuple[TaskAwareModel, IncrementalReport]:
    """Learn ``new_classes`` (task B) in the non-critical neurons of ``model`` (see docs/method.md).

    Args:
        model: trained on the old classes (task A; default: the classes the slices sliced); never modified.
            Its head must already have a row for every new class. slices: its semantic slices.
        data: the task-B training data, ``(inputs, labels int64 [B])`` batches, every label in ``new_classes``
            (was ``data_b``, still accepted with a DeprecationWarning for one release).
        replay: fraction in (0, 1] of ``replay_data`` (old-class samples) mixed into training; None: none.
        objective: the loss, :func:`task_loss` (``"task"``: each sample's cross-entropy over its own task's
            logits; ``"joint"``: over the logits of old and new classes together), every neuron active.
        task_names: the names of the old and the new task in ``model(x, task=...)``.
        epochs, lr, optimizer (``"adamw"``/``"sgd"``), momentum (sgd), weight_decay: the training, with the
            defaults of :func:`finetune`.
        eval_data: held-out data of task A (the task ``model`` serves), scored before and after under
            ``task=A``; None: not scored (was ``eval_a``).
        new_eval_data: held-out data of task B, scored before and after under ``task=B``; None: not scored
            (was ``eval_b``). Unlike :func:`readapt` it does not fall back to ``data``: before training the
            new classes' head rows are untrained, so a before/after on the training data says little.
        seed: seeds the training and the replay draw.

    Returns:
        ``(TaskAwareModel, IncrementalReport)``.
    """
    fn = "neuslice.incremental"
    C.check_module(fn, model)
    C.check_slices(fn, slices, model)
    C.check_training(fn, epochs, lr, optimizer)
    if objective not in ("task", "joint"):
        raise ValueError(f"{fn}: objective must be 'task' or 'joint', got {objective!r}")
    if len(task_names) != 2 or len(set(task_names)) != 2 or not all(isinstance(t, str) for t in task_names):
        raise ValueError(f"{fn}: task_names must be two distinct strings, got {task_names!r}")
    plan = C.plan_of(fn, slices, model)
    head_name, head = C.head_module(fn, plan, model, slices.num_classes)
    old, new = _check_tasks(fn, slices, head.out_features, old_classes, new_classes, replay, replay_data)
    C.scan_labels(fn, data, new, "data")
    if replay is not None:
        C.scan_labels(fn, replay_data, old, "replay_data")
    net = copy.deepcopy(model).eval()
    masks, frozen_norms, frozen = free_weight_masks(fn, net, slices, old, new)
    free_by_layer = {name: int((~f).sum()) for name, f in frozen.items()}
    _warn_no_free_head_input(fn, plan, head_name, free_by_layer, objective)
    a, b = task_names
    out = TaskAwareModel(net, C.rebind(plan, net), frozen, {a: old, b: new}, a, slices.class_names).eval()
    acc_a0, acc_b0 = _task_acc(model, eval_data, old), _task_acc(model, new_eval_data, new)
    acc_a_slice = _task_acc(out, eval_data, old, a)   # before training: net is still the original's copy
    loss = task_loss(head.out_features, [old, new], objective)
    train, replayed = _training_data(fn, data, replay, replay_data, seed)
    steps = C.fit_masked(net, train, masks, epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, loss_fn=loss, frozen_norms=frozen_norms, seed=seed)
    ntrain = sum(int(m.sum()) for m in masks.values())
    nfree = sum(int((~f).sum()) for f in frozen.values())
    report = IncrementalReport(old, new, slices.value, nfree / sum(f.numel() for f in frozen.values()), ntrain,
                               C.param_count(model), steps, replayed, acc_a0, _task_acc(out, eval_data, old, a),
                               acc_b0, _task_acc(out, new_eval_data, new, b), free_by_layer, acc_a_slice)
    return out, report
