"""Layer discovery (docs/method.md §1): which Conv/Linear layers are sliced, where each is tapped, which layers
read its neurons, which are coupled, and which layer is the head.

The traced graph (``torch.fx.symbolic_trace``) is used where tracing works; else module order;
a layer whose nonlinearity cannot be found is tapped at its own output. The result records which
source each decision came from. Where tracing fails, the layers called and the head come from one
probe forward (:func:`probe`), never from registration order.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..io.container import SignatureError, check_model as _check_names, compare_layers, layer_entry
from . import dataflow, folds
from .traced import (_POOLS, ACTIVATIONS, LAYER_TYPES, NORMS, PASS, _add_consumer, _flow, _graph_chain, _heads,
                     _is_act_node, _is_depthwise, _neurons, _trace, _Union, traceable)
from .compat import transposed_linears
from .dataflow import canonical

__all__ = ["LayerInfo", "Plan", "Attention", "discover", "head_entries", "check_model", "LAYER_TYPES", "ACTIVATIONS",
           "NORMS", "PASS", "traceable"]

LayerSpec = Union[None, Sequence[Union[str, type]], type, Tuple[type, ...], Callable[[str, nn.Module], bool]]


@dataclass
class LayerInfo:
    """One sliced layer. ``chain``: module names from the layer to its tap point and on to the end of
    its per-neuron chain (layer → norm → dropout → activation); ``tap_stage`` indexes the tap in it."""
    name: str
    module: nn.Module
    n: int
    chain: List[str]
    tap_stage: int
    tap_source: str                      # "graph", "module order" or "layer"
    functional: Optional[str] = None     # a functional nonlinearity follows (not a module)
    consumers: List[Tuple[str, int]] = field(default_factory=list)  # (layer name, weight columns per neuron)
    calls: int = 1                       # calls per forward (traced graph or probe); each call is profiled
    # the functional nonlinearity itself (a function, or a Tensor method's name); with tap_stage ==
    # len(chain) the tap is its output (docs/method.md §1)
    functional_target: object = field(default=None, compare=False, repr=False)
    # pieces of each sample folded into the batch dim of the layer's output ([B * fold, T, N]: Swin's windows,
    # sample-major), found by the probe (docs/method.md §1); fold_valid: bool [fold * T], the positions of a
    # sample that are its own (False: padding the windows added), None if all; fold_error: why such an output
    # cannot be read
    fold: int = 1
    fold_valid: Optional[Tensor] = field(default=None, compare=False, repr=False)
    fold_error: Optional[str] = None
    fold_ordered: bool = True            # the probe had two samples or more, so it showed the fold's order

    @property
    def tap(self) -> str:
        """Name of the module whose output is the neuron's activation (``relu(fc1)`` after a functional one)."""
        if self.tap_stage == len(self.chain):
            return f"{self.functional}({self.chain[-1]})"
        return self.chain[self.tap_stage]

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return tuple(self.module.weight.shape)


@dataclass(frozen=True)
class Attention:
    """One attention block, found from what the model does (docs/method.md §1).

    Head ``h`` uses query channels ``q[1] + h*head_dim … + head_dim - 1`` of layer ``q[0]``; its key/value
    head is ``h // (heads // kv_heads)``, using channels ``k[1] + kvh*head_dim …`` (and ``v``) of their
    layers; ``out``'s input columns ``h*head_dim …`` belong to head ``h``."""
    module: str                  # qualified name of the module whose forward contains it ("" if none)
    q: Tuple[str, int]           # (Linear layer name, first channel of the queries in its output)
    k: Tuple[str, int]           # same for keys (fused qkv: same layer as q, offset = hidden)
    v: Tuple[str, int]           # same for values
    out: str                     # the Linear reading the heads' concatenated context
    heads: int                   # query heads
    head_dim: int
    kv_heads: int                # key/value heads (== heads without grouped-query attention)


@dataclass
class Plan:
    layers: List[LayerInfo]
    heads: List[str]
    coupled: List[List[str]]
    trace_error: Optional[str]
    probed: bool = False                 # untraceable: layers, calls and head came from a probe forward
    # Conv/Linear modules never called in forward (traced graph or probe; unknown otherwise): not sliced
    unused: List[str] = field(default_factory=list)
    # Conv/Linear modules called on no sample (probe: no output with the batch's size as its leading dim, e.g.
    # Swin-V2's position-bias MLP over a table of coordinates): not sliced, warned once with the unused ones
    batchless: List[str] = field(default_factory=list)
    named: frozenset = frozenset()       # layers the user named (layers=[...]): never excluded silently
    attention: List[Attention] = field(default_factory=list)
    # layer -> what its channels feed that forbids changing their number (the residual add / LayerNorm)
    residual: Dict[str, str] = field(default_factory=dict)


