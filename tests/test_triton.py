"""The `triton` backend against `reference`: forced through the dispatcher (NEUSLICE_BACKEND=triton).

Without a GPU, conftest.py sets TRITON_INTERPRET=1 before triton is imported and the kernels run on
CPU tensors in the interpreter (~1 ms per program instance and per-op numpy overhead: shapes are
small, and explicit small blocks are used only where a test is about tiles, tails and chunks).
With NEUSLICE_TEST_GPU=1 on a CUDA machine the same tests run the compiled kernels on the GPU.
float16 and float32 everywhere (the interpreter has no bfloat16; bf16 is covered by @gpu tests).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tolerances import ACCUMULATE, MASKED_UPDATE, assert_close

pytest.importorskip("triton")
from neuslice import BackendError, NonFiniteError, ops
from neuslice.ops import _dispatch, reference  # noqa: E402
from neuslice.ops._layout import as_bns  # noqa: E402
from neuslice._triton import accumulate as tacc, backend, masked_update as tupd, select as tsel  # noqa: E402

DEVICE = "cpu" if backend.INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="triton kernels need TRITON_INTERPRET=1 or a CUDA GPU")
DTYPES = [torch.float32, torch.float16]
GEN = torch.Generator().manual_seed(0)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(dtype).to(DEVICE)


def _stats(k, n, filled=False):
    if filled:   # non-zero start: the kernels must add, and a rejected batch must leave these bits
        return [torch.rand(k, generator=GEN).to(DEVICE)] + [_randn(k, n) for _ in range(4)]
    return [torch.zeros(k, device=DEVICE)] + [torch.zeros(k, n, device=DEVICE) for _ in range(4)]


def _inputs(b, n, s, layout, mode, dtype, k=4):
    cl = layout != "channels_first"
    shape = (b, s, n) if cl else (b, n, s)
    x = _randn(*shape, dtype=dtype)
    grad = _randn(*shape, dtype=dtype) if mode != "x only" else None
    ref = None
    if mode == "grad+ref[N,S]":
        ref = _randn(n, s, dtype=dtype)
    elif mode == "grad+ref[N]":
        ref = _randn(n, dtype=dtype)
    elif mode == "grad+ref[B,N,S]":   # per sample: x's shape and layout (per token, each token its own)
        ref = _randn(*shape, dtype=dtype)
    lshape = (b, s) if layout == "channels_last per-token" else (b,)
    labels = torch.randint(0, k, lshape, generator=GEN).to(DEVICE)
    return x, grad, ref, labels, cl


STATS = ("count", "act_sum", "act_sq", "taylor_sum", "deeplift_sum")


def _check_accumulate(x, grad, ref, labels, cl, k, force_backend, filled=True, valid=None, ignore_index=-100,
                      kept=STATS):
    """triton (forced, through the op) against reference on the same starting statistics; a statistic
    not in ``kept`` is passed as None to both."""
    n = x.shape[-1] if (cl or x.dim() == 2) else x.shape[1]
    want = [t if name in kept else None for t, name in zip(_stats(k, n, filled), STATS)]
    got = [None if t is None else t.clone() for t in want]
    reference.accumulate_(x, grad, ref, labels, cl, *want, valid, ignore_index)
    force_backend("triton")
    ops.accumulate_(x, grad, ref, labels, cl, *got, valid, ignore_index)
    for name, a, e in zip(STATS, got, want):
        if e is not None:
            assert_close(a, e, ACCUMULATE, x.dtype, msg=name)
    return got


IGNORE = -100


def _extras(b, n, s, layout, mode, dtype, valid_kind, ignore, k=4, ignore_index=IGNORE):
    """An accumulate_ case with a valid mask and ignored labels, poisoned where nothing may be read:
    x is NaN and grad inf at every position that does not count (invalid, or its sample / token
    ignored), and ref[N, S] is inf at every position no counted unit reads (a per-sample ref at every
    position that does not count)."""
    x, grad, ref, labels, cl = _inputs(b, n, s, layout, mode, dtype, k)
    per_token = labels.dim() == 2
    if valid_kind is None:
        valid = None
    elif valid_kind == "all true":
        valid = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    elif valid_kind == "all false":
        valid = torch.zeros(b, s, dtype=torch.bool, device=DEVICE)
    else:  # random, a non-contiguous view, one row with no valid position, one with a single one
        valid = (torch.rand(s, b, generator=GEN) < 0.6).to(DEVICE).t()
        valid[0] = False
        valid[-1] = False
        valid[-1, s // 2] = True
    if ignore:
        drop = (torch.rand(labels.shape, generator=GEN) < 0.3).to(DEVICE)
        drop.view(-1)[0] = True
        labels = torch.where(drop, torch.full_like(labels, ignore_index), labels)
    counted = torch.ones(b, s, dtype=torch.bool, device=DEVICE) if valid is None else valid.clone()
    counted &= (labels != ignore_index) if per_token else (labels != ignore_index)[:, None]
    xs = as_bns(x, cl).permute(0, 2, 1)                      # [B, S, N] views: poison by position
    xs[~counted] = float("nan")
    if grad is not None:
        as_bns(grad, cl).permute(0, 2, 1)[~counted] = float("inf")
    if ref is not None and ref.shape == x.shape:
        as_bns(ref, cl).permute(0, 2, 1)[~counted] = float("inf")
    elif ref is not None and ref.dim() == 2:
        ref[:, ~counted.any(0)] = float("inf")
    return x, grad, ref, labels, cl, valid, counted


# ---------------------------------------------------------------------------------------------
# accumulate_

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_first", "channels_last", "channels_last per-token"])
@pytest.mark.parametrize("mode", ["x only", "grad", "grad+ref[N,S]", "grad+ref[N]", "grad+ref[B,N,S]"])
@pytest.mark.parametrize("bns", [(1, 1, 1), (7, 97, 5), (3, 123, 7), (5, 7, 1)], ids=str)
def test_accumulate_matches_reference(force_backend, dtype, layout, mode, bns):
    x, grad, ref, labels, cl = _inputs(*bns, layout, mode, dtype)
    _check_accumulate(x, grad, ref, labels, cl, 4, force_backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_two_dim_x_and_absent_classes(force_backend, dtype):
    x, g = _randn(9, 33, dtype=dtype), _randn(9, 33, dtype=dtype)
    labels = torch.tensor([6, 0, 6, 2, 2, 6, 0, 0, 6], device=DEVICE)   # classes 1, 3, 4, 5 absent
    _check_accumulate(x, g, _randn(33, dtype=dtype), labels, False, 7, force_backend)


def test_accumulate_non_contiguous_inputs(force_backend):
    big = _randn(6, 40, 9)
    x = big[::2, ::3, 1:8]                                    # [3, 14, 7], every stride odd
    g = _randn(3, 7, 14).transpose(1, 2)                      # same shape, transposed storage
    ref = _randn(7, 14).t()
    labels = torch.randint(0, 3, (6,), generator=GEN).to(DEVICE)[::2]
    _check_accumulate(x, g, ref, labels, False, 3, force_backend)
    per_sample = _randn(3, 7, 14).transpose(1, 2)             # per sample [3, 14, 7], transposed storage
    _check_accumulate(x, g, per_sample, labels, False, 3, force_backend)
    xt = _randn(3, 14, 7).transpose(1, 2)                     # channels-last view of [B, N, S] storage
    tok = torch.randint(0, 3, (7, 3), generator=GEN).to(DEVICE).t()
    _check_accumulate(xt, xt.flip(0), None, tok, True, 3, force_backend)


_B16, _B32 = dict(BLOCK_N=16, BLOCK_S=4, BLOCK_T=4, CHUNK=8), dict(BLOCK_N=32, BLOCK_S=2, BLOCK_T=2, CHUNK=6)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("cfg,mode", [(_B16, "grad+ref[N,S]"), (_B32, "grad+ref[N,S]"), (_B16, "grad+ref[B,N,S]")],
                         ids=["b16", "b32", "b16-per-sample-ref"])
def test_accumulate_tiles_chunks_and_segments(per_token, cfg, mode):
    """Small blocks: neuron tails, position tails, segments that span tiles and chunks (a per-sample ref:
    each unit of a tile reads its own sample's)."""
    x, grad, ref, labels, cl = _inputs(13, 37, 9, "channels_last per-token" if per_token else "channels_last",
                                       mode, torch.float32, k=5)
    want = _stats(5, 37, True)
    got = [t.clone() for t in want]
    reference.accumulate_(x, grad, ref, labels, cl, *want)
    status = tacc.accumulate(x, grad, ref, labels, cl, *got, interpret=backend.INTERPRETED, config=cfg)
    assert int(status.item()) == 0
    for a, e in zip(got, want):
        assert_close(a, e, ACCUMULATE, torch.float32)


def test_accumulate_independent_of_class_order(force_backend):
    x, grad, ref, labels, cl = _inputs(12, 20, 6, "channels_first", "grad+ref[N]", torch.float32, k=3)
    perm = torch.randperm(12, generator=GEN).to(DEVICE)
    force_backend("triton")
    a, b = _stats(3, 20), _stats(3, 20)
    ops.accumulate_(x, grad, ref, labels, cl, *a)
    ops.accumulate_(x[perm], grad[perm], ref, labels[perm], cl, *b)
    for u, v in zip(a, b):
        assert_close(u, v, ACCUMULATE, torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # numpy, in the interpreter
@pytest.mark.parametrize("where", ["nan in x", "inf in x", "inf in grad", "nan in grad", "inf in ref",
                                   "nan in per-sample ref", "overflow of x mean squared"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last per-token"])
def test_accumulate_rejects_non_finite_and_changes_nothing(force_backend, where, layout):
    mode = "grad+ref[B,N,S]" if "per-sample" in where else "grad+ref[N,S]"
    x, grad, ref, labels, cl = _inputs(5, 19, 6, layout, mode, torch.float32)
    target = {"x": x, "grad": grad, "ref": ref}[where.split()[-1]] if "overflow" not in where else x
    value = {"nan": float("nan"), "inf": float("inf")}.get(where.split()[0], 3e30)
    target.view(-1)[target.numel() // 2] = value
    if "overflow" in where:
        x.fill_(3e30)
    stats = _stats(4, 19, filled=True)
    before = [t.clone() for t in stats]
    force_backend("triton")
    with pytest.raises(NonFiniteError, match="accumulate_.*no statistic was changed"):
        ops.accumulate_(x, grad, ref, labels, cl, *stats)
    for a, b in zip(stats, before):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# valid masks, ignore_index, statistics not kept (issue 13): poisoned inputs prove what is never read

LAYOUTS = ["channels_first", "channels_last", "channels_last per-token"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["x only", "grad+ref[N,S]", "grad+ref[N]", "grad+ref[B,N,S]"])
@pytest.mark.parametrize("valid_kind,ignore", [("random", True), ("random", False), ("all true", True),
                                               (None, True)], ids=["random+ignore", "random", "all-true+ignore",
                                                                   "no-mask+ignore"])
def test_accumulate_valid_and_ignore_index_match_reference(force_backend, layout, mode, valid_kind, ignore):
    x, grad, ref, labels, cl, valid, counted = _extras(7, 37, 5, layout, mode, torch.float32, valid_kind, ignore)
    got = _check_accumulate(x, grad, ref, labels, cl, 4, force_backend, valid=valid, ignore_index=IGNORE)
    assert all(torch.isfinite(t).all() for t in got)                     # the poison reached nothing


@pytest.mark.parametrize("layout", LAYOUTS)
def test_accumulate_valid_float16_and_other_ignore_index(force_backend, layout):
    """float16 inputs; ignore_index a class index (0): that class is never counted."""
    x, grad, ref, labels, cl, valid, _ = _extras(6, 21, 4, layout, "grad+ref[N,S]", torch.float16, "random",
                                                 True, k=3, ignore_index=0)
    got = _check_accumulate(x, grad, ref, labels, cl, 3, force_backend, filled=False, valid=valid, ignore_index=0)
    assert float(got[0][0]) == 0.0 and got[0].sum() > 0


def test_accumulate_two_dim_x_with_valid(force_backend):
    """x [B, N] (S = 1): valid [B, 1] drops whole samples."""
    x, g = _randn(9, 33), _randn(9, 33)
    valid = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool, device=DEVICE)[:, None]
    labels = torch.tensor([2, 0, 1, IGNORE, 2, 0, 0, 1, 1], device=DEVICE)
    x[~valid[:, 0]] = float("nan")
    x[3] = float("inf")
    _check_accumulate(x, g, _randn(33), labels, False, 3, force_backend, valid=valid)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_accumulate_valid_expanded_views(force_backend, layout):
    """Masks with stride 0 (expand()ed: one row for every sample, or one flag per sample) are read in place."""
    x, grad, ref, labels, cl = _inputs(5, 23, 6, layout, "grad+ref[N,S]", torch.float32)
    row = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool, device=DEVICE)
    col = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool, device=DEVICE)
    for valid in (row[None, :].expand(5, 6), col[:, None].expand(5, 6)):
        _check_accumulate(x, grad, ref, labels, cl, 4, force_backend, valid=valid)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last per-token"])
def test_accumulate_nothing_counted_changes_nothing(force_backend, layout):
    """Every position invalid, or every label ignored: no statistic moves, count included."""
    for valid_kind, ignore in (("all false", False), (None, True)):
        x, grad, ref, labels, cl, valid, _ = _extras(4, 9, 3, layout, "grad+ref[N,S]", torch.float32, valid_kind,
                                                     False)
        if ignore:
            labels = torch.full_like(labels, IGNORE)
            x.fill_(float("nan"))
        stats = _stats(4, 9, filled=True)
        before = [t.clone() for t in stats]
        force_backend("triton")
        ops.accumulate_(x, grad, ref, labels, cl, *stats, valid, IGNORE)
        for a, b in zip(stats, before):
            assert torch.equal(a, b)


KEPT = [(), ("act_sum",), ("act_sq",), ("taylor_sum",), ("deeplift_sum",), ("act_sum", "act_sq"),
        ("taylor_sum", "deeplift_sum"), ("act_sq", "taylor_sum", "deeplift_sum"),
        ("act_sum", "taylor_sum", "deeplift_sum"), ("act_sum", "act_sq", "deeplift_sum"),
        ("act_sum", "act_sq", "taylor_sum")]


@pytest.mark.parametrize("layout", ["channels_first", "channels_last per-token"])
@pytest.mark.parametrize("kept", KEPT, ids=lambda k: "+".join(k) or "count-only")
def test_accumulate_statistics_not_kept(force_backend, layout, kept):
    """Each of the four sums None (alone, in pairs, all but one, all): the others still match."""
    x, grad, ref, labels, cl, valid, _ = _extras(6, 19, 4, layout, "grad+ref[N,S]", torch.float32, "random", True, k=3)
    _check_accumulate(x, grad, ref, labels, cl, 3, force_backend, valid=valid, kept=("count",) + kept)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last per-token"])
@pytest.mark.parametrize("kept", [("taylor_sum",), ("deeplift_sum",)], ids=lambda k: k[0])
def test_accumulate_per_sample_ref_read_only_for_deeplift(force_backend, layout, kept):
    """A per-sample ref (poisoned where nothing counts) enters deeplift_sum only: with taylor kept alone a
    ref of NaN throughout is never read; with deeplift kept, each unit reads its own."""
    x, grad, ref, labels, cl, valid, _ = _extras(6, 19, 4, layout, "grad+ref[B,N,S]", torch.float32, "random", True,
                                                 k=3)
    if kept == ("taylor_sum",):
        ref.fill_(float("nan"))
    got = _check_accumulate(x, grad, ref, labels, cl, 3, force_backend, valid=valid, kept=("count",) + kept)
    assert all(torch.isfinite(t).all() for t in got if t is not None)


def test_accumulate_grad_statistics_without_grad_left_unchanged(force_backend):
    """taylor_sum / deeplift_sum given with grad None stay as they were; grad given with both None is fine."""
    x, _, _, labels, cl, valid, _ = _extras(5, 11, 3, "channels_first", "x only", torch.float32, "random", True, k=3)
    got = _check_accumulate(x, None, None, labels, cl, 3, force_backend, valid=valid,
                            kept=("count", "act_sq", "taylor_sum"))
    stats = _stats(3, 11, filled=True)
    before = stats[3].clone()
    force_backend("triton")
    ops.accumulate_(x, None, None, labels, cl, *stats, valid, IGNORE)
    assert torch.equal(stats[3], before)
    x, grad, ref, labels, cl, valid, _ = _extras(5, 11, 3, "channels_first", "grad+ref[N]", torch.float32,
                                                 "random", True, k=3)
    _check_accumulate(x, grad, ref, labels, cl, 3, force_backend, valid=valid, kept=("count", "act_sum", "act_sq"))
    assert got[0].sum() > 0


@pytest.mark.parametrize("per_token", [False, True])
def test_accumulate_valid_and_ignore_across_tiles_and_chunks(per_token):
    """Small blocks: skipped units sorted last, chunks that hold only skipped units, a chunk boundary
    inside the last counted segment, position tails under the mask."""
    layout = "channels_last per-token" if per_token else "channels_first"
    x, grad, ref, labels, cl, valid, _ = _extras(11, 20, 5, layout, "grad+ref[N,S]", torch.float32, "random", True,
                                                 k=3)
    want = _stats(3, 20, True)
    got = [t.clone() for t in want]
    reference.accumulate_(x, grad, ref, labels, cl, *want, valid, IGNORE)
    cfg = dict(BLOCK_N=16, BLOCK_S=2, BLOCK_T=2, CHUNK=4 if per_token else 2)
    status = tacc.accumulate(x, grad, ref, labels, cl, *got, valid, IGNORE, interpret=backend.INTERPRETED,
                             config=cfg)
    assert int(status.item()) == 0
    for name, a, e in zip(STATS, got, want):
        assert_close(a, e, ACCUMULATE, torch.float32, msg=name)


@pytest.mark.parametrize("where", ["nan in x", "inf in grad", "inf in ref", "inf in per-sample ref"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last per-token"])
@pytest.mark.parametrize("kept", [STATS, ("count",)], ids=["all", "count-only"])
def test_accumulate_non_finite_at_a_counted_position_rejected(force_backend, where, layout, kept):
    """Padding is poisoned throughout; one non-finite value at a counted position is still an error and
    changes nothing, wherever it is read: x always, grad and ref only for a kept gradient statistic (with
    count only they are never read, by the oracle or by triton)."""
    mode = "grad+ref[B,N,S]" if "per-sample" in where else "grad+ref[N,S]"
    counted = torch.zeros(1, dtype=torch.bool)
    while not counted.any():               # (the shared generator's state depends on the tests run before)
        x, grad, ref, labels, cl, valid, counted = _extras(6, 13, 4, layout, mode, torch.float32, "random", True, k=3)
    b, s = counted.nonzero()[len(counted.nonzero()) // 2].tolist()
    if where == "inf in ref":
        ref[3, s] = float("inf")
    elif where == "inf in per-sample ref":
        as_bns(ref, cl)[b, 3, s] = float("inf")
    else:
        target = x if where == "nan in x" else grad
        as_bns(target, cl)[b, 3, s] = float(where.split()[0])
    stats = [t if name in kept else None for t, name in zip(_stats(3, 13, filled=True), STATS)]
    before = [None if t is None else t.clone() for t in stats]
    if where != "nan in x" and kept == ("count",):                        # grad and ref are not read
        want = [None if t is None else t.clone() for t in stats]
        reference.accumulate_(x, grad, ref, labels, cl, *want, valid, IGNORE)
        force_backend("triton")
        ops.accumulate_(x, grad, ref, labels, cl, *stats, valid, IGNORE)
        # (count starts at fractions: the oracle adds its ones one by one, triton a class's total at once)
        assert_close(stats[0], want[0], ACCUMULATE, torch.float32, msg="count")
        assert not torch.equal(stats[0], before[0])
        return
    with pytest.raises(NonFiniteError, match="no statistic was changed"):   # the oracle agrees
        reference.accumulate_(x, grad, ref, labels, cl, *[None if t is None else t.clone() for t in stats],
                              valid, IGNORE)
    force_backend("triton")
    with pytest.raises(NonFiniteError, match="accumulate_.*no statistic was changed"):
        ops.accumulate_(x, grad, ref, labels, cl, *stats, valid, IGNORE)
    for a, b_ in zip(stats, before):
        assert a is None or torch.equal(a, b_)


# ---------------------------------------------------------------------------------------------
# select, select_topk

def _check_select(scores, value, force_backend, op):
    force_backend("triton")
    got = getattr(ops, op)(scores, value)
    want = getattr(reference, op)(scores, value)
    assert got.dtype == torch.bool and torch.equal(got, want), (op, value, scores)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 97, 123])
@pytest.mark.parametrize("op,value", [("select", 0.3), ("select", 0.9), ("select", 1.0),
                                      ("select_topk", 0.1), ("select_topk", 0.5), ("select_topk", 1.0)])
def test_select_matches_reference(force_backend, dtype, n, op, value):
    _check_select((torch.rand(3, n, generator=GEN) ** 3).to(dtype).to(DEVICE), value, force_backend, op)


@pytest.mark.parametrize("op", ["select", "select_topk"])
def test_select_ties_zero_rows_and_negative_zero(force_backend, op):
    scores = torch.randint(0, 4, (5, 50), generator=GEN).float()
    scores[0] = 0.0                       # Θ: selects nothing; top-k: the first k by index
    scores[1, 3] = -0.0
    scores[2] = 1.0                       # one big tie: lower index first
    for value in (0.1, 0.5, 0.9, 1.0):
        _check_select(scores.to(DEVICE), value, force_backend, op)


@pytest.mark.parametrize("n", [97, 123, 256])
@pytest.mark.parametrize("topk", [False, True])
def test_select_tiled_rows(n, topk):
    """Rows longer than the block: bisection streams tiles; ties carried across tiles."""
    scores = torch.randint(0, 6, (2, n), generator=GEN).float().to(DEVICE)
    for value in (0.25, 0.8):
        got = tsel.select(scores, value, topk=topk, interpret=backend.INTERPRETED, block=64)
        want = (reference.select_topk if topk else reference.select)(scores, value)
        assert torch.equal(got, want)


def test_select_rows_of_65537_neurons(force_backend):
    scores = torch.rand(2, 65537, generator=GEN).to(DEVICE)
    _check_select(scores, 0.9, force_backend, "select")
    _check_select(scores, 0.01, force_backend, "select_topk")


def test_select_non_contiguous(force_backend):
    scores = torch.rand(40, 6, generator=GEN).to(DEVICE).t()   # [6, 40], column-major
    _check_select(scores, 0.7, force_backend, "select")
    _check_select(scores[:, ::3], 0.4, force_backend, "select_topk")


# ---------------------------------------------------------------------------------------------
# masked_sgd_, masked_adamw_

def _masked_case(shape, per_neuron, dtype, optimizer, strided=False):
    p, grad = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype)
    if strided and len(shape) == 2:
        p = _randn(*shape[::-1], dtype=dtype).t()                # transposed parameter
        grad = _randn(shape[0], 2 * shape[1], dtype=dtype)[:, ::2]
    mshape = shape[:1] if per_neuron else shape
    mask = (torch.rand(mshape, generator=GEN) < 0.5).to(DEVICE)
    grad[~mask] = float("nan")            # a frozen entry's gradient must never leak into anything
    n_states = 1 if optimizer == "sgd" else 2
    states = [_randn(*shape, dtype=dtype).abs() for _ in range(n_states)]
    return p, grad, states, mask


def _run_masked(optimizer, p, grad, states, mask, momentum=0.9, weight_decay=0.01):
    if optimizer == "sgd":
        return ("masked_sgd_", (p, grad, states[0], mask, 0.1, momentum, weight_decay))
    return ("masked_adamw_", (p, grad, *states, mask, 1e-2, 0.9, 0.999, 1e-8, weight_decay, 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_neuron", [True, False], ids=["per-neuron", "per-weight"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("shape", [(1,), (7,), (97, 3), (123, 5, 3), (7, 1)], ids=str)
def test_masked_update_matches_reference(force_backend, dtype, per_neuron, optimizer, shape):
    """float16: the kernel rounds once from float32, so its oracle is the reference run on float32
    copies and rounded; the reference run in float16 rounds after every op (measured: 2.8% relative,
    1.6e-3 absolute on one element of [123, 5, 3] where p - lr*d cancels)."""
    p, grad, states, mask = _masked_case(shape, per_neuron, dtype, optimizer)
    frozen = [t.clone() for t in (p, *states)]
    op, args = _run_masked(optimizer, p.float(), grad.float(), [s.float() for s in states], mask)
    getattr(reference, op)(*args)
    want = [args[0]] + list(args[2:2 + len(states)])
    force_backend("triton")
    op, args = _run_masked(optimizer, p, grad, states, mask)
    getattr(ops, op)(*args)
    m = mask if mask.shape == p.shape else mask.view(-1, *[1] * (p.dim() - 1)).expand(p.shape)
    for got, exp, old in zip((p, *states), want, frozen):
        assert_close(got[m], exp.to(dtype)[m], MASKED_UPDATE, dtype)
        assert torch.equal(got[~m], old[~m])                     # frozen: bit-identical


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masked_update_strided_and_small_blocks(force_backend, optimizer):
    p, grad, states, mask = _masked_case((37, 21), False, torch.float32, optimizer, strided=True)
    want = [t.clone() for t in (p, *states)]
    op, args = _run_masked(optimizer, want[0], grad, want[1:], mask)
    getattr(reference, op)(*args)
    fn = tupd.masked_sgd if optimizer == "sgd" else tupd.masked_adamw
    _, args = _run_masked(optimizer, p, grad, states, mask)
    fn(*args, blocks=(4, 8))
    for got, exp in zip((p, *states), want):
        assert_close(got, exp, MASKED_UPDATE, torch.float32)


def test_masked_sgd_without_momentum_or_decay_leaves_buffer(force_backend):
    p, grad, states, mask = _masked_case((33, 4), True, torch.float32, "sgd")
    grad = torch.nan_to_num(grad)
    buf = states[0].clone()
    want = p.clone()
    reference.masked_sgd_(want, grad, buf.clone(), mask, 0.5, 0.0, 0.0)
    force_backend("triton")
    ops.masked_sgd_(p, grad, states[0], mask, 0.5, 0.0, 0.0)
    assert torch.equal(states[0], buf)
    assert_close(p, want, MASKED_UPDATE, torch.float32)


# ---------------------------------------------------------------------------------------------
# refusals, dispatch, compilation for the GPU

def test_refusals_name_the_reason(force_backend):
    x = _randn(2, 3, 4, dtype=torch.float64)
    stats = [t.double() for t in _stats(2, 3)]
    force_backend("triton")
    with pytest.raises(BackendError, match="triton: computes in float32"):
        ops.accumulate_(x, None, None, torch.zeros(2, dtype=torch.long, device=DEVICE), False, *stats)
    p = _randn(4, 3, 2).transpose(1, 2)                        # trailing dims do not collapse
    mask = torch.ones(4, dtype=torch.bool, device=DEVICE)
    assert "trailing dims" in backend.refuse("masked_sgd_", (p, p, p, mask, 0.1, 0.0, 0.0))
    if backend.INTERPRETED:
        assert "no bfloat16" in backend.refuse("select", (torch.rand(2, 3).bfloat16(), 0.5))


def test_not_chosen_for_cpu_tensors_unless_forced():
    scores = torch.rand(2, 5)
    assert _dispatch.choose("select", (scores, 0.5)) != "triton"


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu_without_one(arch):
    """Ahead-of-time compile of every kernel to a cubin (Triton's bundled ptxas; no GPU needed), so a
    construct the interpreter accepts but the compiler rejects fails here, not first on a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parent / "triton_aot.py"
    out = subprocess.run([sys.executable, str(script), str(arch)], env=env, capture_output=True, text=True,
                         timeout=240)
    if out.returncode != 0 and "ptxas" in out.stderr and "No such file" in out.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 9 kernels, 9 with every integer argument specialised to 1" in out.stdout


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.py --dry-run: every code path of the GPU check on the CPU with the interpreter."""
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.rstrip().splitlines()[-1].startswith("|")          # the table prints last
    (report,) = tmp_path.glob("gpu_check_*.json")
    rows = json.loads(report.read_text())["rows"]
    cli = [r for r in rows if r["impl"] == "cli"]                         # the user's path on the device
    assert [(r["case"], r["check"]) for r in cli] == [("cli demo --device cpu", "ok"),
                                                       ("cli predict --device cpu", "ok")]
    rows = [r for r in rows if r["impl"] != "cli"]
    cases = {r["case"] for r in rows}
    # 9 accumulate (5 with valid/ignore_index/None, one of them with a per-sample ref), 4 select, 4 optimizer
    assert len(cases) == 17
    assert {r["case"] for r in rows if r["impl"] == "triton" and r["check"] == "PASS" and r["ms"] > 0} == cases
    for r in rows:
        if r["impl"] == "cuda":                                           # CPU tensors: refused, with a reason
            assert r["check"] == "refused" and r["detail"]
        if r["impl"] in ("reference", "composite"):
            assert r["ms"] > 0 and r["gbs"] > 0 and r["x_composite"] > 0
    assert list(tmp_path.glob("gpu_check_*.md"))


def test_gpu_check_sum_rule():
    """The fallback for sums (docs/architecture.md, Tests): within 2x the composite's error vs float64 passes, worse fails."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parent.parent / "bench" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    case = gc._accumulate_case(torch, dict(b=4, n=9, s=5, cl=False), DEVICE, dry=True)
    got = [t.clone() for t in case["args"][5:]]
    reference.accumulate_(*case["args"][:5], *got)
    assert gc._sum_rule(torch, case, got, [1, 3], gc._tolerances())[0]
    got[3] += 1.0
    ok, why = gc._sum_rule(torch, case, got, [1, 3], gc._tolerances())
    assert not ok and "taylor_sum" in why


# ---------------------------------------------------------------------------------------------
# GPU only

@pytest.mark.gpu
def test_gpu_default_dispatch_is_triton_and_bf16_matches():
    x = torch.randn(4, 64, 33, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    labels = torch.randint(0, 3, (4, 64), device="cuda")
    stats = [torch.zeros(3, device="cuda")] + [torch.zeros(3, 33, device="cuda") for _ in range(4)]
    assert _dispatch.choose("accumulate_", (x, g, None, labels, True, *stats)) == "triton"
    want = [t.clone() for t in stats]
    reference.accumulate_(x, g, None, labels, True, *want)
    ops.accumulate_(x, g, None, labels, True, *stats)
    for a, e in zip(stats, want):
        assert_close(a, e, ACCUMULATE, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(force_backend):
    force_backend("triton")
    x = torch.randn(8, 16, 5, device="cuda")
    labels = torch.randint(0, 2, (8,), device="cuda")
    stats = [torch.zeros(2, device="cuda")] + [torch.zeros(2, 16, device="cuda") for _ in range(4)]
    scores = torch.rand(3, 50, device="cuda")
    p, grad, m, v = (torch.randn(6, 4, device="cuda") for _ in range(4))
    mask = torch.rand(6, device="cuda") < 0.5

    @torch.compile(fullgraph=True)
    def step(x, scores):
        ops.accumulate_(x, x, None, labels, False, *stats)
        ops.masked_adamw_(p, grad, m, v, mask, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
        ops.masked_sgd_(p, grad, m, mask, 1e-3, 0.9, 0.0)
        return ops.select(scores, 0.9), ops.select_topk(scores, 0.2)

    sel, top = step(x, scores)
    assert torch.equal(sel, reference.select(scores, 0.9))
    assert torch.equal(top, reference.select_topk(scores, 0.2))
    assert float(stats[0].sum()) == 8.0
