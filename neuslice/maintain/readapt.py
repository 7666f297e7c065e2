"""Re-adapt: fit new samples by critical-neuron tuning (see docs/method.md).

Trainable: the critical neurons of the classes of the new samples (or the classes given), with their
incoming weights (whole weight rows), bias and BatchNorm entries, and the head rows of those classes.
Everything else is frozen: every step goes through ``ops.masked_adamw_`` / ``ops.masked_sgd_`` with
per-neuron masks, so frozen values and their optimizer state never move (no momentum, no weight
decay on them), and the running statistics of frozen BatchNorm channels are restored after each step
(norms with no trainable channel run in eval mode).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..engine.capture import call_model
from ..engine.slices import Slices
from . import _common as C

__all__ = ["ReadaptReport", "readapt", "critical_masks"]


@dataclass
class ReadaptReport(C.Report):
    """Numbers of one :func:`readapt` run. Accuracies are fractions in [0, 1] (None: no data given):
    ``new_acc_*`` on ``new_eval_data``, ``orig_acc_*`` on ``eval_data``."""
    classes: List[int]
    trainable_params: int
    total_params: int
    trainable_fraction: float
    steps: int
    new_acc_before: float
    new_acc_after: float
    orig_acc_before: Optional[float]
    orig_acc_after: Optional[float]
    replay: float                    # old samples mixed in per new sample (0: none)
    replayed: int                    # old samples mixed into training


def critical_masks(fn: str, model: nn.Module, slices: Slices, classes: List[int]
                   ) -> Tuple[Dict[str, Tensor], Dict[nn.Module, Tensor]]:
    """Per-neuron trainable masks ``{param name: bool [param.shape[0]]}`` for critical-neuron tuning of
    ``classes`` and the frozen-channel masks of the chain BatchNorms ``{norm: bool [C]}``."""
    plan = C.plan_of(fn, slices, model)
    head_name, head = C.head_module(fn, plan, model, slices.num_classes)
    keep = slices.mask(classes)
    modules = dict(model.named_modules())
    masks: Dict[str, Tensor] = {}
    frozen_norms: Dict[nn.Module, Tensor] = {}

    def add(mod_name: str, m: Tensor) -> None:
        for pname, p in modules[mod_name].named_parameters(recurse=False):
            if p.dim() >= 1 and p.shape[0] == m.shape[0]:
                masks[f"{mod_name}.{pname}" if mod_name else pname] = m.to(p.device)

    for info in plan.layers:
        add(info.name, keep[info.name].cpu())
    for nname, (layer, norm) in C.chain_norms(plan, model).items():
        add(nname, keep[layer].cpu())
        frozen_norms[norm] = ~keep[layer].cpu()
    rows = torch.zeros(head.out_features, dtype=torch.bool)
    rows[classes] = True
    add(head_name, rows)
    return masks, frozen_norms


def _trainable(model: nn.Module, masks: Dict[str, Tensor]) -> int:
    params = dict(model.named_parameters())
    total = 0
    for n, m in masks.items():
        p = params[n]
        total += int(m.sum()) * (p.numel() // p.shape[0]) if m.dim() == 1 and p.dim() >= 1 else int(m.sum())
    return total


def _acc(model: nn.Module, data) -> Optional[float]:
    return C.score(lambda x: call_model(model, x).argmax(-1), data)


DEFAULT_REPLAY = 0.5   # replay=None with replay_data given; measured in bench/eval_readapt.py (README)


def _replay_fraction(fn: str, replay, replay_data) -> float:
    if replay is None:
        return 0.0 if replay_data is None else DEFAULT_REPLAY
    if isinstance(replay, bool) or not isinstance(replay, (int, float)) or not 0.0 <= replay <= 1.0:
        raise ValueError(f"{fn}: replay must be a fraction in [0, 1] (old samples per new sample), got {replay!r}")
    if replay > 0 and replay_data is None:
        raise ValueError(f"{fn}: replay={replay} needs replay_data (the original task's training samples), got None")
    return float(replay)


def readapt(model: nn.Module, slices: Slices, data, *, classes=None, replay: Optional[float] = None,
            replay_data=None, epochs: int = 10, lr: float = 3e-3, optimizer: str = "adamw", momentum: float = 0.9,
            weight_decay: float = 0.0, eval_data=None, new_eval_data=None, seed: int = 0
            ) -> Tuple[nn.Module, ReadaptReport]:
    """Critical-neuron tuning of ``model`` on new samples (see docs/method.md).

    Args:
        model: a classifier (logits ``[B, K]``) the slices were made for; never modified.
        slices: its :class:`~neuslice.Slices`. data: the new samples, ``(inputs, labels int64 [B])`` batches.
        classes: the classes whose critical neurons train (default: those present in ``data``); every label
            of ``data`` must be one of them.
        replay: old samples mixed into training per new sample, a fraction in [0, 1]: ``max(1, round(replay ·
            len(data)))`` samples of ``replay_data`` (any class), drawn without replacement with a generator
            seeded by ``seed``; ``data`` and them are then reshuffled (same seed) in batches of ``data``'s first
            batch size. The trainable neurons stay those of ``classes``; only the batches change. Default
            (None): ``DEFAULT_REPLAY`` (0.5) when ``replay_data`` is given, else 0 (no replay, ``data`` as given).
        replay_data: the original task's training data, ``(inputs, labels)`` batches; pass it: without replay,
            training only on a few classes pushes every input toward them (see docs/method.md).
        epochs, lr, optimizer (``"adamw"`` or ``"sgd"``), momentum (sgd), weight_decay: the training. Unlike the
            other operators (1 epoch at lr 1e-3), 10 epochs at lr 3e-3: at 1 epoch critical-neuron tuning barely
            fits a shift (bench/eval_readapt.py; README "Re-adapt quality").
        eval_data: held-out data of the task ``model`` serves (the original samples), scored before and after;
            None: not scored. new_eval_data: held-out new samples, scored before and after (default: ``data``
            itself, since the report's point is how well the new samples are fitted).
        seed: seeds the training (batch order of an unseeded shuffling loader, dropout) and the replay draw.

    Returns:
        ``(new_model, ReadaptReport)``; the new model is a copy in eval mode.
    """
    fn = "neuslice.readapt"
    C.check_module(fn, model)
    C.check_slices(fn, slices, model)
    C.check_training(fn, epochs, lr, optimizer)
    if classes is None:
        present = C.scan_labels(fn, data, range(slices.num_classes), "data")
        idx = slices.class_indices(fn, present)
    else:
        idx = slices.class_indices(fn, classes)
        C.scan_labels(fn, data, idx, "data")
    frac = _replay_fraction(fn, replay, replay_data)
    if frac > 0:
        C.scan_labels(fn, replay_data, range(slices.num_classes), "replay_data")
    new = copy.deepcopy(model).eval()
    masks, frozen_norms = critical_masks(fn, new, slices, idx)
    new_data = data if new_eval_data is None else new_eval_data
    before_new, before_orig = _acc(new, new_data), _acc(new, eval_data)
    train, replayed = (data, 0) if frac == 0 else C.with_replay(
        fn, data, replay_data, lambda n_new, n_old: max(1, round(frac * n_new)), seed)
    steps = C.fit_masked(new, train, masks, epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, frozen_norms=frozen_norms, seed=seed)
    total = C.param_count(model)
    ntrain = _trainable(model, masks)
    return new, ReadaptReport(idx, ntrain, total, ntrain / total, steps, before_new, _acc(new, new_data),
                              before_orig, _acc(new, eval_data), frac, replayed)

