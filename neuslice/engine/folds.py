"""Batch folds (docs/method.md §1 "Batch folds", "Layers that run on no sample"): a layer whose output holds several
rows per sample in its batch dim (Swin's windows, MobileViT's unfolded patches: ``[B * f, T, N]``), read from one
probe forward (:mod:`.dataflow`'s :class:`~neuslice.engine.dataflow.Flow`) by replaying the layout operations
around the layer on index tensors; and the layers that run on no sample at all.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from .dataflow import Flow, Node, _R, _ref, refs_of

__all__ = ["Fold", "batch_fold", "batch_size", "batchless", "layer_fold"]

# Layout operations: each output element is one input element (or a constant padding), so replaying them on
# a tensor of indices shows where every element came from.
_LAYOUT = {"view", "reshape", "permute", "transpose", "contiguous", "roll", "pad", "flatten", "unflatten", "getitem",
           "clone", "squeeze", "unsqueeze", "movedim", "swapaxes", "narrow", "t"}


def batch_size(flow: Flow) -> Optional[int]:
    """The probe batch's size: the leading dim of the model's first output tensor (None if unknown)."""
    out = flow.output
    while True:
        if isinstance(out, _R):
            shape = flow.nodes[out[0]].shapes[out[1]]
            return shape[0] if shape else None
        if isinstance(out, dict) and out:
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)) and out:
            out = out[0]
        else:
            return None


def _layout_step(node: Node, cur: _R) -> bool:
    """Whether ``node`` moves the elements of ``cur`` (its first argument, its only tensor) and nothing else."""
    if node.kind == "module":
        return "pass" in node.tags and refs_of(node.args[:1]) == [cur]
    return (node.kind == "call" and node.target in _LAYOUT and callable(node.func)
            and refs_of((node.args, tuple(node.kwargs.values()))) == [cur] and refs_of(node.args[:1]) == [cur])


# Operations batched over dim 0 (each dim-0 slice of the output computed from the same slice of the first input
# alone): per-position modules (LayerNorm-like, Linear, elementwise ones), arithmetic with a row-aligned operand,
# softmax, attention. Between a fold and its source they keep which sample each row of dim 0 holds, not positions.
_BATCHED_CALLS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "softmax", "matmul", "bmm",
                  "scaled_dot_product_attention", "dropout", "gelu", "relu", "silu", "tanh", "sigmoid"}


class _Mixed(Exception):
    """A replay found a row of dim 0 holding several samples (or padding) where a batched step needs one."""


def _batched_step(node: Node, cur: _R, in_shape) -> bool:
    """Whether ``node`` (reading ``cur`` as its first argument) is batched over dim 0 (``_BATCHED_CALLS``, or a
    per-position module) and keeps that dim's size."""
    out = node.shapes[0] if node.shapes else None
    if not out or not in_shape or out[0] != in_shape[0] or refs_of(node.args[:1]) != [cur]:
        return False
    if node.kind == "module":
        return bool(node.tags & {"pass", "elementwise", "mixes"}) or node.cls == "Linear"
    return node.kind == "call" and node.target in _BATCHED_CALLS


def _replay(chain: List[Node], x: torch.Tensor,
            rows_of: Optional[Callable[[_R, tuple], Union[None, bool, torch.Tensor]]] = None) -> torch.Tensor:
    """``chain``'s operations (each reading the previous one's output) applied to ``x`` instead. A batched step
    (``_batched_step``) maps each dim-0 row of ``x`` that holds one sample number to a row of its output shape
    holding that number (:class:`_Mixed` where a row holds several, or padding). Its other operands with that
    many rows (``q @ k^T``'s k, ``attn @ v``'s v, a second folded tensor added) must hold the same sample in each
    row where ``rows_of`` can read theirs (the sample number of each row): a row that differs is :class:`_Mixed`
    too. An operand it cannot read is let through, as one that made of no sample is (Swin's shifted-window mask,
    a ``repeat`` of the window grid's)."""
    def sub(a):
        if isinstance(a, _R):
            return x_
        if isinstance(a, tuple) and not isinstance(a, torch.Size):
            return tuple(sub(v) for v in a)
        if isinstance(a, dict):
            return {k: sub(v) for k, v in a.items()}
        return a
    for node in chain:
        if node.kind == "module" and "pass" in node.tags and node.shapes and tuple(node.shapes[0]) == tuple(x.shape):
            continue
        if node.kind == "module" or node.target not in _LAYOUT:
            out = tuple(node.shapes[0])
            rows = x.reshape(x.shape[0], -1)
            if rows.shape[0] != out[0]:
                raise _Mixed("samples")
            if bool((rows == 0).any()):                 # padding: its positions cannot be followed through here
                raise _Mixed("padding")
            if not bool((rows == rows[:, :1]).all()):
                raise _Mixed("samples")
            for other in refs_of((node.args[1:], tuple(node.kwargs.values()))):
                if rows_of is None:
                    continue
                theirs = rows_of(other, out)
                if theirs is None or theirs is False:   # unread (a mask built from the window grid), or broadcast
                    continue
                if theirs.shape[0] != rows.shape[0] or not torch.equal(theirs, rows[:, 0]):
                    raise _Mixed("samples")
            x = rows[:, :1].expand(out[0], max(1, int(torch.Size(out[1:]).numel()))).reshape(out).contiguous()
            continue
        x_ = x
        x = node.func(*sub(node.args), **sub(node.kwargs))
    return x