def _mha_children(model: nn.Module) -> set:
    """Linear modules inside nn.MultiheadAttention: its forward reads their weights, never calls them."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out |= {f"{name}.{c}" if name else c for c, _ in m.named_modules() if c}
    return out


def _order_chain(name: str, n: int, leaves: List[Tuple[str, nn.Module]], i: int) -> Tuple[List[str], bool]:
    chain, seen_norm = [name], False
    for nm, m in leaves[i + 1:]:
        if isinstance(m, NORMS) and not seen_norm and len(chain) == 1 and m.num_features == n:
            chain.append(nm)
            seen_norm = True
        elif isinstance(m, PASS):
            chain.append(nm)
        elif isinstance(m, ACTIVATIONS):
            chain.append(nm)
            return chain, True
        else:
            break
    return chain, False


def probe(model: nn.Module, run: Callable[[], object]) -> Tuple[Dict[str, int], List[str]]:
    """One forward ``run()`` (eval mode, no grad; modes restored), recorded (:func:`record`):
    ``({layer: calls}, heads)`` with the layers in module order. The head is the layer whose output
    *is* the model's output (its first tensor), else the last layer called (docs/method.md §1)."""
    flow = record(model, run)
    return _probe_calls(model, flow)


def record(model: nn.Module, run: Callable[[], object]) -> "dataflow.Flow":
    """One probe forward as a :class:`~neuslice.engine.dataflow.Flow`, each leaf module call classified by
    evidence (:func:`~neuslice.engine.dataflow.leaf_evidence`) and by torch's own classes."""
    def evidence(m, args, kwargs, out):
        return dataflow.leaf_evidence(m, args, kwargs, out) | _class_tags(m)
    return dataflow.record(model, run, evidence)[0]


def _class_tags(m: nn.Module) -> frozenset:
    return frozenset(t for t, types in _CLASS_TAGS.items() if isinstance(m, types))


_CLASS_TAGS = {"norm": NORMS, "pass": PASS, "elementwise": ACTIVATIONS,
               "mixes": (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())}


def _probe_calls(model: nn.Module, flow) -> Tuple[Dict[str, int], List[str]]:
    excluded = _mha_children(model)
    names = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES) and n not in excluded]
    wanted = set(names)
    calls: Dict[str, int] = {}
    last: List[str] = []
    for node in flow.nodes:
        if node.kind == "module" and node.target in wanted:
            calls[node.target] = calls.get(node.target, 0) + 1
            last[:] = [node.target]
    out = flow.output
    while isinstance(out, tuple) and not isinstance(out, dataflow._R) and out:
        out = out[0]
    head = None
    if isinstance(out, dataflow._R):
        node = flow.nodes[out[0]]
        head = node.target if node.kind == "module" and node.target in wanted else None
    return {n: calls[n] for n in names if n in calls}, ([head] if head is not None else last)


def _select(fn: str, candidates: Dict[str, nn.Module], layers: LayerSpec, heads: List[str],
            uncalled: Sequence[str] = (), model: Optional[nn.Module] = None) -> Tuple[List[str], frozenset]:
    """``(names, named)``: the sliced layers and those of them the user named (docs/method.md §1). Types and
    predicates never select the head; a name does."""
    named: frozenset = frozenset()
    if layers is None:
        names = [n for n in candidates if n not in heads]
    elif callable(layers) and not isinstance(layers, type):
        names = [n for n, m in candidates.items() if n not in heads and layers(n, m)]
    else:
        specs = [layers] if isinstance(layers, (str, type)) else list(layers)
        if isinstance(layers, tuple) and all(isinstance(s, type) for s in layers):
            specs = [layers]
        never = [s for s in specs if isinstance(s, str) and s in uncalled]
        if never:
            raise ValueError(f"{fn}: layer(s) {never} are never called in forward (unused), so they have no "
                             f"neurons to profile; choose layers= among {list(candidates)}")
        unknown = [s for s in specs if isinstance(s, str) and s not in candidates]
        if unknown:
            raise ValueError(f"{fn}: unknown layer name(s) {unknown}; expected names of Conv/Linear modules "
                             f"called in forward, one of {list(candidates)}")
        bad = [s for s in specs if not isinstance(s, (str, type, tuple))]
        if bad:
            raise TypeError(f"{fn}: layers must be names, module types or a predicate (name, module) -> bool, "
                            f"got {bad!r}")
        named = frozenset(s for s in specs if isinstance(s, str))
        names = [n for n, m in candidates.items()
                 if n in named or (n not in heads and any(not isinstance(s, str) and isinstance(m, s) for s in specs))]
    transposed = transposed_linears(model) if model is not None else []
    if not names:
        raise ValueError(f"{fn}: no sliceable layer: expected at least one Conv1d/2d/3d or Linear module "
                         f"(other than the head {heads}, which only its name selects) selected by "
                         f"layers={layers!r}; the model has {list(candidates) or 'none'}"
                         + (_transposed_hint(transposed) if transposed else ""))
    if transposed:
        warnings.warn(f"{fn}: {_transposed_hint(transposed)[2:]}; they are not sliced", stacklevel=4)
    return names, named


