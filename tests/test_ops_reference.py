"""The reference backend against float64 loops and hand-computed cases (it is the oracle)."""
from __future__ import annotations

import math

import pytest
import torch

from neuslice.ops import reference
from op_cases import K, acc_cases, acc_id, extra_args, kept_stats, loop_stats, make_labels, make_ref, make_x, new_stats


@pytest.mark.parametrize("case", [c for c in acc_cases() if c[0][0] * c[0][1] * c[0][2] <= 400], ids=acc_id)
def test_reference_accumulate_matches_float64_loops(case):
    (b, n, s), cl, pt, with_g, ref, extra = case
    x = make_x((b, n, s), cl, torch.float64)
    g = make_x((b, n, s), cl, torch.float64, seed=3) if with_g else None
    r = make_ref(ref, (b, n, s), cl, torch.float64)
    labels, valid = extra_args(x, g, make_labels(b, s, pt), cl, extra, r=r)
    stats = kept_stats(new_stats(n, torch.float64), extra)
    reference.accumulate_(x, g, r, labels, cl, *stats, valid, -100)
    want = loop_stats(x, g, r, labels, cl, K, valid, -100)
    for got, exp in zip(stats, want):
        if got is not None:
            torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_reference_accumulate_hand_case():
    # Two samples of class 1, one neuron, two positions; ref = [1, 1].
    x = torch.tensor([[[1.0, 3.0]], [[-2.0, 0.0]]])
    g = torch.tensor([[[2.0, -1.0]], [[1.0, 5.0]]])
    r = torch.tensor([[1.0, 1.0]])
    labels = torch.tensor([1, 1])
    st = new_stats(1, k=2)
    reference.accumulate_(x, g, r, labels, False, *st)
    assert st[0].tolist() == [0.0, 2.0]
    assert st[1][1].item() == pytest.approx(2.0 + -1.0)            # means 2 and -1
    assert st[2][1].item() == pytest.approx(4.0 + 1.0)
    assert st[3][1].item() == pytest.approx(abs(2 - 3) + abs(-2 + 0))   # |sum x*g|
    assert st[4][1].item() == pytest.approx(abs(0 * 2 + 2 * -1) + abs(-3 * 1 + -1 * 5))
    assert st[1][0].item() == 0.0


def test_reference_accumulate_without_grad_leaves_gradient_stats():
    x = torch.randn(4, 3, 2)
    st = new_stats(3)
    st[3].fill_(7.0)
    st[4].fill_(8.0)
    reference.accumulate_(x, None, None, torch.tensor([0, 1, 0, 1]), False, *st)
    assert torch.all(st[3] == 7.0) and torch.all(st[4] == 8.0)
    assert st[0].tolist()[:2] == [2.0, 2.0]


@pytest.mark.parametrize("scores,theta,want", [
    ([4.0, 3.0, 2.0, 1.0], 0.5, [1, 1, 0, 0]),     # 4 < 5, 4 + 3 >= 5
    ([4.0, 3.0, 2.0, 1.0], 0.4, [1, 0, 0, 0]),     # 4 reaches exactly 4
    ([1.0, 1.0, 1.0, 1.0], 0.5, [1, 1, 0, 0]),     # ties: lower index first
    ([1.0, 2.0, 1.0, 2.0], 0.75, [1, 1, 0, 1]),    # 2 + 2 = 4 < 4.5; then the first 1
    ([3.0, 0.0, 1.0, 0.0], 1.0, [1, 0, 1, 0]),     # theta 1: every positive score, no zeros
    ([0.0, 0.0, 0.0], 0.9, [0, 0, 0]),             # an all-zero row selects nothing
    ([5.0], 0.01, [1]),
])
def test_reference_select_hand_cases(scores, theta, want):
    got = reference.select(torch.tensor([scores]), theta)
    assert got.dtype == torch.bool and got[0].int().tolist() == want


@pytest.mark.parametrize("scores,ratio,want", [
    ([4.0, 3.0, 2.0, 1.0], 0.5, [1, 1, 0, 0]),
    ([1.0, 1.0, 1.0, 1.0], 0.25, [1, 0, 0, 0]),
    ([1.0, 2.0, 2.0, 0.0], 0.5, [0, 1, 1, 0]),
    ([1.0, 2.0, 3.0], 0.01, [0, 0, 1]),            # ceil(0.03) = 1
    ([1.0, 2.0, 3.0], 1.0, [1, 1, 1]),
])
def test_reference_select_topk_hand_cases(scores, ratio, want):
    assert reference.select_topk(torch.tensor([scores]), ratio)[0].int().tolist() == want


@pytest.mark.parametrize("ratio,n,want", [(0.3, 10, 3), (0.1, 10, 1), (0.31, 10, 4), (1.0, 7, 7), (1e-6, 5, 1),
                                          (0.5, 0, 0), (0.7, 10, 7)])
def test_topk_count_is_ceil_without_float_noise(ratio, n, want):
    assert reference.topk_count(ratio, n) == want


def test_reference_masked_sgd_matches_torch_sgd_on_trainable_rows():
    torch.manual_seed(0)
    p0 = torch.randn(6, 4)
    mask = torch.tensor([True, False, True, True, False, True])
    p, buf = p0.clone(), torch.zeros(6, 4)
    tp = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        g = torch.randn(6, 4)
        reference.masked_sgd_(p, g, buf, mask, 0.1, 0.9, 0.01)
        tp.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p[mask], tp.detach()[mask], rtol=1e-6, atol=1e-7)
    assert torch.equal(p[~mask], p0[~mask]) and torch.equal(buf[~mask], torch.zeros(2, 4))


def test_reference_masked_adamw_matches_torch_adamw_on_trainable_weights():
    torch.manual_seed(0)
    p0 = torch.randn(5, 3)
    mask = torch.rand(5, 3) > 0.4
    p, m, v = p0.clone(), torch.zeros(5, 3), torch.zeros(5, 3)
    tp = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([tp], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(1, 5):
        g = torch.randn(5, 3)
        reference.masked_adamw_(p, g, m, v, mask, 0.01, 0.9, 0.99, 1e-8, 0.1, step)
        tp.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p[mask], tp.detach()[mask], rtol=1e-6, atol=1e-7)
    assert torch.equal(p[~mask], p0[~mask]) and not v[~mask].any() and not m[~mask].any()
    assert math.isfinite(float(p.sum()))
