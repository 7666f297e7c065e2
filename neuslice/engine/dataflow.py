"""What a model does with each layer's output, as one list of operations (docs/method.md §1).

Two sources give the same :class:`Flow`: the traced graph (:func:`from_fx`) and one probe forward
(:func:`record`): forward hooks on every module and a ``TorchFunctionMode`` that records the torch
calls made outside leaf modules, linked by tensor identity. On it, shared by both sources:
:func:`chain_of` (the per-neuron modules after a layer, its nonlinearity found by evidence),
:func:`sources` (consumers and coupled layers, for the probe), :func:`residual` (layers writing a
stream normalised by a LayerNorm-like module) and :func:`attention` (q·k and v → out, head counts
from the view of each projection into ``[..., H, D]``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

Ref = Tuple[int, int]                       # (node index, output index)


class _Ext:
    """A tensor the flow did not produce (a model input, a parameter read directly, a constant)."""

    def __repr__(self):
        return "<ext>"


EXT = _Ext()


@dataclass
class Node:
    kind: str                               # "module", "call" or "input"
    target: str                             # module name, or the op's canonical name ("add", "view", …)
    args: tuple                             # Refs, EXT, constants, nested tuples of them
    kwargs: dict
    shapes: List[Optional[tuple]]           # per output; None where unknown (traced graph)
    scope: str = ""                         # innermost module whose forward made the call ("" the model)
    func: object = None                     # the callable (a call's function, or a Tensor method's name)
    # evidence about a module call (probe) or its class (traced): "pass" (output equals input), "elementwise"
    # (parameter-free, shape-preserving, each output channel a function of its own input channel),
    # "mixes" (shape-preserving, every channel depends on the others: LayerNorm-like), "norm" (BatchNorm)
    tags: frozenset = frozenset()
    cls: str = ""
    params: bool = False


@dataclass
class Flow:
    nodes: List[Node] = field(default_factory=list)
    output: object = None                   # the model output as Refs (probe) or the output node's args

    def users(self) -> Dict[Ref, List[int]]:
        out: Dict[Ref, List[int]] = {}
        for i, n in enumerate(self.nodes):
            for r in refs_of((n.args, tuple(n.kwargs.values()))):
                if i not in out.setdefault(r, []):
                    out[r].append(i)
        return out


def refs_of(x) -> List[Ref]:
    """Every Ref in a (nested) argument structure, in order."""
    if isinstance(x, _R):
        return [x]
    if isinstance(x, (tuple, list)):
        return [r for v in x for r in refs_of(v)]
    return []


class _R(tuple):
    """A Ref (a plain tuple subclass, so constants like ``(2, 3)`` are never mistaken for one)."""


def _ref(i: int, k: int) -> _R:
    return _R((i, k))


_RENAME = {"iadd": "add_", "isub": "sub_", "imul": "mul_", "radd": "add", "rsub": "rsub", "rmul": "mul",
           "truediv": "div", "rtruediv": "rdiv", "itruediv": "div_", "neg": "neg", "matmul": "matmul",
           "rmatmul": "rmatmul"}


def canonical(f) -> str:
    """A function's or Tensor method's canonical name: ``operator.add``, ``torch.add``, ``Tensor.__add__``
    and ``"add"`` are all ``"add"``."""
    name = f if isinstance(f, str) else getattr(f, "__name__", str(f))
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    return _RENAME.get(name, name)


# --------------------------------------------------------------------------------------------- probe
class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module, evidence: Callable):
        super().__init__()
        self.flow = Flow()
        self.ids: Dict[int, _R] = {}
        self.keep: List[torch.Tensor] = []  # outputs stay alive so that ids stay unique during the probe
        self.leaf_depth = 0
        self.stack: List[str] = []
        self.busy = False
        self._evidence = evidence

    def map(self, x):
        if isinstance(x, torch.Tensor):
            return self.ids.get(id(x), EXT)
        if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
            return tuple(self.map(v) for v in x)
        if isinstance(x, torch.Size):
            return tuple(x)
        if isinstance(x, dict):
            return {k: self.map(v) for k, v in x.items()}
        return x

    def add(self, node: Node, out) -> None:
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        node.shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in outs]
        i = len(self.flow.nodes)
        self.flow.nodes.append(node)
        for k, t in enumerate(outs):
            if isinstance(t, torch.Tensor):
                self.ids[id(t)] = _ref(i, k)
                self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.busy or self.leaf_depth or not isinstance(out, (torch.Tensor, list, tuple)):
            return out
        if isinstance(out, (list, tuple)) and not any(isinstance(t, torch.Tensor) for t in out):
            return out
        name = canonical(func)
        if name in ("get", "set"):
            return out
        margs = self.map(args)
        if not refs_of((margs, tuple(self.map(kwargs).values()))) and not isinstance(out, torch.Tensor):
            return out
        self.add(Node("call", name, margs, self.map(kwargs), [], self.stack[-1] if self.stack else "",
                      func), out)
        return out

    def pre(self, name: str, leaf: bool):
        def hook(module, args, kwargs):
            if self.busy:
                return None
            if leaf:
                self.leaf_depth += 1
            self.stack.append(name)
            return None
        return hook

    def post(self, name: str, leaf: bool):
        def hook(module, args, kwargs, out):
            if self.busy:
                return None
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            if not leaf:
                return None
            self.leaf_depth -= 1
            if self.leaf_depth:
                return None
            scope = self.stack[-1] if self.stack else ""
            node = Node("module", name, self.map(args), self.map(kwargs), [], scope, None,
                        cls=type(module).__name__, params=any(True for _ in module.parameters(recurse=False)))
            self.busy = True
            try:
                node.tags = self._evidence(module, args, kwargs, out)
            finally:
                self.busy = False
            self.add(node, out)
            return None
        return hook


def record(model: nn.Module, run: Callable[[], object], evidence: Callable) -> Tuple[Flow, object]:
    """One forward ``run()`` (eval mode, no grad; modes restored) recorded as a :class:`Flow`; also returns
    ``run()``'s output. ``evidence(module, args, kwargs, out) -> frozenset`` classifies each leaf call."""
    rec = _Recorder(model, evidence)
    training = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, m in model.named_modules():
            leaf = not any(True for _ in m.children())
            handles.append(m.register_forward_pre_hook(rec.pre(name, leaf), with_kwargs=True))
            handles.append(m.register_forward_hook(rec.post(name, leaf), with_kwargs=True))
        model.eval()
        with torch.no_grad(), rec:
            out = run()
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.training = t
    rec.flow.output = rec.map(out)
    rec.keep.clear()
    return rec.flow, out


