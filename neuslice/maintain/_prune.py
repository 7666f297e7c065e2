"""Physical removal of neurons through Torch-Pruning's dependency graph.

We decide which neurons go (the slice); Torch-Pruning finds what is coupled to them and cuts it.
Before cutting, each dependency group is checked against what mask mode computes: a group may only
reach modules whose per-channel computation maps a zeroed channel to "absent" (Conv/Linear reading
it, BatchNorm of the layer's own chain, elementwise ops, concat, reshape/flatten, PReLU). A group
that reaches a LayerNorm, GroupNorm, InstanceNorm, attention, embedding, LSTM, bare parameter or a
Conv/Linear that is not sliced would make the physical model compute something else: that is an error
naming the layer and the module, suggesting to exclude the layer. After cutting, the physical model's
logits are compared with mask mode on the example inputs as a final check.
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from ..engine.graph import Attention, Plan
from ..engine.capture import call_model
from . import _surgery

__all__ = ["physical"]

# The final structural check, physical model against mask mode on the example inputs. A wrong removal moves the
# logits by O(1); rounding, in float32, by about 1e-6 of their largest magnitude: elementwise rtol 1e-3, atol 1e-4.
# A model that computes in bfloat16 or float16 (its parameters, or autocast around its forward: a Hugging Face
# Trainer run with bf16=True leaves the model's forward wrapped in one) rounds the two differently by far more:
# on the pre-trained all-MiniLM-L6-v2, 0.34-1.3e-2 of the logits' largest magnitude in bfloat16 (eps 7.8e-3) and
# 0.8-1.7e-3 in float16 (eps 9.8e-4), over Θ 0.5/0.7/0.9 and three class sets (docs/method.md §6). There the
# check allows _LOW_EPS eps of the logits' largest magnitude.
_TOL = dict(rtol=1e-3, atol=1e-4)
_LOW_EPS = 8
_LOW = (torch.bfloat16, torch.float16)


def _tp():
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - a declared runtime dependency
        raise ImportError("neuslice.restructure: physical mode needs torch-pruning "
                          "(pip install torch-pruning==1.6.1)") from e
    return tp


_REFUSED = {
    "LN": "normalises across channels (a zeroed channel still counts in its mean and variance)",
    "GN": "normalises across channels (a zeroed channel still counts in its group statistics)",
    "IN": "maps a zeroed channel to its bias, not to zero",
    "MHA": "mixes channels across attention heads",
    "EMBED": "is an embedding table added to the channels",
    "LSTM": "is a recurrent layer the dependency graph cannot cut safely",
    "PARAMETER": "is a bare nn.Parameter applied to the channels",
    "CUSTOMIZED": "is a custom module the dependency graph cannot cut",
}


def _refuse(fn: str, layer: str, what: str, reason: str) -> None:
    raise ValueError(f"{fn}: cannot remove the neurons of layer {layer!r} physically: they reach {what}, which "
                     f"{reason}. Exclude {layer!r} from the sliced layers (neuslice.profile(..., layers=...)) "
                     "or use mode='mask'")


def _build(fn: str, tp, module: nn.Module, example_inputs):
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(module, example_inputs=example_inputs, verbose=False)
    except Exception as e:
        raise ValueError(f"{fn}: Torch-Pruning could not build the model's dependency graph "
                         f"({type(e).__name__}: {e}); use mode='mask'") from None


def _check_group(fn, tp, group, root: str, removed: Dict[str, List[int]], names, own_norms) -> List[str]:
    """Raise if the group would make physical differ from mask mode; returns the sliced layers it cuts."""
    T = tp.ops.OPTYPE
    dg = group._DG
    cut = []
    layers_first = sorted(group, key=lambda item: item[0].target.type not in (T.CONV, T.LINEAR, T.DEPTHWISE_CONV))
    for dep, idxs in layers_first:
        node, mod = dep.target, dep.target.module
        kind = node.type.name
        name = names.get(mod, kind.lower())
        plain = sorted(int(i) for i in tp._helpers.to_plain_idxs(idxs))
        if kind in _REFUSED:
            _refuse(fn, root, f"{type(mod).__name__} {name!r}", _REFUSED[kind])
        if node.type == T.CONV and getattr(mod, "groups", 1) > 1:
            _refuse(fn, root, f"grouped convolution {name!r} ({mod.groups} groups)",
                    "needs every group to keep as many channels as the others, which a slice does not give")
        if node.type in (T.CONV, T.LINEAR, T.DEPTHWISE_CONV) and dg.is_out_channel_pruning_fn(dep.handler):
            if name not in removed:
                _refuse(fn, root, f"{type(mod).__name__} {name!r} (its output channels are coupled to them)",
                        "is not among the sliced layers, so mask mode would keep those channels")
            if plain != removed[name]:
                _refuse(fn, root, f"{name!r}, whose channels are coupled to them but whose slice differs",
                        "needs the same slice (profile the model so the coupling is recorded)")
            cut.append(name)
        if node.type == T.BN and name not in own_norms:
            _refuse(fn, root, f"BatchNorm {name!r} outside its layer's chain",
                    "maps a zeroed channel to a non-zero value")
    return cut


def _group(tp, dg, layer: nn.Module, idxs: List[int]):
    """Torch-Pruning's group of removing output channels ``idxs`` of the Linear/Conv ``layer``."""
    prune_fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
    return dg.get_pruning_group(layer, prune_fn, idxs=idxs)


