"""DeepLIFT's reference per sample for padded batches (docs/method.md §2, "Reference r").

A padded sample's reference input is the baseline with the sample's own ``attention_mask``, so its reference
activations (every tap, and every Rescale nonlinearity's input and output) are those of a reference sequence
padded exactly as the sample is. They depend on the sample through its mask row only, so they are kept per
distinct row (usually one per sequence length) in :class:`RowRefs`, a least-recently-used cache bounded by
bytes, and assembled into ``[B, ...]`` per batch, into buffers reused from batch to batch. A row not cached
costs one no-grad forward, shared by all such rows of a batch (the caller runs it).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["RowRefs", "RowEntry", "REF_CACHE_BYTES"]

REF_CACHE_BYTES = 256 << 20   # the cache's bound (docs/method.md §2); rows of the current batch are held apart


class RowEntry:
    """One mask row's reference activations, without the batch dimension: ``taps[i]`` layer i's joined view
    (``[N, S]``, channels-last ``[S, N]``, or ``[N]``: one sample of what accumulate_ reads), and ``dl[module
    id][call] = (input, output)`` of each nonlinearity call. Tensors shared between the two (a tap that is a
    nonlinearity's output) are stored once; ``nbytes`` counts each stored tensor once."""

    __slots__ = ("taps", "dl", "nbytes")

    def __init__(self, taps: List[Tensor], dl: Dict[int, List[Tuple[Tensor, Tensor]]], nbytes: int):
        self.taps, self.dl, self.nbytes = taps, dl, nbytes


def _split(taps: Sequence[Tensor], dl: Dict[int, List[Tuple[Tensor, Tensor]]], u: int) -> List[RowEntry]:
    """Per row of a reference batch of ``u`` rows: its own copy of every tensor (so evicting a row frees it)."""
    out = []
    for j in range(u):
        memo: Dict[tuple, Tensor] = {}
        size = [0]

        def cut(t: Tensor) -> Tensor:
            row = t[j]
            key = (row.data_ptr(), tuple(row.shape), row.stride(), row.dtype)
            c = memo.get(key)
            if c is None:
                c = memo[key] = row.clone(memory_format=torch.contiguous_format)
                size[0] += c.numel() * c.element_size()
            return c
        entry_taps = [cut(t) for t in taps]
        entry_dl = {k: [(cut(i), cut(o)) for i, o in calls] for k, calls in dl.items()}
        out.append(RowEntry(entry_taps, entry_dl, size[0]))
    return out


class RowRefs:
    """Reference activations per mask row, least recently used evicted first once they exceed ``max_bytes``
    (0 keeps none: every batch computes its rows). ``hits``, ``misses`` and ``evictions`` count rows."""

    def __init__(self, max_bytes: Optional[int] = None):
        self.max_bytes = REF_CACHE_BYTES if max_bytes is None else int(max_bytes)
        self._lru: "OrderedDict[Hashable, RowEntry]" = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._bufs: Dict[object, Tensor] = {}     # the assembled [B, ...] references, reused batch after batch

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, keys: Sequence[Hashable]) -> List[Optional[RowEntry]]:
        """The cached entry of each key (None: not cached); hits become the most recently used."""
        out = []
        for key in keys:
            e = self._lru.get(key)
            if e is not None:
                self._lru.move_to_end(key)
            out.append(e)
        n = sum(e is not None for e in out)
        self.hits += n
        self.misses += len(out) - n
        return out

    def split(self, taps: Sequence[Tensor], dl: Dict[int, List[Tuple[Tensor, Tensor]]], u: int) -> List[RowEntry]:
        """Entries of a reference batch of ``u`` rows: ``taps[i]`` ``[u, ...]`` per layer (accumulate_'s view),
        ``dl`` as :meth:`Rescale.recorded` gives it."""
        return _split(taps, dl, u)

    def insert(self, key: Hashable, entry: RowEntry) -> None:
        """Keep ``entry``, evicting the least recently used until the cache fits ``max_bytes`` (an entry larger
        than the bound alone is not kept)."""
        if key in self._lru:
            self.bytes -= self._lru.pop(key).nbytes
        if entry.nbytes > self.max_bytes:
            return
        while self._lru and self.bytes + entry.nbytes > self.max_bytes:
            _, old = self._lru.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1
        self._lru[key] = entry
        self.bytes += entry.nbytes

    def _stack(self, slot, rows: List[Tensor], memo: Dict[tuple, Tensor]) -> Tensor:
        """``rows`` stacked into ``[B, ...]``: into the buffer of ``slot`` (reused while its shape holds); rows
        stacked already in this batch (the same tensors: a tap that is a nonlinearity's output) are not copied
        again."""
        key = tuple(id(r) for r in rows)
        out = memo.get(key)
        if out is not None:
            return out
        first = rows[0]
        shape = (len(rows), *first.shape)
        buf = self._bufs.get(slot)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != first.dtype or buf.device != first.device:
            buf = self._bufs[slot] = torch.empty(shape, dtype=first.dtype, device=first.device)
        torch.stack(rows, out=buf)
        memo[key] = buf
        return buf

    def assemble(self, per_sample: Sequence[RowEntry]) -> Tuple[List[Tensor], Dict[int, List[Tuple[Tensor, Tensor]]]]:
        """The batch's references from each sample's entry: per layer accumulate_'s per-sample ``ref`` (x's shape
        and layout), and Rescale's references ``[B, ...]``. When every sample has the same row, nothing is
        copied: the taps' references are that row expanded to B, Rescale's are ``[1, ...]`` (broadcast)."""
        b, first = len(per_sample), per_sample[0]
        if all(e is first for e in per_sample):
            taps = [t.unsqueeze(0).expand(b, *t.shape) for t in first.taps]
            dl = {k: [(i.unsqueeze(0), o.unsqueeze(0)) for i, o in calls] for k, calls in first.dl.items()}
            return taps, dl
        for e in per_sample:
            if len(e.taps) != len(first.taps) or {k: len(c) for k, c in e.dl.items()} != \
                    {k: len(c) for k, c in first.dl.items()}:
                raise RuntimeError("DeepLIFT: the reference forwards of two mask rows called the layers or "
                                   "nonlinearities a different number of times; per-sample references need the same "
                                   "calls for every row (docs/method.md §2)")
        memo: Dict[tuple, Tensor] = {}
        taps = [self._stack(("tap", i), [e.taps[i] for e in per_sample], memo) for i in range(len(first.taps))]
        dl = {k: [(self._stack(("in", k, c), [e.dl[k][c][0] for e in per_sample], memo),
                   self._stack(("out", k, c), [e.dl[k][c][1] for e in per_sample], memo))
                  for c in range(len(calls))]
              for k, calls in first.dl.items()}
        return taps, dl

    def clear(self) -> None:
        self._lru.clear()
        self._bufs.clear()
        self.bytes = 0
