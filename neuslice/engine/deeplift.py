"""DeepLIFT multipliers under the Rescale rule (Shrikumar et al. 2017) through nonlinearity modules, and through
the functional nonlinearities that are sliced layers' taps (``F.relu(fc(x))``: seen by the tap hooks).

One forward serves both gradients: every nonlinearity module's output is routed through
:class:`_Rescale`, an identity in the forward whose backward either passes the gradient on unchanged
(``switch.on = False``: the plain gradient g) or replaces the local derivative by Δout/Δin where
|Δin| > 1e-7 (``switch.on = True``: the multiplier m). Reference inputs and outputs of each
nonlinearity come from one forward of the baseline, indexed by call order (shared modules work).
A block that gradient checkpointing recomputes in the backward gets the multipliers of the forward call
with the same input (docs/method.md §2), so the recompute saves what the forward saved.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .hooks import activation_modules, eager, in_backward

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
    def forward(ctx, out, inp, ratio, off, switch, local):
        ctx.save_for_backward(inp, ratio, off)
        ctx.switch, ctx.local = switch, local
        return out.clone()          # not ``out`` itself: the model may modify it in place

    @staticmethod
    def backward(ctx, grad):
        if not ctx.switch.on:
            return grad, None, None, None, None, None
        inp, ratio, off = ctx.saved_tensors     # ratio: Δout/Δin, meaningless where ``off``
        if off.is_cuda or ctx.local is None:
            return torch.where(off, grad, 0.0), (grad * ratio).masked_fill_(off, 0.0), None, None, None, None
        # The m backward is the ratio's last use (the g backward never reads it): the product goes into it.
        to_inp = ratio.mul_(grad)
        if bool(off.any()):         # |Δin| <= EPS: rare (Δin = 0 exactly, or a value within EPS by chance)
            at = off.nonzero(as_tuple=True)
            xs = inp.detach()[at].requires_grad_(True)
            with torch.enable_grad():
                d, = torch.autograd.grad(ctx.local(xs), xs, grad[at])
            to_inp.index_put_(at, d)
        return None, to_inp, None, None, None, None


def _local(module: nn.Module):
    """``module.forward`` (its hooks not run) where the module is elementwise and parameter-free, so its
    derivative at a few gathered positions is its derivative there; None otherwise (PReLU's weight)."""
    return None if any(True for _ in module.parameters()) else module.forward


def _ratio(inp, out, ref_in, ref_out, ratio, off, scratch):
    """``(Δout/Δin, not |Δin| > EPS)``, written into ``ratio`` and ``off`` (``scratch`` holds Δin). The quotient
    is used only where |Δin| > EPS (:class:`_Rescale` takes the local derivative at ``off``). Every pass
    writes into a buffer the caller keeps from batch to batch: a fresh tensor per pass cost more than the
    pass itself (page faults; measured 0.90 vs 0.25 ms for one subtraction of a [32, 65, 768] float32
    tensor, 1 thread)."""
    torch.sub(out, ref_out, out=ratio)
    d_in = torch.sub(inp, ref_in, out=scratch)
    ratio.div_(d_in)
    torch.gt(d_in.abs_(), EPS, out=off).logical_not_()
    return ratio, off


def _buffer(bufs: Dict[object, torch.Tensor], key, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """``bufs[key]``, (re)allocated when it does not match ``like``'s shape, device and ``dtype``."""
    dtype = like.dtype if dtype is None else dtype
    b = bufs.get(key)
    if b is None or b.shape != like.shape or b.dtype != dtype or b.device != like.device:
        b = bufs[key] = torch.empty(like.shape, dtype=dtype, device=like.device)
    return b


class Rescale:
    """Hooks on every nonlinearity module of ``model``. ``record()`` mode stores the baseline's
    per-call inputs/outputs; otherwise outputs are rerouted through :class:`_Rescale`. The references
    in use (:meth:`use`) are ``[1, ...]`` (one reference for the batch) or ``[B, ...]`` (one per sample:
    the reference input padded as the sample is, docs/method.md §2); Δ broadcasts either way.
    Register before the tap hooks so the taps see the rerouted tensors."""

    def __init__(self, model: nn.Module, names: Sequence[str] = ()):
        self.switch = _Switch()
        self._refs: Dict[int, List[tuple]] = {}
        self._calls: Dict[int, int] = {}
        self._done: Dict[int, List[tuple]] = {}    # per module, per call of this forward: (input, ratio, off)
        # per (module, call): the ratio and off buffers, and one scratch per shape; reused batch after batch
        # (a batch's m backward has finished before the next batch's forward writes them)
        self._bufs: Dict[object, torch.Tensor] = {}
        self._recording = False
        self.modules = activation_modules(model, names)
        self._handles = [model.register_forward_pre_hook(eager(self._reset))]
        try:
            for _, m in self.modules:
                self._handles.append(m.register_forward_hook(eager(self._hook)))
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

    def recorded(self) -> Dict[int, List[tuple]]:
        """The references recorded by the last ``record()`` forward: per module id (``("functional", layer)`` for a
        functional one), per call ``(input, output)``
        of the reference batch (detached)."""
        return self._refs

    def use(self, refs: Dict[int, List[tuple]]) -> None:
        """The references of the next forwards: like :meth:`recorded`, with batch size 1 or the batch's B."""
        self._refs = refs

    def _hook(self, module, args, out):
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return None
        return self._apply(id(module), args[0], out, lambda: _local(module))

    def functional(self, i: int, inp: torch.Tensor, out: torch.Tensor, local) -> Optional[torch.Tensor]:
        """A functional nonlinearity (``F.relu(x)``, ``torch.tanh(x)``, ``x.relu()``) that is sliced layer ``i``'s
        tap, seen by :class:`~neuslice.engine.hooks.ChainHooks` (``on_functional``): rescaled as a module would be,
        its references matched by call order under the key ``("functional", i)``. ``local``: its function applied
        to one tensor (the local derivative where |Δin| <= EPS)."""
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.shape != inp.shape:
            return None
        if out.data_ptr() == inp.data_ptr():        # in place (x.relu_()): its input is gone, Δin unknown
            return None
        return self._apply(("functional", i), inp, out, lambda: local)

    def _apply(self, k, inp: torch.Tensor, out: torch.Tensor, local):
        """Record (``record()`` mode) or reroute ``out`` (the nonlinearity ``k``'s output for input ``inp``) through
        :class:`_Rescale`; ``local()`` gives the function for the local derivative, or None."""
        if in_backward() and not self._recording:     # a checkpointed block recomputed: the same call's ratio
            x = inp.detach()
            for seen, ratio, off in self._done.get(k, []):
                if seen.shape == x.shape and torch.equal(seen, x):
                    return _Rescale.apply(out, inp, ratio, off, self.switch, local())
            return None
        idx = self._calls.get(k, 0)
        self._calls[k] = idx + 1
        if self._recording:
            self._refs.setdefault(k, []).append((inp.detach(), out.detach()))
            return None
        refs = self._refs.get(k, [])
        if idx >= len(refs) or not (inp.requires_grad or out.requires_grad):
            return None
        ref_in, ref_out = refs[idx]
        if ref_in.shape[1:] != inp.shape[1:] or ref_in.shape[0] not in (1, inp.shape[0]):
            return None
        x, y = inp.detach(), out.detach()
        ratio, off = _ratio(x, y, ref_in, ref_out, _buffer(self._bufs, (k, idx, "ratio"), y),
                            _buffer(self._bufs, (k, idx, "off"), y, torch.bool),
                            _buffer(self._bufs, ("scratch", y.shape, y.dtype, y.device), y))
        self._done.setdefault(k, []).append((x, ratio, off))
        return _Rescale.apply(out, inp, ratio, off, self.switch, local())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._refs, self._bufs = {}, {}