def _chain_back(flow: Flow, ref: _R, b: int) -> Optional[List[Node]]:
    """The layout operations that made ``ref`` from a tensor with leading dim ``b``: the longest such chain (so
    a padding on the way is in it), that tensor's node first, as the chain's source; or None."""
    back: List[Tuple[Node, _R]] = []                 # (node, the ref it produced), from ref backwards
    while len(back) <= 256:
        node = flow.nodes[ref[0]]
        back.append((node, ref))
        if not node.args or not isinstance(node.args[0], _R):
            break
        prev = node.args[0]
        pnode = flow.nodes[prev[0]]
        in_shape = pnode.shapes[prev[1]] if pnode.shapes else None
        if not (_layout_step(node, prev) or _batched_step(node, prev, in_shape)):
            break
        ref = prev
    for k in range(len(back) - 1, 0, -1):           # the earliest [b, ...] tensor the chain starts from
        node, r = back[k]
        shape = node.shapes[r[1]]
        if shape and shape[0] == b and r[1] == 0:
            return [node] + [n for n, _ in back[:k]][::-1]
    return None


def _sample_ids(shape, b: int) -> torch.Tensor:
    """A tensor of ``shape`` (leading dim ``b``) holding in every element its sample's number, 1 … b."""
    return torch.arange(1, b + 1, dtype=torch.int32).view(b, *([1] * (len(shape) - 1))).expand(shape).contiguous()


def _operand_rows(flow: Flow, b: int, depth: int = 0) -> Callable[[_R, tuple], Union[None, bool, torch.Tensor]]:
    """For :func:`_replay`: the sample number each dim-0 row of a batched step's other operand holds (from the
    layout and batched operations that made it from a ``[b, …]`` tensor, replayed on sample numbers), False for
    an operand broadcast over dim 0 of the step's output ``out`` (fewer dims, or one row), or None where the
    probe cannot tell (no such chain, or a row that mixes samples or padding)."""
    def rows_of(ref: _R, out: tuple) -> Union[None, bool, torch.Tensor]:
        node = flow.nodes[ref[0]]
        shape = node.shapes[ref[1]] if node.shapes and ref[1] < len(node.shapes) else None
        if shape is None:
            return None
        if len(shape) < len(out) or shape[0] == 1:
            return False
        chain = _chain_back(flow, ref, b) if depth < 8 else None
        if chain is None:
            return None
        try:
            got = _replay(chain[1:], _sample_ids(chain[0].shapes[0], b), _operand_rows(flow, b, depth + 1))
        except Exception:                                   # noqa: BLE001  (_Mixed, or no evidence)
            return None
        rows = got.reshape(got.shape[0], -1)
        if not bool((rows != 0).all()) or not bool((rows == rows[:, :1]).all()):
            return None
        return rows[:, 0]
    return rows_of


def _chain_forward(flow: Flow, users, ref: _R, b: int) -> Optional[List[Node]]:
    """The layout operations that carry ``ref`` on, each its only user, to a tensor with leading dim ``b``: the
    longest such chain (so a crop on the way is in it), or None."""
    chain: List[Node] = []
    end = 0
    while len(chain) <= 64:
        nxt = users.get(ref, ())
        if len(nxt) != 1 or not _layout_step(flow.nodes[nxt[0]], ref):
            break
        chain.append(flow.nodes[nxt[0]])
        ref = _ref(nxt[0], 0)
        shape = flow.nodes[nxt[0]].shapes[0]
        if shape and shape[0] == b:
            end = len(chain)
    return chain[:end] or None


class Fold(NamedTuple):
    """:func:`batch_fold`'s finding for one layer call."""
    f: int                              # rows per sample in the batch dim (1: not folded)
    valid: Optional[torch.Tensor]       # bool [f * T]: a sample's own positions (False: padding); None when all are
    error: Optional[str]                # why the output cannot be read as a sample-major fold, or None
    ordered: bool                       # the probe showed the order (two samples or more)