def _transposed_hint(names: List[str]) -> str:
    shown = names[:4] + (["…"] if len(names) > 4 else [])
    return (f"; {len(names)} module(s) compute a linear layer with a transposed [in, out] weight (x @ W + b, "
            f"e.g. transformers' Conv1D) and are not Linear: {shown}; convert them first with "
            "neuslice.conv1d_to_linear(model)")


def _order_consumers(name: str, n: int, leaves: List[Tuple[str, nn.Module]], i: int) -> List[Tuple[str, int]]:
    for nm, m in leaves[i + 1:]:
        if isinstance(m, LAYER_TYPES):
            if isinstance(m, nn.Linear) and m.in_features % n == 0:
                return [(nm, m.in_features // n)]
            if not isinstance(m, nn.Linear) and m.in_channels == n:
                return [(nm, 1)]
            return []
    return []


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


# the last probe forward recorded per model (operations and shapes, no tensors): where tracing fails, a later
# discovery given only layer names (Slices.apply, maintenance) reads it instead of guessing by module order
_FLOWS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _store_flow(model: nn.Module, flow):
    try:
        _FLOWS[model] = (_fingerprint(model), flow)
    except TypeError:                                   # a model that cannot be weakly referenced
        pass
    return flow


def _stored_flow(model: nn.Module):
    """The flow of ``model``'s last probe forward, while its modules are the same objects and shapes."""
    try:
        hit = _FLOWS.get(model)
    except TypeError:
        return None
    return hit[1] if hit is not None and hit[0] == _fingerprint(model) else None


def nonlinearity_modules(model: nn.Module) -> List[str]:
    """Names of the modules that the model's last probe forward in this process found elementwise by evidence
    (parameter-free, shape-preserving, each channel a function of its own input: a model library's
    ``GELUActivation``, ``SiLUActivation``, ...), so DeepLIFT's Rescale rule applies to them as to ``nn.GELU``
    (docs/method.md §1, §2). Empty for a model never probed (a traced model's nonlinearities are known by
    class)."""
    flow = _stored_flow(model)
    if flow is None:
        return []
    return sorted({n.target for n in flow.nodes if n.kind == "module" and "elementwise" in n.tags})


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((n, id(m), type(m), tuple(getattr(m, "weight", torch.empty(0)).shape))
                 for n, m in model.named_modules())


def discover(model: nn.Module, layers: LayerSpec = None, *, tap: str = "auto", fn: str = "neuslice",
             run: Optional[Callable[[], object]] = None, _probe: bool = False) -> Plan:
    """:func:`_discover`, cached per model while its modules stay the same objects and shapes (tracing
    costs ~10 ms; evaluation loops call this once per slice). Only name lists and None are cached, and a
    cached :class:`Plan` is shared between callers: treat it as read-only. Only plans from the traced graph
    are cached: a plan from a probe depends on the input, and one from module order is replaced by the
    model's next probe (:func:`_stored_flow`)."""
    names = tuple(layers) if isinstance(layers, (list, tuple)) and all(isinstance(x, str) for x in layers) else None
    if (layers is not None and names is None) or _probe:
        return _discover(model, layers, tap=tap, fn=fn, run=run, _probe=_probe)
    try:
        entry = _CACHE.setdefault(model, {})
    except TypeError:                                   # a model that cannot be weakly referenced
        return _discover(model, layers, tap=tap, fn=fn, run=run)
    fp, key = _fingerprint(model), (names, tap)
    hit = entry.get(key)
    if hit is not None and hit[0] == fp:
        return hit[1]
    plan = _discover(model, layers, tap=tap, fn=fn, run=run)
    if plan.trace_error is None:                        # an untraced plan may change with the next probe
        entry[key] = (fp, plan)
    return plan


def _discover(model: nn.Module, layers: LayerSpec = None, *, tap: str = "auto", fn: str = "neuslice",
              run: Optional[Callable[[], object]] = None, _probe: bool = False) -> Plan:
    """Find the sliced layers of ``model`` (docs/method.md §1).

    Args:
        layers: None (every Conv/Linear but the head), names, module types, or a predicate
            ``(qualified_name, module) -> bool``.
        tap: ``"auto"`` (after the nonlinearity where one follows) or ``"layer"`` (the layer's own output).
        fn: the public function's name, for error messages.
        run: where tracing fails, a forward of one real input (:func:`probe`) that finds the layers
            called, their call counts and the head. Without it the head is the last Conv/Linear in module
            order and call counts are unknown (``calls`` 1): what maintenance, given only layer names, uses.
    """
    if tap not in ("auto", "layer"):
        raise ValueError(f"{fn}: tap must be 'auto' or 'layer', got {tap!r}")
    modules = dict(model.named_modules())
    excluded = _mha_children(model)
    gm, err = (None, "the probe forward was asked for") if _probe else _trace(model)
    flow = None
    if gm is not None:
        flow = dataflow.from_fx(gm, modules, _CLASS_TAGS)
        consumers, uf, calls = _flow(gm, modules)
        heads = _heads(gm, modules)
        candidates = {n: modules[n] for n in modules if n in calls}
    elif run is not None or _stored_flow(model) is not None:
        flow = _stored_flow(model) if run is None else _store_flow(model, record(model, run))
        calls, heads = _probe_calls(model, flow)
        candidates = {n: modules[n] for n in calls}
    else:
        consumers, uf, calls = {}, _Union(), {}
        candidates = {n: m for n, m in modules.items() if isinstance(m, LAYER_TYPES) and n not in excluded}
        heads = list(candidates)[-1:]
    uncalled = [n for n, m in modules.items() if isinstance(m, LAYER_TYPES) and n not in excluded
                and n not in candidates] if flow is not None else []
    batchless = folds.batchless(fn, flow, candidates, layers) if flow is not None and gm is None else []
    candidates = {n: m for n, m in candidates.items() if n not in batchless}
    names, named = _select(fn, candidates, layers, heads, uncalled, model)
    residual, attention, users = {}, [], None
    if flow is not None:
        users = flow.users()
        widths = {n: _neurons(m) for n, m in candidates.items()}
        residual = dataflow.residual(flow, users, widths, lambda x: isinstance(modules.get(x), LAYER_TYPES))
        attention = _attention(flow, widths, modules)
        if gm is None:
            consumers, uf, calls = _probe_flow(flow, modules, candidates)
        for a in attention:                         # v's channels are out's input columns, one each
            if a.v[1] == 0 and a.kv_heads == a.heads and widths.get(a.v[0]) == a.heads * a.head_dim \
                    and a.v[0] not in (a.q[0], a.k[0]) and (a.out, 1) not in consumers.get(a.v[0], []):
                consumers.setdefault(a.v[0], []).append((a.out, 1))
    leaves = [(n, m) for n, m in modules.items() if n and not list(m.children())]
    leaf_index = {n: i for i, (n, _) in enumerate(leaves)}
    nodes: Dict[str, list] = {}
    for node in (gm.graph.nodes if gm is not None else ()):
        if node.op == "call_module":
            nodes.setdefault(node.target, []).append(node)
    infos = []
    batch = folds.batch_size(flow) if flow is not None and gm is None else None
    for name in names:
        m, n = candidates[name], _neurons(candidates[name])
        functional = target = None
        fold, fold_valid, fold_error, fold_ordered = 1, None, None, True
        if gm is not None:
            chain, act, fnode = _same_chain(fn, name, [_graph_chain(node, modules) for node in nodes[name]])
            if fnode is not None:
                functional, target = _is_act_node(fnode), fnode.target
            source, cons = "graph", list(dict.fromkeys(consumers.get(name, [])))
        elif flow is not None:
            is_layer = lambda x: x in modules and isinstance(modules[x], LAYER_TYPES)   # noqa: E731
            calls_of = [i for i, nd in enumerate(flow.nodes) if nd.kind == "module" and nd.target == name]
            chain, act, fnode = _same_chain(fn, name, [dataflow.chain_of(flow, users, i, is_layer)
                                                      for i in calls_of])
            if fnode is not None:
                functional, target = canonical(fnode.target).rstrip("_"), fnode.target
            source, cons = "probe", list(dict.fromkeys(consumers.get(name, [])))
            fold, fold_valid, fold_error, fold_ordered = (folds.layer_fold(flow, users, calls_of, batch)
                                                          if isinstance(m, nn.Linear) else (1, None, None, True))
        else:
            chain, act = _order_chain(name, n, leaves, leaf_index[name])
            source, cons = "module order", _order_consumers(name, n, leaves, leaf_index[name])
        stage = (len(chain) - (0 if functional else 1)) if ((act or functional) and tap == "auto") else 0
        infos.append(LayerInfo(name, m, n, chain, stage, source if stage else "layer", functional, cons,
                               calls.get(name, 1), target, fold, fold_valid, fold_error, fold_ordered))
    groups: Dict[str, List[str]] = {}
    for name in names:
        groups.setdefault(uf.find(name), []).append(name)
    coupled = [g for g in groups.values() if len(g) > 1 and len({_neurons(modules[x]) for x in g}) == 1]
    return Plan(infos, heads, coupled, err, probed=gm is None and flow is not None, unused=uncalled, named=named,
                batchless=batchless,
                attention=attention, residual={n: residual[n] for n in candidates if n in residual})


def _attention(flow, widths: Dict[str, int], modules) -> List[Attention]:
    """:func:`dataflow.attention`'s blocks whose heads are consistent (q, k, v the same head_dim; k and v
    the same heads, dividing q's; ``out`` reading heads·head_dim columns), as :class:`Attention`."""
    out: List[Attention] = []
    for scope, q, k, v, o in dataflow.attention(flow, widths):
        ok = (q.dim == k.dim == v.dim and k.heads == v.heads and k.heads and q.heads % k.heads == 0
              and isinstance(modules[o], nn.Linear) and modules[o].in_features == q.heads * q.dim)
        a = Attention(scope, (q.layer, q.offset), (k.layer, k.offset), (v.layer, v.offset), o, q.heads, q.dim,
                      k.heads)
        if ok and a not in out:
            out.append(a)
    return out


def _probe_flow(flow, modules, candidates):
    """:func:`_flow` on a recorded probe forward: the same rules, modules classified by evidence."""
    def add_consumer(consumers, name, s0, f0):
        _add_consumer(consumers, name, modules[name], s0, f0, modules)

    def preserve(node) -> bool:
        m = modules[node.target]
        return isinstance(m, NORMS + PASS + ACTIVATIONS + _POOLS) or bool(node.tags & {"pass", "elementwise"})

    is_layer = lambda x: x in candidates   # noqa: E731
    consumers, unions, calls = dataflow.sources(flow, is_layer, add_consumer, lambda x: _is_depthwise(modules[x]),
                                                preserve, lambda nd: isinstance(modules[nd.target], nn.Flatten),
                                                lambda x: isinstance(modules[x], nn.Linear))
    uf = _Union()
    for u in unions:
        uf.union(u)
    return consumers, uf, calls


def _same_chain(fn: str, name: str, chains: list) -> tuple:
    """The one chain of a layer's calls (docs/method.md §1); calls followed by different modules or
    nonlinearities cannot be tapped or masked as one layer."""
    def key(c):
        chain, act, fnode = c
        return tuple(chain), act, None if fnode is None else (fnode.op, fnode.target)
    if len({key(c) for c in chains}) > 1:
        seen = [list(key(c)[0]) + ([str(key(c)[2][1])] if key(c)[2] else []) for c in chains]
        raise ValueError(f"{fn}: layer {name!r} is called {len(chains)} times in forward and its calls are "
                         f"followed by different modules or nonlinearities {seen}, so they cannot be profiled "
                         f"or masked as one layer; choose layers= without {name!r}")
    return chains[0]


def head_entries(model: nn.Module, plan: Plan) -> List[dict]:
    """The model's head(s) as recorded in profile and slices files: ``name``, ``type``, ``n`` (outputs)."""
    modules = dict(model.named_modules())
    return [{"name": h, "type": type(modules[h]).__name__, "n": _neurons(modules[h])} for h in plan.heads]


def check_model(fn: str, layers: Sequence[dict], heads: Sequence[dict], model: nn.Module) -> None:
    """``model`` must be the model a file's ``layers`` (and ``heads``, when recorded) were made for
    (docs/method.md §5): the same sliced layers (name, type, weight shape, width ``n``) in the same forward
    order, and the same head(s). Else :class:`~neuslice.SignatureError` naming the first layer that differs,
    as it is in the file and in the model."""
    _check_names(fn, layers, model)
    try:
        plan = discover(model, [e["name"] for e in layers], fn=fn)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{fn}: the file was made for another model: {e}") from None
    compare_layers(fn, "sliced layer", layers,
                   [{**layer_entry(i.name, i.module), "n": i.n} for i in plan.layers])
    if heads:
        compare_layers(fn, "head", heads, head_entries(model, plan))
