"""Forward hooks that find each sliced layer's tap point (or the end of its chain) in every forward.

A chain is ``layer → [norm] → [dropout] → [activation]`` (see :mod:`neuslice.engine.graph`). A hook on a
later module of the chain accepts a call only when that call's input *is* the tensor the previous
stage produced, so shared modules (one ``nn.ReLU`` used after several layers) tap the right call.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .graph import ACTIVATIONS, LayerInfo

__all__ = ["ChainHooks", "no_inplace", "per_neuron", "zero_outside"]


def per_neuron(m: torch.Tensor, like: torch.Tensor, last: bool) -> torch.Tensor:
    """``m [N]`` shaped to broadcast over ``like``'s neuron axis: the last axis (``last``: Linear outputs
    ``[B, ..., N]``) or axis 1 (channels ``[B, N, ...]``, and weights ``[out, in, ...]`` by input)."""
    return m if last else m.view(1, -1, *([1] * (like.dim() - 2)))


def zero_outside(t: torch.Tensor, keep: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``t`` (the output of ``module``'s chain) with every neuron where ``keep [N]`` is 0 zeroed."""
    return t * per_neuron(keep.to(device=t.device, dtype=t.dtype), t, isinstance(module, nn.Linear))


class ChainHooks:
    """Calls ``on_point(i, tensor)`` when layer ``i``'s tap (``point="tap"``) or chain end
    (``point="end"``) produces its output; a tensor returned replaces that output."""

    def __init__(self, model: nn.Module, infos: Sequence[LayerInfo],
                 on_point: Callable[[int, torch.Tensor], Optional[torch.Tensor]], point: str = "tap"):
        modules = dict(model.named_modules())
        self._on_point = on_point
        self._state: List[Optional[Tuple[int, torch.Tensor]]] = [None] * len(infos)
        per_module: Dict[str, List[Tuple[int, int, bool]]] = {}
        for i, info in enumerate(infos):
            last = info.tap_stage if point == "tap" else len(info.chain) - 1
            for j, name in enumerate(info.chain[:last + 1]):
                per_module.setdefault(name, []).append((i, j, j == last))
        self._handles = []
        try:
            for name, entries in per_module.items():
                self._handles.append(modules[name].register_forward_hook(self._hook(entries)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, entries):
        def hook(module, args, out):
            result = None
            for i, j, last in entries:
                if j > 0:
                    st = self._state[i]
                    if st is None or st[0] != j - 1 or not args or args[0] is not st[1]:
                        continue
                cur = out if result is None else result
                if last:
                    self._state[i] = None
                    r = self._on_point(i, cur)
                    if r is not None:
                        result = r
                else:
                    self._state[i] = (j, cur)
            return result
        return hook

    def reset(self) -> None:
        self._state = [None] * len(self._state)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()


class no_inplace:
    """Context: every module with an ``inplace`` flag runs out of place; flags restored on exit.

    Used by the offline ``profile`` so saved activations stay intact and DeepLIFT sees each
    nonlinearity's input and output separately."""

    def __init__(self, model: nn.Module):
        self._saved = [(m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]

    def __enter__(self):
        for m, _ in self._saved:
            m.inplace = False
        return self

    def __exit__(self, *exc):
        for m, v in self._saved:
            m.inplace = v
        return False


def activation_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Elementwise nonlinearity modules of ``model`` (DeepLIFT's Rescale points), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ACTIVATIONS)]