def batch_fold(flow: Flow, users, i: int, b: int) -> Fold:
    """Whether the layer call ``flow.nodes[i]`` (a Linear whose output is ``[b * f, T, N]`` in a probe of ``b``
    samples) runs on ``f`` pieces of each sample folded into the batch dim, sample-major (Swin's windows: rows
    ``s*f … s*f + f - 1`` are sample ``s``'s), as a :class:`Fold`: ``valid`` holds the positions of a sample that
    are its own input (False: padding the windows added, the same for every sample); with one sample in the probe
    every row is that sample's whatever the order, so ``ordered`` is False (docs/method.md §1).

    Evidence, with no extra forward: replay the layout operations (view, permute, roll, pad, crop, …) that made
    the layer's input from a ``[b, …]`` tensor on sample numbers instead, and read whose elements each row
    holds (0: padding); or, where the input is not such a chain (an attention output projection), replay those
    that carry the output on into a ``[b, …]`` tensor on position numbers, and read which sample each position
    lands in (and which are cropped away: padding)."""
    node = flow.nodes[i]
    shape = node.shapes[0] if node.shapes else None
    if not shape or len(shape) != 3 or b < 1 or shape[0] == b or shape[0] % b:
        return Fold(1, None, None, True)
    f, t = shape[0] // b, shape[1]
    mixed = Fold(f, None, "the probe shows its rows mix samples", True)
    padded_through = False
    src = node.args[0] if node.args and isinstance(node.args[0], _R) else None
    chain = None if src is None else _chain_back(flow, src, b)
    if chain is not None:
        try:
            got = _replay(chain[1:], _sample_ids(chain[0].shapes[0], b), _operand_rows(flow, b))
        except _Mixed as e:
            if str(e) != "padding":
                return mixed
            got, padded_through = None, True                 # positions lost in a batched step: read them forward
        except Exception:                                   # noqa: BLE001  (no evidence)
            got = None
        if got is not None and got.dim() == 3 and tuple(got.shape[:2]) == (shape[0], t):
            pos = got.reshape(b, f * t, -1)
            own = torch.arange(1, b + 1, dtype=torch.int32)[:, None, None]
            if not bool(((pos == own) | (pos == 0)).all()):
                return mixed
            valid = (pos != 0).all(-1)                      # [b, f * t]
            if bool((pos != 0).any(-1).ne(valid).any()) or bool((valid != valid[:1]).any()):
                return mixed
            return Fold(f, None if bool(valid.all()) else valid[0].clone(), None, b > 1)
    chain = _chain_forward(flow, users, _ref(i, 0), b)
    if chain is not None:
        dt = torch.int32 if b * f * t < 2 ** 31 else torch.int64
        ids = torch.arange(1, b * f * t + 1, dtype=dt).view(b * f, t, 1).expand(shape).contiguous()
        try:
            got = _replay(chain, ids)
        except Exception:                                   # noqa: BLE001
            got = None
        if got is not None and got.shape[0] == b:
            valid = None
            for smp in range(b):
                mine = got[smp].reshape(-1).to(torch.int64) - 1 - smp * f * t     # positions of sample smp
                if not bool(((mine >= 0) & (mine < f * t)).all()):
                    return mixed
                here = torch.zeros(f * t, dtype=torch.bool)
                here[mine] = True
                if valid is not None and not torch.equal(here, valid):
                    return mixed
                valid = here
            return Fold(f, None if bool(valid.all()) else valid, None, b > 1)
    if padded_through:
        return Fold(f, None, "its windows pad the sample, and the positions that are padding cannot be read through "
                             "the attention before it", True)
    return Fold(f, None, f"its output {list(shape)} holds {f} rows per sample of the probe, in an order the probe "
                         "could not read from layout operations (view, permute, roll, pad, …) to or from a "
                         "[B, …] tensor", True)


def batchless(fn: str, flow: Flow, candidates: Dict[str, nn.Module], layers=None) -> List[str]:
    """The layers whose every call in the probe gave an output without the batch: a leading dim that is not a
    multiple of the probe's batch size (which must be 2 or more to tell; docs/method.md §1). Naming one in
    ``layers`` is an error."""
    b = batch_size(flow)
    if b is None or b < 2:
        return []
    seen: Dict[str, bool] = {}
    for node in flow.nodes:
        if node.kind == "module" and node.target in candidates and node.shapes and node.shapes[0]:
            lead = node.shapes[0][0]
            seen[node.target] = seen.get(node.target, True) and lead % b != 0
    out = [n for n in candidates if seen.get(n)]
    named = [s for s in (layers if isinstance(layers, (list, tuple)) else [layers]) if isinstance(s, str) and s in out]
    if named:
        raise ValueError(f"{fn}: layer(s) {named} run on no sample: their outputs have no batch dim (a position-bias "
                         "MLP over a table of coordinates), so their neurons say nothing about classes; choose "
                         "layers= without them")
    return out


def layer_fold(flow: Flow, users, calls: List[int], batch: Optional[int]) -> Fold:
    """The batch fold of a layer's output (:func:`batch_fold`), the same for every call."""
    if batch is None or not calls:
        return Fold(1, None, None, True)
    got = [batch_fold(flow, users, i, batch) for i in calls]
    first = got[0]
    for g in got[1:]:
        if g.f != first.f or g.error != first.error or (g.valid is None) != (first.valid is None) or \
                (g.valid is not None and not torch.equal(g.valid, first.valid)):
            return Fold(max(x.f for x in got), None, "its calls fold the batch differently", True)
    return first._replace(ordered=all(g.ordered for g in got))
