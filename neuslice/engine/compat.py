"""Model-library layers that are linear layers in another form (docs/method.md §1).

Some libraries write a linear layer with its weight stored transposed, ``[in, out]``, computing
``y = x @ W + b`` (Hugging Face transformers' ``Conv1D`` in GPT-2). neuslice slices ``nn.Linear``;
:func:`conv1d_to_linear` turns every such module into the ``nn.Linear`` it is. Both find the modules
by what they compute, never by class name, so no model library is imported.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["conv1d_to_linear", "transposed_linears"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _is_transposed_linear(m: nn.Module) -> bool:
    """A leaf whose parameters are exactly a 2-D ``weight [in, out]`` and a ``bias [out]`` (or none), and
    whose output on a random ``[2, in]`` input equals ``x @ weight + bias``."""
    if isinstance(m, _LAYERS) or any(True for _ in m.children()):
        return False
    params = dict(m.named_parameters(recurse=False))
    w, b = params.get("weight"), params.get("bias")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or set(params) - {"weight", "bias"}:
        return False
    if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[1]):
        return False
    if not w.is_floating_point() or w.is_meta:
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, w.shape[0], generator=g, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad():
            y = m(x)
    except Exception:                                # not callable on [B, in]: not a linear layer
        return False
    want = x @ w.detach() + (b.detach() if b is not None else 0)
    if not isinstance(y, torch.Tensor) or y.shape != want.shape:
        return False
    tol = 1e-3 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return bool(torch.allclose(y, want, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1))))


def transposed_linears(model: nn.Module) -> List[str]:
    """Names of the modules of ``model`` that behave as a linear layer with an ``[in, out]`` weight
    (``y = x @ W + b``) without being ``nn.Linear``: what :func:`conv1d_to_linear` converts."""
    return [n for n, m in model.named_modules() if n and _is_transposed_linear(m)]


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace, in place, every module of ``model`` that computes ``y = x @ W + b`` with a 2-D weight
    ``W [in, out]`` (transformers' ``Conv1D``, as in GPT-2) by the equivalent ``nn.Linear(in, out)`` with
    weight ``W.T`` (copied, contiguous), the same bias, device, dtype and ``requires_grad``, under the same
    name. Outputs are unchanged up to float rounding (a matmul of the transposed layout). The modules are
    found by what they compute (a probe on a random ``[2, in]`` input), not by class name.

    Returns ``model``. New parameter objects replace the old ones: build optimizers after converting.
    A model with nothing to convert is returned unchanged.

    Example::

        model = GPT2ForSequenceClassification(config)
        neuslice.conv1d_to_linear(model)      # c_attn, c_proj, c_fc are now nn.Linear
        prof = neuslice.profile(model, loader, num_classes)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"neuslice.conv1d_to_linear: model must be a torch.nn.Module, got {type(model).__name__}")
    for name in transposed_linears(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        w, b = old.weight, getattr(old, "bias", None)
        new = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w.t())
            if b is not None:
                new.bias.copy_(b)
        new.weight.requires_grad_(w.requires_grad)
        if b is not None:
            new.bias.requires_grad_(b.requires_grad)
        new.train(old.training)
        setattr(parent, child, new)
    return model
