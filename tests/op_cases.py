"""Shared inputs for the op tests: odd shapes, both layouts, per-token labels, non-contiguous views,
the accumulate_ arguments added by issue 13 (valid positions, ignore_index labels, statistics not
kept, a reference per sample), and the float64 hand loop of docs/method.md §2 that every
accumulate_ result is held to."""
from __future__ import annotations

import itertools
from typing import Optional

import torch

K = 5
IGNORE = -100
# (B, N, S): 1, 7, 97, 123 and non-multiples of every block size the kernels use.
SHAPES = [(1, 1, 1), (7, 5, 3), (3, 97, 1), (6, 123, 7), (9, 33, 13), (40, 17, 1)]
# The accumulate_ variants every backend's parametrised tests run: the plain call, a valid mask
# with ignored labels (padding holds NaN, which must never be read), and statistics left out.
EXTRAS = ("", "masked", "kept")
# Which of (count, act_sum, act_sq, taylor_sum, deeplift_sum) the "kept" variant keeps.
KEPT = (True, True, False, True, False)
# The reference of the cases with a gradient: none (zero), one shared by the batch ([N, S]), or one
# per sample (x's shape and layout; per token, each token its own).
REFS = (None, "shared", "sample")


def make_x(shape, channels_last, dtype, contiguous=True, seed=0):
    """x (and a second tensor like it) in logical [B, N, S] or [B, S, N]; optionally a strided view."""
    b, n, s = shape
    gen = torch.Generator().manual_seed(seed)
    phys = (b, s, n) if channels_last else (b, n, s)
    if contiguous:
        return torch.randn(phys, generator=gen).to(dtype)
    # A view with a non-unit inner stride: every other element of a wider tensor.
    wide = torch.randn(phys[0], phys[1], 2 * phys[2], generator=gen).to(dtype)
    return wide[..., ::2]


def make_labels(b, s, per_token, seed=1, contiguous=True):
    gen = torch.Generator().manual_seed(seed)
    shape = (b, s) if per_token else (b,)
    if contiguous:
        return torch.randint(0, K, shape, generator=gen)
    return torch.randint(0, K, (shape[0] * 2, *shape[1:]), generator=gen)[::2]