def leaf_evidence(module: nn.Module, args, kwargs, out) -> frozenset:
    """What a leaf module's call did, by evidence (docs/method.md §1): ``pass`` (output equals input),
    ``elementwise`` (parameter-free, shape-preserving, and each channel of the last dim depends on that
    channel alone, the same function for every channel: perturbing channel 0 changes only channel 0, and
    the call commutes with a roll of the last dim), ``mixes`` (shape-preserving, perturbing channel 0
    changes the others: LayerNorm-like). Where the last dim has one element, the last dim with two or more
    is probed instead. Calls the module's ``forward`` twice more, hooks bypassed."""
    xs = [a for a in args if isinstance(a, torch.Tensor)]
    if len(xs) != 1 or not isinstance(out, torch.Tensor) or not isinstance(args[0], torch.Tensor):
        return frozenset()
    x = args[0]
    if out is x and getattr(module, "inplace", False):  # its input is already overwritten: no evidence
        return frozenset()
    # the axis probed: the last dim, or where it has one element (a conv output [B, C, 1, 1] at the end of a
    # network) the last dim with two or more
    axis = next((d for d in range(x.dim() - 1, -1, -1) if x.shape[d] >= 2), None) if x.dim() else None
    if out.shape != x.shape or not x.is_floating_point() or axis is None or x.numel() == 0:
        return frozenset({"pass"}) if out is x else frozenset()
    if out is x or torch.equal(out, x):
        return frozenset({"pass"})
    try:
        x2 = x.clone()
        x2.select(axis, 0).add_(1.0)
        y2 = module.forward(x2, *args[1:], **kwargs)
        if not isinstance(y2, torch.Tensor) or y2.shape != out.shape:
            return frozenset()
        if not torch.equal(y2.narrow(axis, 1, x.shape[axis] - 1), out.narrow(axis, 1, x.shape[axis] - 1)):
            return frozenset({"mixes"})
        if any(True for _ in module.parameters(recurse=False)):
            return frozenset()
        y3 = module.forward(x.roll(1, axis), *args[1:], **kwargs)
        if isinstance(y3, torch.Tensor) and torch.allclose(y3, out.roll(1, axis), rtol=0, atol=0):
            return frozenset({"elementwise"})
    except Exception:                               # a module that cannot be called again is no evidence
        return frozenset()
    return frozenset()


