"""Forward hooks that find each sliced layer's tap point (or the end of its chain) in every forward.

A chain is ``layer → [norm] → [dropout] → [activation]`` (see :mod:`neuslice.engine.graph`). A hook on a
later module of the chain accepts a call only when that call's input *is* the tensor the previous
stage produced, so shared modules (one ``nn.ReLU`` used after several layers) tap the right call.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .graph import ACTIVATIONS, LayerInfo

__all__ = ["ChainHooks", "in_backward", "no_inplace", "per_neuron", "zero_outside"]


def per_neuron(m: torch.Tensor, like: torch.Tensor, last: bool) -> torch.Tensor:
    """``m [N]`` shaped to broadcast over ``like``'s neuron axis: the last axis (``last``: Linear outputs
    ``[B, ..., N]``) or axis 1 (channels ``[B, N, ...]``, and weights ``[out, in, ...]`` by input)."""
    return m if last else m.view(1, -1, *([1] * (like.dim() - 2)))


def zero_outside(t: torch.Tensor, keep: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``t`` (the output of ``module``'s chain) with every neuron where ``keep [N]`` is 0 zeroed."""
    return t * per_neuron(keep.to(device=t.device, dtype=t.dtype), t, isinstance(module, nn.Linear))


class _Watch(torch.Tensor):
    """A layer's chain output, handed on to the model's own code, that recognises the functional
    nonlinearity applied to it (``F.relu(x)``, ``torch.relu(x)``, ``x.relu()``): that call's output
    is reported as the tap. Every operation returns plain tensors; autograd is unchanged
    (``Tensor.as_subclass`` keeps the graph)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        x = args[0] if args else None
        watch = getattr(x, "_ns_watch", None) if isinstance(x, _Watch) else None
        if watch is not None and isinstance(out, torch.Tensor) and watch[0](func):
            x._ns_watch = None                          # one nonlinearity per call of the layer
            rest, kw = args[1:], kwargs or {}
            r = watch[1](out, x.as_subclass(torch.Tensor), lambda t: func(t, *rest, **kw))
            return out if r is None else r
        return out


def _matcher(target) -> Callable[[object], bool]:
    if isinstance(target, str):                         # a Tensor method ("relu", "relu_")
        meth = getattr(torch.Tensor, target, None)
        return lambda func: func is meth
    return lambda func: func is target


class ChainHooks:
    """Calls ``on_point(i, tensor)`` when layer ``i``'s tap (``point="tap"``) or chain end
    (``point="end"``) produces its output; a tensor returned replaces that output. A layer called
    more than once per forward reports every call (docs/method.md §1); ``calls[i]`` counts the calls
    of layer ``i`` since the model's forward began. A tap after a functional nonlinearity
    (``tap_stage == len(chain)``) is found by handing the chain's output on as a :class:`_Watch`.

    Gradient checkpointing recomputes blocks during the backward (docs/method.md §2): those calls still
    reach ``on_point`` (a mask must be applied to the recompute too), but they are not counted in
    ``calls`` and do not restart the forward; ``on_point`` tells them apart with :func:`in_backward`.

    ``on_functional(i, input, output, local)``: called first where layer ``i``'s tap is a functional
    nonlinearity's output, with that call's input and its function on one tensor (``local``); a tensor returned
    replaces the output, and ``on_point`` sees the replacement (DeepLIFT's Rescale, :mod:`.deeplift`)."""

    def __init__(self, model: nn.Module, infos: Sequence[LayerInfo],
                 on_point: Callable[[int, torch.Tensor], Optional[torch.Tensor]], point: str = "tap",
                 on_functional: Optional[Callable[[int, torch.Tensor, torch.Tensor, Callable], Optional[torch.Tensor]]]
                 = None):
        modules = dict(model.named_modules())
        self._on_point = on_point
        self._on_functional = on_functional
        self._pending: List[List[Tuple[int, torch.Tensor]]] = [[] for _ in infos]
        self.calls = [0] * len(infos)
        per_module: Dict[str, List[Tuple[int, int, str, object]]] = {}
        for i, info in enumerate(infos):
            last = info.tap_stage if point == "tap" else len(info.chain) - 1
            watch = last == len(info.chain)
            for j, name in enumerate(info.chain[:last + 1]):
                kind = ("watch" if watch else "point") if j == min(last, len(info.chain) - 1) else "pass"
                per_module.setdefault(name, []).append((i, j, kind, _matcher(info.functional_target)))
        self._handles = []
        self.eager = compiler_loaded()      # hooks wrapped by eager(): dynamo was imported
        try:
            restart = lambda m, a: None if in_backward() else self.reset()    # noqa: E731
            self._handles.append(model.register_forward_pre_hook(eager(restart)))
            for name, entries in per_module.items():
                self._handles.append(modules[name].register_forward_hook(eager(self._hook(entries))))
        except BaseException:
            self.remove()
            raise

    def _hook(self, entries):
        def hook(module, args, out):
            result = None
            for i, j, kind, match in entries:
                if j > 0:
                    pend = self._pending[i]
                    x = args[0] if args else None
                    k = next((k for k, (s, t) in enumerate(pend) if s == j - 1 and t is x), None)
                    if k is None:
                        continue
                    del pend[k]
                elif not in_backward():
                    self.calls[i] += 1
                cur = out if result is None else result
                if kind == "point":
                    r = self._on_point(i, cur)
                    if r is not None:
                        result = r
                elif kind == "watch" and isinstance(cur, torch.Tensor):
                    w = cur.as_subclass(_Watch)
                    w._ns_watch = (match, lambda a, x, local, i=i: self._watched(i, a, x, local))
                    result = w
                else:
                    self._pending[i].append((j, cur))
            return result
        return hook

    def _watched(self, i: int, out: torch.Tensor, x: torch.Tensor, local: Callable) -> Optional[torch.Tensor]:
        """Layer ``i``'s functional nonlinearity ran (``x`` -> ``out``): ``on_functional``, then ``on_point``."""
        if self._on_functional is not None:
            r = self._on_functional(i, x, out, local)
            out = out if r is None else r
        r = self._on_point(i, out)
        return out if r is None else r

    def reset(self) -> None:
        self._pending = [[] for _ in self._pending]
        self.calls = [0] * len(self.calls)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()


def compiler_loaded() -> bool:
    """Whether torch.compile's dynamo is imported: only then can a hook be traced (torch.compile imports it)."""
    return "torch._dynamo" in sys.modules


def eager(fn: Callable) -> Callable:
    """``fn`` as a hook that torch.compile never traces (``torch.compiler.disable``): in a compiled model
    (``torch.compile``, ``nn.Module.compile()``) it runs as plain Python at a graph break. Traced, the engine's
    hooks, which read and write the run's Python state, were compiled again for every layer (one recompile per
    tap up to dynamo's recompile limit, then warnings). It costs 0.5-0.7 µs a call (a Linear's forward with a
    hook: 9.5 against 8.9 µs; a Profiler step of the 2-layer test BERT: 3.75 against 3.71 ms, medians of 14).
    ``fn`` itself while dynamo is not imported (:func:`compiler_loaded`; building a transformers model imports
    it): wrapping imports it, 1.1 s, which a process that never compiles should not pay; the ``Profiler`` wraps
    its hooks again once dynamo appears (``Profiler.batch``)."""
    return torch.compiler.disable(fn) if compiler_loaded() else fn


def in_backward() -> bool:
    """Whether autograd is running a backward on this thread: a forward hook firing now is gradient
    checkpointing recomputing a block (docs/method.md §2), not a forward of the model."""
    return torch._C._current_graph_task_id() != -1


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


def activation_modules(model: nn.Module, names: Sequence[str] = ()) -> List[Tuple[str, nn.Module]]:
    """Elementwise nonlinearity modules of ``model`` (DeepLIFT's Rescale points), in module order: those of a
    known nonlinearity class, and the modules ``names`` (found elementwise by evidence: a model library's
    ``GELUActivation``, docs/method.md §1)."""
    names = set(names)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ACTIVATIONS) or (n and n in names)]