def _prune_layers(fn, tp, dg, module, plan: Plan, keep: Dict[str, Tensor]) -> None:
    mods = dict(module.named_modules())
    names = {m: n for n, m in mods.items()}
    removed = {i.name: torch.nonzero(~keep[i.name].cpu()).flatten().tolist() for i in plan.layers}
    own_norms = {n for i in plan.layers for n in i.chain[1:]}
    done = set()
    for info in plan.layers:
        if info.name in done or not removed[info.name]:
            continue
        layer = mods[info.name]
        if layer not in dg.module2node:
            _refuse(fn, info.name, "no node of the traced graph", "the dependency graph cannot see")
        group = _group(tp, dg, layer, removed[info.name])
        done.update(_check_group(fn, tp, group, info.name, removed, names, own_norms))
        group.prune()


def refusals(fn: str, model: nn.Module, plan: Plan, names: Sequence[str], example_inputs) -> Dict[str, str]:
    """Of the layers ``names`` (a model without attention blocks: Torch-Pruning's path), those whose neurons
    physical restructure would refuse to remove, with why: each layer is tried as sliced together with the
    layers coupled to it (``Plan.coupled``: one slice for the group), the first neuron removed. What reaches a
    LayerNorm, a depthwise conv outside the group, ... is refused as in :func:`physical`."""
    tp = _tp()
    module = copy.deepcopy(model).eval()
    dg = _build(fn, tp, module, example_inputs)
    mods = dict(module.named_modules())
    by_name = {m: n for n, m in mods.items()}
    own_norms = {n for i in plan.layers for n in i.chain[1:]}
    out: Dict[str, str] = {}
    for name in names:
        layer = mods[name]
        if layer not in dg.module2node:
            out[name] = "no node of the traced graph: the dependency graph cannot see it"
            continue
        group_names = next((g for g in plan.coupled if name in g), [name])
        try:
            _check_group(fn, tp, _group(tp, dg, layer, [0]), name, {n: [0] for n in group_names}, by_name,
                         own_norms)
        except ValueError as e:
            out[name] = str(e)
    return out


def _cut_head(tp, dg, module, head_name: str, classes: Sequence[int]) -> None:
    head = dict(module.named_modules())[head_name]
    drop = [k for k in range(head.out_features) if k not in set(classes)]
    if drop:
        dg.get_pruning_group(head, tp.prune_linear_out_channels, idxs=drop).prune()
    # classes are sorted (Slices.class_indices), and the kept rows stay in order: output i is classes[i]