# --------------------------------------------------------------------------------------------- traced
def from_fx(gm, modules: Dict[str, nn.Module], classes: Dict[str, tuple]) -> Flow:
    """The traced graph as a :class:`Flow`; module evidence from torch's own classes (``classes``:
    tag -> module types); shapes unknown."""
    flow = Flow()
    where: Dict[object, _R] = {}

    def m(x):
        if isinstance(x, torch.fx.Node):
            return where.get(x, EXT)
        if isinstance(x, (list, tuple)):
            return tuple(m(v) for v in x)
        if isinstance(x, dict):
            return {k: m(v) for k, v in x.items()}
        return x

    for node in gm.graph.nodes:
        if node.op == "output":
            flow.output = m(node.args)
            continue
        if node.op in ("placeholder", "get_attr"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        scopes = [v[0] if isinstance(v, tuple) else k for k, v in stack.items()]
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node) \
                and isinstance(node.args[1], int) and where.get(node.args[0]) is not None \
                and flow.nodes[where[node.args[0]][0]].target in ("split", "chunk", "unbind", "split_with_sizes"):
            src = where[node.args[0]]
            where[node] = _ref(src[0], node.args[1])
            continue
        if node.op == "call_module":
            mod = modules[node.target]
            tags = frozenset(t for t, types in classes.items() if isinstance(mod, types))
            scope = scopes[-2] if len(scopes) > 1 else ""
            n = Node("module", node.target, m(node.args), m(node.kwargs), [None], scope, None, tags,
                     type(mod).__name__, any(True for _ in mod.parameters(recurse=False)))
        else:
            scope = scopes[-1] if scopes else ""
            n = Node("call", canonical(node.target), m(node.args), m(node.kwargs), [None], scope, node.target)
        where[node] = _ref(len(flow.nodes), 0)
        flow.nodes.append(n)
    return flow


# --------------------------------------------------------------------------------------------- analyses
_CHAIN_CALLS = {"relu", "relu_", "gelu", "silu", "sigmoid", "sigmoid_", "tanh", "tanh_", "leaky_relu", "elu",
                "relu6", "hardswish", "mish", "softplus"}


@dataclass
class FunctionalAct:
    op: str
    target: object


def chain_of(flow: Flow, users, i: int, is_layer: Callable[[str], bool]) -> Tuple[List[str], bool, Optional[FunctionalAct]]:
    """The per-neuron modules after the layer call ``flow.nodes[i]``: ``(chain, ends_in_activation,
    functional)`` as ``traced._graph_chain``: a first BatchNorm, pass-through modules, and one elementwise
    nonlinearity (a module, or a functional call); only while the tensor has exactly one user."""
    chain, cur, seen_norm = [flow.nodes[i].target], _ref(i, 0), False
    while len(users.get(cur, ())) == 1:
        j = users[cur][0]
        u = flow.nodes[j]
        if refs_of(u.args[:1]) != [cur]:
            break
        if u.kind == "module":
            if is_layer(u.target):
                break
            if "norm" in u.tags and not seen_norm and len(chain) == 1:
                chain.append(u.target)
                seen_norm = True
            elif "elementwise" in u.tags:            # before "pass": an in-place ReLU returns its input
                chain.append(u.target)
                return chain, True, None
            elif "pass" in u.tags:
                chain.append(u.target)
            else:
                break
        else:
            if u.target in _CHAIN_CALLS:
                return chain, False, FunctionalAct("call_method" if isinstance(u.func, str) else "call_function",
                                                   u.func)
            break
        cur = _ref(j, 0)
    return chain, False, None


