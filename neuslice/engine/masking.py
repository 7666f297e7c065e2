"""What a slice means for a model: the fraction of its parameters it removes (``compression_rate``)
and the model computing with every neuron outside it zeroed (``MaskedModel``). Both read a slices
object's ``layers``, ``layer_names``, ``mask(classes)`` and ``class_indices``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from . import heads as _heads
from .graph import _stored_flow, discover, traceable
from .calls import call_model
from .hooks import ChainHooks, eager, zero_outside

__all__ = ["compression_rate", "MaskedModel"]



def _mark(removed: Dict[int, Tensor], p: Optional[Tensor], index) -> None:
    if p is None:
        return
    m = removed.get(id(p))
    if m is None:
        m = removed[id(p)] = torch.zeros(p.shape, dtype=torch.bool)
    m[index] = True


def _mark_consumer(removed, c: nn.Module, r: Tensor, cols: int) -> None:
    if isinstance(c, nn.Linear):
        _mark(removed, c.weight, (slice(None), r.repeat_interleave(cols)))
        return
    in_per, out_per = c.in_channels // c.groups, c.out_channels // c.groups
    for ch in torch.nonzero(r).flatten().tolist():
        g = ch // in_per
        _mark(removed, c.weight, (slice(g * out_per, (g + 1) * out_per), ch % in_per))


def compression_rate(slices, model: nn.Module, classes, *, restrict_head: bool = True, example_inputs=None) -> float:
    """Fraction of ``model``'s parameters removed by slicing for ``classes`` (docs/method.md §4), in [0, 1].

    Which weights read a neuron comes from the traced graph, else from the model's last probe forward in
    this process (``profile``, ``Profiler``, ``Slices.apply``), else from one forward of ``example_inputs``.
    A model that can be neither traced nor probed is refused: module order is not evidence of who reads
    a layer (docs/method.md §1)."""
    fn = "neuslice.Slices.compression_rate"
    slices.check_model(fn, model)
    keep = slices.mask(classes)
    idx = slices.class_indices(fn, classes)
    run = None if example_inputs is None else (lambda: call_model(model, example_inputs))
    plan = discover(model, slices.layer_names, fn=fn, run=run)
    if plan.trace_error is not None and not plan.probed and _stored_flow(model) is None:
        raise ValueError(f"{fn}: the model cannot be traced ({plan.trace_error}) and has not been run through "
                         "neuslice in this process, so which weights read each sliced layer is unknown; pass "
                         "example_inputs= (one batch of model inputs)")
    modules = dict(model.named_modules())
    blocks = _heads.active(slices.attention or plan.attention, slices.layer_names)
    in_blocks = {a.q[0] for a in blocks} | {a.k[0] for a in blocks} | {a.v[0] for a in blocks}
    removed: Dict[int, Tensor] = {}
    for info in plan.layers:
        r = ~keep[info.name].cpu()
        if not bool(r.any()):
            continue
        _mark(removed, info.module.weight, r)
        _mark(removed, info.module.bias, r)
        for name in info.chain[1:]:
            for p in modules[name].parameters(recurse=False):
                if p.dim() == 1 and p.shape[0] == info.n:
                    _mark(removed, p, r)
        if info.name not in in_blocks:      # q, k, v are read through their heads: the out projection below
            for cname, cols in info.consumers:
                _mark_consumer(removed, modules[cname], r, cols)
    for a in blocks:                        # a head (unit) is gone when none of its q, k, v channels is kept
        gone = ~_heads.unit_keep(a, {n: keep[n].cpu().unsqueeze(0) for n in (a.q[0], a.k[0], a.v[0])})[0]
        if bool(gone.any()):
            _mark(removed, modules[a.out].weight, (slice(None), _heads.out_columns(a)[gone].flatten()))
            gone_q = _heads.query_heads(a, gone)
            for _, m, attr, dim in _heads.per_head_tensors(model, a):
                _mark(removed, m._parameters[attr], (slice(None),) * dim + (gone_q,))
    if restrict_head and len(plan.heads) == 1:
        head = modules[plan.heads[0]]
        rows = torch.ones(slices.num_classes, dtype=torch.bool)
        rows[idx] = False
        if head.weight.shape[0] == slices.num_classes and bool(rows.any()):
            _mark(removed, head.weight, rows)
            _mark(removed, head.bias, rows)
    total = sum(p.numel() for p in model.parameters())
    return float(sum(int(m.sum()) for m in removed.values())) / total if total else 0.0


class MaskedModel:
    """Context manager from :meth:`Slices.apply`: zeroes the neurons outside the slice; yields the model.

    Where the model cannot be traced and no probe forward of it was recorded yet (``profile``,
    ``Profiler``), the layers' chains are found on the first forward inside the context: one probe
    forward of that call's inputs (docs/method.md §1), then the masks apply to that call and every later
    one. ``plan`` is None until then."""

    def __init__(self, slices, model: nn.Module, classes):
        fn = self._fn = "neuslice.Slices.apply"
        slices.check_model(fn, model)
        self.masks = slices.mask(classes)
        self._names = slices.layer_names
        self.plan = discover(model, self._names, fn=fn) if traceable(model) or _stored_flow(model) is not None \
            else None
        self.model = model
        self._hooks: Optional[ChainHooks] = None
        self._root = None
        self._probing = False
        self._compiled: list = []       # (module, its compiled call) of modules compiled in place, in the block

    def _on_end(self, i: int, t: Tensor) -> Tensor:
        info = self.plan.layers[i]
        return zero_outside(t, self.masks[info.name], info.module)

    def _first(self, module, args, kwargs):
        """Root pre-hook: on the first forward of an untraced model, probe it with these inputs, then mask."""
        if self._probing or self._hooks is not None:
            return None
        self._probing = True
        try:
            self.plan = discover(self.model, self._names, fn=self._fn, run=lambda: self.model(*args, **kwargs))
        finally:
            self._probing = False
        self._hooks = ChainHooks(self.model, self.plan.layers, self._on_end, point="end")
        return None

    def __enter__(self) -> nn.Module:
        # A module compiled in place (nn.Module.compile()) runs code compiled before these hooks existed, which
        # does not run them (dynamo does not guard on module hooks): inside the block it runs eagerly.
        self._compiled = [(m, m._compiled_call_impl) for m in self.model.modules()
                          if getattr(m, "_compiled_call_impl", None) is not None]
        for m, _ in self._compiled:
            m._compiled_call_impl = None
        if self.plan is not None:
            self._hooks = ChainHooks(self.model, self.plan.layers, self._on_end, point="end")
        else:
            self._root = self.model.register_forward_pre_hook(eager(self._first), with_kwargs=True)
        return self.model

    def __exit__(self, *exc) -> bool:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._root is not None:
            self._root.remove()
            self._root = None
        for m, impl in self._compiled:
            m._compiled_call_impl = impl
        self._compiled = []
        return False
