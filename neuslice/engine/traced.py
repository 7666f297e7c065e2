"""What the traced graph (``torch.fx.symbolic_trace``) says about a model (docs/method.md §1): whether it traces,
each layer's chain to its nonlinearity, channel sources through the graph (consumers, coupled layers, call
counts), the head; and the module and function classes discovery reasons with. :mod:`.graph` orchestrates
discovery on top of this and of a probe forward (:mod:`.dataflow`).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LAYER_TYPES", "NORMS", "PASS", "ACTIVATIONS", "traceable"]

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PASS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
# Elementwise nonlinearities: tapped after, and rescaled by DeepLIFT.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
               nn.LogSigmoid, nn.Tanhshrink)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
_FUNC_ACTS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu", torch.sigmoid: "sigmoid",
              torch.tanh: "tanh", F.leaky_relu: "leaky_relu", F.elu: "elu", F.relu6: "relu6",
              F.hardswish: "hardswish", F.mish: "mish", F.softplus: "softplus"}
_METHOD_ACTS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, torch.add, torch.mul,
                torch.sub}
_ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}
_PRESERVE_FUNCS = set(_FUNC_ACTS) | {F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
                                     F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.interpolate}
_PRESERVE_METHODS = _METHOD_ACTS | {"contiguous", "clone", "float", "half", "to"}
_FLATTEN_FUNCS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


def _neurons(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _trace(model: nn.Module):
    try:
        return torch.fx.symbolic_trace(model), None
    except Exception as e:  # any model fx cannot trace: fall back to module order
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def traceable(model: nn.Module) -> bool:
    """Whether ``torch.fx`` traces ``model`` (else layers and the head need a probe forward)."""
    return _trace(model)[0] is not None


def _is_act_node(node) -> Optional[str]:
    if node.op == "call_function" and node.target in _FUNC_ACTS:
        return _FUNC_ACTS[node.target]
    if node.op == "call_method" and node.target in _METHOD_ACTS:
        return node.target.rstrip("_")
    return None


def _graph_chain(node, modules) -> Tuple[List[str], bool, Optional[str]]:
    """Chain of module names after a layer's call node; (chain, ends_in_activation, functional_act).
    ``functional_act`` is the call node of a functional nonlinearity that follows the chain, or None."""
    chain, cur, seen_norm = [node.target], node, False
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if u.op == "call_module":
            m = modules[u.target]
            if isinstance(m, NORMS) and not seen_norm and len(chain) == 1:
                chain.append(u.target)
                seen_norm = True
            elif isinstance(m, PASS):
                chain.append(u.target)
            elif isinstance(m, ACTIVATIONS):
                chain.append(u.target)
                return chain, True, None
            else:
                break
        else:
            return chain, False, (u if _is_act_node(u) else None)
        cur = u
    return chain, False, None


class _Union:
    def __init__(self):
        self.parent: Dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, names) -> None:
        names = sorted(names)
        for b in names[1:]:
            self.parent[self.find(b)] = self.find(names[0])


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups > 1 and m.groups == m.in_channels


def _flow(gm, modules):
    """Channel sources per node; returns (consumers, coupled union, call counts)."""
    src: Dict[object, frozenset] = {}
    flat: Dict[object, frozenset] = {}
    consumers: Dict[str, List[Tuple[str, int]]] = {}
    uf, calls = _Union(), {}
    for node in gm.graph.nodes:
        ins = node.all_input_nodes
        s0 = src.get(ins[0], frozenset()) if ins else frozenset()
        f0 = flat.get(ins[0], frozenset()) if ins else frozenset()
        s_new, f_new = frozenset(), frozenset()
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, LAYER_TYPES):
                calls[node.target] = calls.get(node.target, 0) + 1
                _add_consumer(consumers, node.target, m, s0, f0, modules)
                s_new = frozenset({node.target})
                if _is_depthwise(m):
                    s_new = s0 | s_new
                    uf.union(s_new)
            elif isinstance(m, NORMS + PASS + ACTIVATIONS + _POOLS):
                s_new, f_new = s0, f0
            elif isinstance(m, nn.Flatten):
                f_new = s0 | f0
        elif node.op in ("call_function", "call_method"):
            t = node.target
            if t in _ELEMENTWISE or (node.op == "call_method" and t in _ELEMENTWISE_METHODS):
                s_new = frozenset().union(*(src.get(a, frozenset()) for a in ins))
                f_new = frozenset().union(*(flat.get(a, frozenset()) for a in ins))
                if len(s_new) > 1:
                    uf.union(s_new)
            elif t in _PRESERVE_FUNCS or (node.op == "call_method" and t in _PRESERVE_METHODS):
                s_new, f_new = s0, f0
            elif t is F.pad:
                s_new = frozenset(x for x in s0 if _fx_pad_keeps(node, modules[x]))
            elif t in _FLATTEN_FUNCS or (node.op == "call_method" and t in _FLATTEN_METHODS):
                f_new = s0 | f0
        src[node], flat[node] = s_new, f_new
    return consumers, uf, calls


def _fx_pad_keeps(node, source: nn.Module) -> bool:
    """Whether the traced ``F.pad`` call ``node`` leaves the channels of ``source``'s output alone: a Linear's are
    the last dim (its first pad pair must be zeros); a conv's are dim 1 of a ``[B, C, *spatial]`` tensor, padded
    only by a pad of more than 2 × (spatial dims) values (``dataflow._pad_keeps`` reads the shapes instead)."""
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if not isinstance(pad, (tuple, list)) or not all(isinstance(v, int) for v in pad):
        return False
    if isinstance(source, nn.Linear):
        return len(pad) < 2 or (pad[0] == 0 and pad[1] == 0)
    return len(pad) <= 2 * len(getattr(source, "kernel_size", ()))


def _add_consumer(consumers, name, m, s0, f0, modules) -> None:
    for src_name in s0:
        s = modules[src_name]
        # a Linear reads the last dim (a Linear source's neurons); a conv reads dim 1 (a conv source's)
        if isinstance(m, nn.Linear) == isinstance(s, nn.Linear):
            consumers.setdefault(src_name, []).append((name, 1))
    if isinstance(m, nn.Linear):
        for src_name in f0 - s0:
            n = _neurons(modules[src_name])
            if m.in_features % n == 0:
                consumers.setdefault(src_name, []).append((name, m.in_features // n))


def _heads(gm, modules) -> List[str]:
    out = [n for n in gm.graph.nodes if n.op == "output"]
    stack, seen, heads = list(out), set(), []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules[node.target], LAYER_TYPES):
            if node.target not in heads:
                heads.append(node.target)
            continue
        stack.extend(node.all_input_nodes)
    return heads