_ELEMENTWISE = {"add", "add_", "sub", "sub_", "mul", "mul_"}
_PRESERVE = {"relu", "relu_", "gelu", "silu", "sigmoid", "sigmoid_", "tanh", "tanh_", "leaky_relu", "elu", "relu6",
             "hardswish", "mish", "softplus", "dropout", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d",
             "adaptive_avg_pool1d", "adaptive_avg_pool2d", "interpolate", "contiguous", "clone", "float", "half",
             "to"}
_FLATTEN = {"flatten", "view", "reshape"}


def _pad_keeps(node: Node, in_shape, channel_last: bool) -> bool:
    """Whether the ``pad`` call ``node`` (its input of shape ``in_shape``) leaves a source's channels alone: the
    channel axis (the last for a Linear source, dim 1 for a conv's) keeps its size (an explicit "same" padding
    before a conv, as TensorFlow-ported models do, pads only the spatial dims)."""
    out = node.shapes[0] if node.shapes else None
    if not in_shape or not out or len(in_shape) != len(out) or len(out) < 2:
        return False
    axis = -1 if channel_last else 1
    return in_shape[axis] == out[axis]


def sources(flow: Flow, is_layer: Callable[[str], bool], add_consumer: Callable, depthwise: Callable[[str], bool],
            preserve_module: Callable[[Node], bool], flatten_module: Callable[[Node], bool],
            channel_last: Optional[Callable[[str], bool]] = None):
    """Channel sources per tensor, as ``traced._flow`` on the traced graph: ``(consumers, unions, calls)``.
    ``channel_last(layer)``: whether that layer's channels are its output's last dim (a Linear's) rather than
    dim 1 (a conv's); with it, a padding that leaves a source's channel axis alone carries that source on."""
    src: Dict[_R, frozenset] = {}
    flat: Dict[_R, frozenset] = {}
    consumers: Dict[str, List[Tuple[str, int]]] = {}
    unions: List[frozenset] = []
    calls: Dict[str, int] = {}
    for i, node in enumerate(flow.nodes):
        ins = refs_of((node.args, tuple(node.kwargs.values())))
        s0 = src.get(ins[0], frozenset()) if ins else frozenset()
        f0 = flat.get(ins[0], frozenset()) if ins else frozenset()
        s_new, f_new = frozenset(), frozenset()
        if node.kind == "module":
            if is_layer(node.target):
                calls[node.target] = calls.get(node.target, 0) + 1
                add_consumer(consumers, node.target, s0, f0)
                s_new = frozenset({node.target})
                if depthwise(node.target):
                    s_new = s0 | s_new
                    unions.append(s_new)
            elif preserve_module(node):
                s_new, f_new = s0, f0
            elif flatten_module(node):
                f_new = s0 | f0
        elif node.target in _ELEMENTWISE:
            s_new = frozenset().union(*(src.get(a, frozenset()) for a in ins))
            f_new = frozenset().union(*(flat.get(a, frozenset()) for a in ins))
            if len(s_new) > 1:
                unions.append(s_new)
        elif node.target in _PRESERVE:
            s_new, f_new = s0, f0
        elif node.target in _FLATTEN:
            f_new = s0 | f0
        elif node.target == "pad" and channel_last is not None and ins:
            in_shape = flow.nodes[ins[0][0]].shapes[ins[0][1]] if flow.nodes[ins[0][0]].shapes else None
            s_new = frozenset(x for x in s0 if _pad_keeps(node, in_shape, channel_last(x)))
        for k in range(len(node.shapes) or 1):
            src[_ref(i, k)], flat[_ref(i, k)] = s_new, f_new
    return consumers, unions, calls


_CARRY_CALLS = {"dropout", "contiguous", "clone", "to", "float", "half", "type_as", "add", "add_", "sub", "sub_",
                "cat", "flatten", "transpose", "permute"}
# Layout operations that carry the channels on when the last dim keeps their number (Swin's window partition
# and reverse, its cyclic shift, padding and crop between an attention output projection and its residual add)
_CARRY_LAYOUT = {"view", "reshape", "roll", "pad", "getitem", "unflatten", "narrow", "squeeze", "unsqueeze",
                 "mean", "sum"}   # (and pooling over the tokens: BEiT's mean before its pooler's LayerNorm)