def physical(fn: str, model: nn.Module, plan: Plan, keep: Dict[str, Tensor], classes: Sequence[int],
             example_inputs, masked: nn.Module, attention: Sequence[Attention] = ()) -> nn.Module:
    """A pruned deep copy of ``model`` keeping the neurons ``keep`` (``{layer: bool [N]}``) and the head rows
    ``classes`` (sorted); checked against ``masked`` (the mask-mode model) on ``example_inputs``. With
    attention blocks recorded (a transformer), the cut follows the plan's couplings (:mod:`._surgery`);
    otherwise Torch-Pruning's dependency graph finds them."""
    shared = [i.name for i in plan.layers if i.calls > 1 and bool((~keep[i.name]).any())]
    if shared:
        raise ValueError(f"{fn}: cannot remove the neurons of layer {shared[0]!r} physically: it is called more "
                         "than once in forward (shared weights), and its calls' consumers are not cut as one. "
                         f"Exclude {shared[0]!r} from the sliced layers (neuslice.profile(..., layers=...)) or use "
                         "mode='mask', which zeroes every call")
    _surgery.check_residual(fn, plan, {i.name: ~keep[i.name].cpu() for i in plan.layers})
    with torch.no_grad():
        want, low = _with_precision(masked, lambda: call_model(masked, example_inputs))
    if attention:
        module, counts = _surgery.physical(fn, model, plan, keep, plan.heads[0], classes, attention, example_inputs)
        with torch.no_grad():
            _surgery.settle_counts(counts, lambda: _agrees(call_model(module.eval(), example_inputs), want, low))
    else:
        tp = _tp()
        module = copy.deepcopy(model).eval()
        dg = _build(fn, tp, module, example_inputs)
        _prune_layers(fn, tp, dg, module, plan, keep)
        _cut_head(tp, dg, module, plan.heads[0], classes)
    module.eval()
    with torch.no_grad():
        try:
            got = call_model(module, example_inputs)
        except Exception as e:  # noqa: BLE001  (reported as the disagreement it is, with torch's words)
            got, diff = None, f"its forward failed: {type(e).__name__}: {e}"
    if got is not None and _agrees(got, want, low):
        return module
    if got is not None:
        diff = f"output shape {list(got.shape)} against {list(want.shape)}"
        if got.shape == want.shape:
            d = (got.float() - want.float()).abs().max().item()
            diff = f"max difference {d}"
            if low is not None:
                scale = want.float().abs().max().item()
                diff += (f", {d / scale if scale else float('inf'):.2g} of the logits' largest magnitude, where "
                         f"{_LOW_EPS * torch.finfo(low).eps:.2g} is allowed for a model computing in {low}")
    raise ValueError(f"{fn}: the physically restructured model disagrees with mask mode on example_inputs "
                     f"({diff}); a layer's coupling is not what the dependency graph assumed. "
                     f"Exclude the layers feeding non-channelwise operations from the slices, or use mode='mask'")


def _with_precision(model: nn.Module, call):
    """``(call(), dtype)``: what ``call()`` returns, and the narrowest of bfloat16/float16 among the floating
    outputs of ``model``'s modules with parameters while it runs (None when none is that narrow): the precision
    the model computes in, whether from its parameters' dtype or from autocast."""
    seen = set()

    def hook(module, args, out):
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(t, Tensor) and t.dtype in _LOW:
            seen.add(t.dtype)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if any(True for _ in m.parameters(recurse=False))]
    try:
        out = call()
    finally:
        for h in handles:
            h.remove()
    return out, max(seen, key=lambda d: torch.finfo(d).eps) if seen else None


def _agrees(got, want, low=None) -> bool:
    """``got`` equals ``want`` up to rounding: float32's elementwise tolerance, or, for a model computing in
    ``low`` (bfloat16/float16), _LOW_EPS of its eps times the logits' largest magnitude."""
    if got.shape != want.shape:
        return False
    if low is None:
        return torch.allclose(got, want, **_TOL)
    g, w = got.float(), want.float()
    return bool((g - w).abs().max() <= _LOW_EPS * torch.finfo(low).eps * w.abs().max())
