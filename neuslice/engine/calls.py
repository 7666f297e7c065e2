"""Calling a model on one batch: where its parameters live, moving a batch there, and reading its logits
out of whatever it returns. Below everything else in the engine, so any module may call a model.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["model_device", "to_device", "call_model", "logits_of"]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (or buffer) lives; CPU for a model with neither."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def to_device(x, device):
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, Mapping):                 # a dict, or a tokenizer's BatchEncoding (a UserDict)
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def call_model(model: nn.Module, x):
    """``model``'s logits on one batch's inputs, moved to the model's device first: a tensor is ``model(x)``,
    a tuple/list ``model(*x)``, a mapping ``model(**x)``; the output is read by :func:`logits_of`."""
    x = to_device(x, model_device(model))
    if isinstance(x, Mapping):
        return logits_of(model(**x))
    if isinstance(x, (list, tuple)):
        return logits_of(model(*x))
    return logits_of(model(x))


def logits_of(out):
    """The logits in a model's output: a tensor as it is; an output object with a ``logits`` tensor (the
    model-library convention, e.g. a Hugging Face ``SequenceClassifierOutput``) its ``logits``; a mapping
    its ``"logits"`` entry; a tuple/list its first element. Anything else is returned unchanged (the
    caller's check names it)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], Tensor):
        return out[0]
    return out