def make_valid(b, s, per_token, seed=2, contiguous=True):
    """bool [B, S]: about 60% valid, holes and runs; with per-sample labels and B > 1, sample 1 has
    no valid position (it must not be counted). Optionally a strided view."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(b, 2 * s, generator=gen) < 0.6
    v = v[:, ::2] if not contiguous else v[:, :s].contiguous()
    if b > 1 and not per_token:
        v[1] = False
    return v


def ignore_some(labels, seed=3, frac=0.25):
    """``labels`` with about ``frac`` of them set to IGNORE (a new tensor, same strides kind)."""
    gen = torch.Generator().manual_seed(seed)
    out = labels.clone()
    out[torch.rand(labels.shape, generator=gen) < frac] = IGNORE
    return out


def poison_padding(t, valid, channels_last):
    """NaN into every position of ``t`` (an activation) where ``valid`` is False, in place."""
    if t is None or valid is None:
        return
    v = t.unsqueeze(-1) if t.dim() == 2 else (t.transpose(1, 2) if channels_last else t)
    v.masked_fill_(~valid[:, None, :], float("nan"))


def new_stats(n, dtype=torch.float32, k=K):
    return [torch.zeros(k, dtype=dtype)] + [torch.zeros(k, n, dtype=dtype) for _ in range(4)]


def make_ref(kind, shape, channels_last, dtype, seed=11, contiguous=True):
    """accumulate_'s ref of ``kind`` (REFS) for x of logical ``shape`` (B, N, S) in the given layout:
    None, shared ``[N, S]``, or per sample (x's physical shape; optionally a strided view)."""
    if kind is None:
        return None
    b, n, s = shape
    gen = torch.Generator().manual_seed(seed)
    if kind == "shared":
        return torch.randn(n, s, generator=gen).to(dtype)
    if kind != "sample":
        raise ValueError(f"make_ref: kind must be one of {REFS}, got {kind!r}")
    return make_x(shape, channels_last, dtype, contiguous=contiguous, seed=seed)


def kept_stats(stats, extra):
    """``stats`` with the ones the variant leaves out set to None."""
    return [t if (extra != "kept" or keep) else None for t, keep in zip(stats, KEPT)]


def extra_args(x, g, labels, channels_last, extra, seed=2, r=None):
    """(labels, valid) for the variant ``extra``; for "masked" also poisons the padding of x, g and of
    a per-sample reference ``r`` (one of x's shape; a shared one is left alone)."""
    if extra != "masked":
        return labels, None
    b = x.shape[0]
    s = 1 if x.dim() == 2 else x.shape[1 if channels_last else 2]
    valid = make_valid(b, s, labels.dim() == 2, seed=seed)
    poison_padding(x, valid, channels_last)
    poison_padding(g, valid, channels_last)
    if r is not None and tuple(r.shape) == tuple(x.shape):
        poison_padding(r, valid, channels_last)
    return ignore_some(labels, seed=seed + 1), valid


def acc_cases():
    """(shape, channels_last, per_token, with_grad, ref kind (REFS), extra) combinations."""
    for shape, cl, grad, ref, extra in itertools.product(SHAPES, (False, True), (False, True), REFS, EXTRAS):
        if ref and not grad:
            continue
        yield shape, cl, False, grad, ref, extra
        if cl:
            yield shape, cl, True, grad, ref, extra


def acc_id(case):
    shape, cl, pt, grad, ref, extra = case
    return (f"{'x'.join(map(str, shape))}-{'cl' if cl else 'cf'}{'-tok' if pt else ''}{'-g' if grad else ''}"
            f"{'-r' if ref == 'shared' else '-rb' if ref else ''}{'-' + extra if extra else ''}")


def loop_stats(x, g, r, labels, channels_last, k, valid: Optional[torch.Tensor] = None, ignore_index: int = IGNORE):
    """docs/method.md §2 by explicit loops over samples, positions and neurons, in float64.

    Per-sample labels: sample b (label != ignore_index) counts over its valid positions V_b and is
    skipped when V_b is empty. Per-token labels: each token (b, s) with a label != ignore_index and
    valid[b, s] is a sample of one position. Invalid positions are never read. ``r``: None (zero),
    shared ``[N, S]`` / ``[N]``, or per sample with x's shape (r[b, n, s])."""
    xb = (x.transpose(1, 2) if channels_last else x).double() if x.dim() == 3 else x.double().unsqueeze(-1)
    gb = None if g is None else ((g.transpose(1, 2) if channels_last else g).double() if g.dim() == 3
                                 else g.double().unsqueeze(-1))
    b, n, s = xb.shape
    if r is None:
        rr = torch.zeros(b, n, s, dtype=torch.float64)
    elif tuple(r.shape) == tuple(x.shape):             # per sample, in x's layout
        rr = (r.transpose(1, 2) if channels_last else r).double() if r.dim() == 3 else r.double().unsqueeze(-1)
    else:
        rr = (r.double().unsqueeze(-1).expand(n, s) if r.dim() == 1 else r.double()).expand(b, n, s)
    ok = (lambda i, p: True) if valid is None else (lambda i, p: bool(valid[i, p]))
    out = [torch.zeros(k, dtype=torch.float64)] + [torch.zeros(k, n, dtype=torch.float64) for _ in range(4)]
    if labels.dim() == 1:
        samples = [(i, int(labels[i]), [p for p in range(s) if ok(i, p)]) for i in range(b)]
    else:
        samples = [(i, int(labels[i, p]), [p] if ok(i, p) else []) for i in range(b) for p in range(s)]
    for i, c, positions in samples:
        if c == ignore_index or not positions:
            continue
        out[0][c] += 1
        for j in range(n):
            m = sum(float(xb[i, j, p]) for p in positions) / len(positions)
            out[1][c, j] += m
            out[2][c, j] += m * m
            if gb is not None:
                out[3][c, j] += abs(sum(float(xb[i, j, p] * gb[i, j, p]) for p in positions))
                out[4][c, j] += abs(sum(float((xb[i, j, p] - rr[i, j, p]) * gb[i, j, p]) for p in positions))
    return out