# Scalings that keep each channel itself when the last dim keeps their number (BEiT's and CaiT's layer scale
# γ ⊙ x before the residual add, a gate x ⊙ σ(·))
_CARRY_SCALE = {"mul", "mul_", "div", "div_"}


def residual(flow: Flow, users, layers: Dict[str, int], is_layer: Callable[[str], bool]) -> Dict[str, str]:
    """Layers whose channels reach, unchanged in number (pass-through modules, dropout, residual adds,
    concatenation along other dims, flatten/transpose of conv channels, views, shifts, padding, crops and scalings
    that keep them in the last dim), a LayerNorm-like module (one
    whose every output channel depends on all its input channels) over those channels: ``{layer: text}``
    naming the residual add and the LayerNorm (docs/method.md §1)."""
    out: Dict[str, str] = {}
    for i, node in enumerate(flow.nodes):
        if node.kind != "module" or node.target not in layers or node.target in out:
            continue
        # (tensor, the size of the last dim that holds the layer's channels: n, or more after a concatenation
        # along it, as Swin's patch merging concatenates 4 shifted samplings of the stream)
        seen, todo, add = set(), [(_ref(i, 0), layers[node.target])], None
        found = None
        while todo and found is None:
            r, n = todo.pop(0)
            for j in users.get(r, ()):
                if j in seen:
                    continue
                seen.add(j)
                u = flow.nodes[j]
                shape = u.shapes[0] if u.shapes else None
                if u.kind == "module":
                    if u.target in layers or is_layer(u.target):
                        continue
                    if "mixes" in u.tags and (shape is None or shape[-1] == n):
                        found = (u, add)
                        break
                    if "pass" in u.tags:
                        todo.append((_ref(j, 0), n))
                elif u.target in _CARRY_LAYOUT:
                    if shape is not None and shape[-1] == n and refs_of(u.args[:1]) == [r]:
                        todo.append((_ref(j, 0), n))
                elif u.target in _CARRY_SCALE:
                    if shape is not None and shape[-1] == n:
                        todo.append((_ref(j, 0), n))
                elif u.target in _CARRY_CALLS:
                    if u.target == "cat" and shape is not None and shape[-1] != n and _cat_last(u, len(shape)):
                        todo.append((_ref(j, 0), shape[-1]))
                        continue
                    if u.target in ("transpose", "permute", "flatten", "cat") and (shape is None or shape[-1] != n):
                        if not (u.target == "flatten"):
                            continue
                    if u.target.startswith(("add", "sub")) and add is None:
                        add = u
                    todo.append((_ref(j, 0), n))
        if found is not None:
            ln, add = found
            what = f"LayerNorm-like module {ln.target!r} ({ln.cls})"
            where = (repr(add.scope) if add.scope else "the model's forward") if add is not None else ""
            out[node.target] = (f"the residual add in {where} before {what}" if add is not None
                                else f"{what}, which normalises over its channels")
    return out


def _cat_last(node: Node, ndim: int) -> bool:
    """Whether the ``cat`` call ``node`` concatenates along the last of its ``ndim`` dims."""
    d = _arg(node, 1, "dim", 0)
    return isinstance(d, int) and d in (-1, ndim - 1)


_SPLITS = {"split", "chunk", "split_with_sizes", "unbind"}
_MATMUL = {"matmul", "bmm", "einsum", "baddbmm"}


def _arg(node: Node, k: int, name: str, default=None):
    if len(node.args) > k:
        return node.args[k]
    return node.kwargs.get(name, default)


