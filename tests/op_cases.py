"""Shared inputs for the op tests: odd shapes, both layouts, per-token labels, non-contiguous views."""
from __future__ import annotations

import itertools

import torch

K = 5
# (B, N, S): 1, 7, 97, 123 and non-multiples of every block size the kernels use.
SHAPES = [(1, 1, 1), (7, 5, 3), (3, 97, 1), (6, 123, 7), (9, 33, 13), (40, 17, 1)]


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


def new_stats(n, dtype=torch.float32, k=K):
    return [torch.zeros(k, dtype=dtype)] + [torch.zeros(k, n, dtype=dtype) for _ in range(4)]


def acc_cases():
    """(shape, channels_last, per_token, with_grad, with_ref) combinations."""
    for shape, cl, grad, ref in itertools.product(SHAPES, (False, True), (False, True), (False, True)):
        if ref and not grad:
            continue
        yield shape, cl, False, grad, ref
        if cl:
            yield shape, cl, True, grad, ref


def acc_id(case):
    shape, cl, pt, grad, ref = case
    return f"{'x'.join(map(str, shape))}-{'cl' if cl else 'cf'}{'-tok' if pt else ''}{'-g' if grad else ''}{'-r' if ref else ''}"
