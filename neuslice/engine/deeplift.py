"""DeepLIFT multipliers under the Rescale rule (Shrikumar et al. 2017) through nonlinearity modules.

One forward serves both gradients: every nonlinearity module's output is routed through
:class:`_Rescale`, an identity in the forward whose backward either passes the gradient on unchanged
(``switch.on = False``: the plain gradient g) or replaces the local derivative by Δout/Δin where
|Δin| > 1e-7 (``switch.on = True``: the multiplier m). Reference inputs and outputs of each
nonlinearity come from one forward of the baseline, indexed by call order (shared modules work).
A block that gradient checkpointing recomputes in the backward gets the multipliers of the forward call
with the same input (docs/method.md §2), so the recompute saves what the forward saved.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from .hooks import activation_modules, in_backward

__all__ = ["Rescale", "EPS"]

EPS = 1e-7  # docs/method.md §2: rescale where |Δin| > 1e-7, else the local derivative


class _Switch:
    on = False


class _Rescale(torch.autograd.Function):
    """``out`` unchanged in the forward. Backward: the plain gradient (switch off), or the Rescale multiplier
    (switch on): ``grad · ratio`` into the nonlinearity's input where |Δin| > EPS, and the local derivative
    elsewhere. ``local`` (the module's parameter-free elementwise forward, or None) gives that derivative at
    those few positions alone; without it (or on a GPU, where finding them would be a sync) the gradient goes
    through the nonlinearity's own backward, masked to them."""

    @staticmethod
    def forward(ctx, out, inp, ratio, use, switch, local):
        ctx.save_for_backward(inp, ratio, use)
        ctx.switch, ctx.local = switch, local
        return out.clone()          # not ``out`` itself: the model may modify it in place

    @staticmethod
    def backward(ctx, grad):
        if not ctx.switch.on:
            return grad, None, None, None, None, None
        inp, ratio, use = ctx.saved_tensors
        to_inp = grad * ratio       # ratio is 0 where the local derivative applies
        if use.is_cuda or ctx.local is None:
            return torch.where(use, 0.0, grad), to_inp, None, None, None, None
        off = (~use).nonzero(as_tuple=True)
        if off[0].numel():          # |Δin| <= EPS: rare (Δin = 0 exactly, or a value within EPS by chance)
            xs = inp.detach()[off].requires_grad_(True)
            with torch.enable_grad():
                d, = torch.autograd.grad(ctx.local(xs), xs, grad[off])
            to_inp.index_put_(off, d, accumulate=True)
        return None, to_inp, None, None, None, None


def _local(module: nn.Module):
    """``module.forward`` (its hooks not run) where the module is elementwise and parameter-free, so its
    derivative at a few gathered positions is its derivative there; None otherwise (PReLU's weight)."""
    return None if any(True for _ in module.parameters()) else module.forward


def _ratio(inp, out, ref_in, ref_out):
    """``(Δout/Δin where |Δin| > EPS else 0, |Δin| > EPS)``. Where |Δin| > EPS the quotient is the same
    division as always; elsewhere the division's inf/nan is replaced by 0 (six passes, no temporaries
    besides the results)."""
    d_in = inp - ref_in
    use = d_in.abs() > EPS
    ratio = (out - ref_out).div_(d_in)
    return torch.where(use, ratio, 0.0), use


class Rescale:
    """Hooks on every nonlinearity module of ``model``. ``record()`` mode stores the baseline's
    per-call inputs/outputs; ``rescale()`` mode reroutes outputs through :class:`_Rescale`.
    Register before the tap hooks so the taps see the rerouted tensors."""

    def __init__(self, model: nn.Module):
        self.switch = _Switch()
        self._refs: Dict[int, List[tuple]] = {}
        self._calls: Dict[int, int] = {}
        self._done: Dict[int, List[tuple]] = {}    # per module, per call of this forward: (input, ratio, use)
        self._recording = False
        self.modules = activation_modules(model)
        self._handles = [model.register_forward_pre_hook(self._reset)]
        try:
            for _, m in self.modules:
                self._handles.append(m.register_forward_hook(self._hook))
        except BaseException:
            self.remove()
            raise

    def _reset(self, module, args):
        if not in_backward():
            self._calls, self._done = {}, {}

    def record(self, on: bool) -> None:
        self._recording = on
        if on:
            self._refs = {}

    def _hook(self, module, args, out):
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return None
        k = id(module)
        if in_backward() and not self._recording:     # a checkpointed block recomputed: the same call's ratio
            x = args[0].detach()
            for seen, ratio, use in self._done.get(k, []):
                if seen.shape == x.shape and torch.equal(seen, x):
                    return _Rescale.apply(out, args[0], ratio, use, self.switch, _local(module))
            return None
        idx = self._calls.get(k, 0)
        self._calls[k] = idx + 1
        inp = args[0]
        if self._recording:
            self._refs.setdefault(k, []).append((inp.detach(), out.detach()))
            return None
        refs = self._refs.get(k, [])
        if idx >= len(refs) or not (inp.requires_grad or out.requires_grad):
            return None
        ref_in, ref_out = refs[idx]
        if ref_in.shape[1:] != inp.shape[1:]:
            return None
        ratio, use = _ratio(inp.detach(), out.detach(), ref_in, ref_out)
        self._done.setdefault(k, []).append((inp.detach(), ratio, use))
        return _Rescale.apply(out, inp, ratio, use, self.switch, _local(module))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._refs = {}