def _split_channels(node: Node, width: int) -> Optional[List[Tuple[int, int]]]:
    """(offset, width) of each output of a split/chunk along the last dim, or None."""
    dim = _arg(node, 2 if node.target != "chunk" else 2, "dim", 0)
    if node.target == "chunk":
        dim = _arg(node, 2, "dim", 0)
        k = _arg(node, 1, "chunks")
        sizes = [width // k] * k if isinstance(k, int) and k and width % k == 0 else None
    else:
        s = _arg(node, 1, "split_size_or_sections", _arg(node, 1, "split_size"))
        sizes = [s] * (width // s) if isinstance(s, int) and s and width % s == 0 else (list(s) if isinstance(s, tuple) else None)
    shape = node.shapes[0] if node.shapes else None
    last = dim == -1 or (shape is not None and isinstance(dim, int) and dim == len(shape) - 1) or (shape is None and dim == 2)
    if not last or not sizes:
        return None
    offs, o = [], 0
    for s in sizes:
        offs.append((o, s))
        o += s
    return offs


def _head_view(node: Node, width: int) -> Optional[Tuple[int, int]]:
    """(H, D) when a view/reshape splits a last dim of ``width`` channels into ``[..., H, D]``."""
    shape = node.shapes[0] if node.shapes else None
    if shape is None:
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(_arg(node, 1, "shape"), tuple) else node.args[1]
        dims = tuple(dims)
        if len(dims) < 2 or not all(isinstance(d, int) for d in dims[-2:]):
            return None
        h, d = dims[-2:]
        if d == -1 and h > 0 and width % h == 0:
            d = width // h
        elif h == -1 and d > 0 and width % d == 0:
            h = width // d
        shape = (h, d)
    if len(shape) < 2 or shape[-1] <= 0 or shape[-2] * shape[-1] != width or shape[-1] == width:
        return None
    return shape[-2], shape[-1]


@dataclass(frozen=True)
class _Head:
    layer: str
    offset: int
    heads: int
    dim: int


def attention(flow: Flow, layers: Dict[str, int]) -> List[tuple]:
    """Attention blocks: ``(scope, q, k, v, out)`` with q/k/v :class:`_Head` s and ``out`` the layer that
    reads the heads' merged context. Found by following tags: a layer's channels (``chan``) split into heads
    by a view (``head``), two headed tensors multiplied (scores), scores times a headed tensor or
    ``scaled_dot_product_attention`` (context), the context read by a layer (out)."""
    chan: Dict[_R, Tuple[str, int, int]] = {}
    tag: Dict[_R, tuple] = {}
    found: List[tuple] = []
    for i, node in enumerate(flow.nodes):
        ins = refs_of((node.args, tuple(node.kwargs.values())))
        first = refs_of(node.args[:1])
        out = _ref(i, 0)
        if node.kind == "module" and node.target in layers:
            chan[out] = (node.target, 0, layers[node.target])
            ctx = [tag[r] for r in ins if r in tag and tag[r][0] == "c"]
            if ctx:
                _, q, k, v, scope = ctx[0]
                found.append((scope, q, k, v, node.target))
            continue
        c = chan.get(first[0]) if first else None
        if c is not None:
            if node.target in _SPLITS:
                parts = _split_channels(node, c[2])
                for k_, (o, w) in enumerate(parts or ()):
                    chan[_ref(i, k_)] = (c[0], c[1] + o, w)
                if parts:
                    continue
            elif node.target in ("view", "reshape", "unflatten"):
                hd = _head_view(node, c[2])
                if hd is not None:
                    tag[out] = ("h", _Head(c[0], c[1], hd[0], hd[1]))
                    continue
            elif (node.kind == "module" and "pass" in node.tags) or node.target in ("contiguous", "clone", "to",
                                                                                      "dropout", "float", "half"):
                chan[out] = c
                continue
        tags = list(dict.fromkeys(tag[r] for r in ins if r in tag))
        if node.target == "scaled_dot_product_attention":
            qkv = [tag.get(r) for r in refs_of(node.args[:3])] if len(node.args) >= 3 else \
                [tag.get(r) for r in refs_of(tuple(node.kwargs.get(k) for k in ("query", "key", "value")))]
            if len(qkv) == 3 and all(t is not None and t[0] == "h" for t in qkv):
                tag[out] = ("c", qkv[0][1], qkv[1][1], qkv[2][1], node.scope)
            continue
        if node.target in _MATMUL:
            ab = [tag.get(r) for r in refs_of(node.args[:2])]
            if len(ab) == 2 and all(t is not None for t in ab):
                a, b = ab
                if a[0] == "h" and b[0] == "h":
                    tag[out] = ("s", a[1], b[1], node.scope)
                elif a[0] == "s" and b[0] == "h":
                    tag[out] = ("c", a[1], a[2], b[1], a[3])
            continue
        if len(tags) == 1:
            for k_ in range(len(node.shapes) or 1):
                tag[_ref(i, k_)] = tags[0]
    return found
