"""docs/method.md §4: the three slicing modes against hand selections, the merge, coupling, compression, masking."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import neuslice
from neuslice import Slices
from slicing_fixtures import small_loader, trained

K = 10


@pytest.fixture(scope="module")
def prof():
    return neuslice.profile(trained(), small_loader(150, 50), K, progress=False)


@pytest.fixture(scope="module")
def mlp_prof():
    model = trained("digits_mlp", epochs=5)
    return model, neuslice.profile(model, small_loader(150, 50, flatten=True), K, progress=False)


def _hand_critical(row, theta):
    order = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))
    total, acc, keep = float(row.sum()), 0.0, set()
    for j in order:
        if total == 0 or acc >= theta * total:
            break
        keep.add(j)
        acc += float(row[j])
    return keep


def _hand_top(row, ratio):
    k = max(1, math.ceil(round(ratio * len(row), 9)))
    return set(sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:k])


@pytest.mark.parametrize("metric", ["taylor", "ens", "avg"])
@pytest.mark.parametrize("theta", [0.9, 0.95, 0.99])
def test_semantic_critical_sets_by_hand(prof, metric, theta):
    s = neuslice.semantic_slice(prof, metric, theta)
    for name, sc in prof.score(metric).items():
        for k in range(K):
            want = _hand_critical(sc[k], theta) or {int(sc[k].argmax())}
            assert set(torch.nonzero(s.critical(k)[name]).flatten().tolist()) == want, (name, k)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.55, 1.0])
def test_category_and_global_top_ratio_by_hand(prof, ratio):
    cat = neuslice.category_slice(prof, "var", ratio)
    glo = neuslice.global_slice(prof, "taylor", ratio)
    agn = prof.class_agnostic("taylor")
    for name, sc in prof.score("var").items():
        for k in range(K):
            assert set(torch.nonzero(cat.critical(k)[name]).flatten().tolist()) == _hand_top(sc[k], ratio)
            assert set(torch.nonzero(glo.critical(k)[name]).flatten().tolist()) == _hand_top(agn[name], ratio)
        assert torch.equal(glo.mask([0])[name], glo.mask(range(K))[name])


def test_selection_goes_through_the_ops(prof, monkeypatch):
    calls = []
    for op in ("select", "select_topk"):
        real = getattr(neuslice.ops, op)
        monkeypatch.setattr(neuslice.ops, op, lambda s, v, real=real, op=op: (calls.append(op), real(s, v))[1])
    neuslice.semantic_slice(prof, "taylor", 0.9)
    neuslice.category_slice(prof, "taylor", 0.5)
    neuslice.global_slice(prof, "taylor", 0.5)
    assert calls.count("select") == 2 and calls.count("select_topk") >= 4


def _crafted(share=0.75, tau=0.5):
    sets = [{0, 1, 2, 7}, {0, 1, 3, 7}, {4, 7}, {4, 5}]
    c1 = torch.zeros(4, 8, dtype=torch.bool)
    for k, s in enumerate(sets):
        c1[k, list(s)] = True
    c2 = torch.zeros(4, 2, dtype=torch.bool)
    c2[:, 0] = True
    layers = [{"name": "a", "type": "Linear", "weight_shape": [8, 3], "n": 8},
              {"name": "b", "type": "Linear", "weight_shape": [2, 8], "n": 2}]
    scores = {"a": torch.rand(4, 8, dtype=torch.float64), "b": torch.rand(4, 2, dtype=torch.float64)}
    return Slices(layers, list("wxyz"), {"a": c1, "b": c2}, torch.ones(4, dtype=torch.bool), scores,
                  mode="semantic", metric="taylor", value=0.9, share=share, tau=tau)


def test_categories_similarity_and_groups_by_hand():
    s = _crafted()
    cats = {c: torch.nonzero(v["a"]).flatten().tolist() for c, v in s.categories().items()}
    assert cats == {"shared": [7], "group": [0, 1, 4], "specific": [2, 3, 5], "free": [6]}
    j = torch.tensor([[1, 3 / 5, 1 / 5, 0], [3 / 5, 1, 1 / 5, 0], [1 / 5, 1 / 5, 1, 1 / 3], [0, 0, 1 / 3, 1]],
                     dtype=torch.float64)
    torch.testing.assert_close(s.similarity(), (8 * j + 2) / 10)
    assert s.groups() == [[0, 1], [2], [3]]
    assert _crafted(tau=0.4).groups() == [[0, 1], [2, 3]]
    assert _crafted(tau=0.0).groups() == [[0, 1, 2, 3]]
    assert {int(v["a"].sum()) for v in _crafted(share=0.5).categories().values()} == {4, 0, 3, 1}
    assert s.mask(["w", "z"])["a"].tolist() == [True, True, True, False, True, True, False, True]


def test_min_keep_and_empty_rows():
    model = trained("digits_mlp", epochs=5)
    p = neuslice.profile(model, small_loader(100, 50, flatten=True), K, metrics=("avg", "var"), progress=False)
    p.stats["body.3"]["act_sum"][4].zero_()                     # class 4: every neuron scores 0
    s = neuslice.semantic_slice(p, "avg", 0.9, min_keep=3)
    assert s.critical(4)["body.3"].tolist()[:3] == [True] * 3 and int(s.critical(4)["body.3"].sum()) == 3
    assert all(int(c.sum()) >= 3 for c in s.critical_sets["body.1"])
    s0 = neuslice.semantic_slice(p, "avg", 0.9, min_keep=0)
    assert int(s0.critical(4)["body.3"].sum()) == 0


def test_empty_class_is_an_error_unless_left_out(mlp_prof):
    model, p = mlp_prof
    p = p.to("cpu")
    for st in p.stats.values():
        for v in st.values():
            v[7] = 0
    with pytest.raises(ValueError, match=r"neuslice.semantic_slice: class 7 \('7'\) has no samples in the profile"):
        neuslice.semantic_slice(p, "taylor", 0.9)
    s = neuslice.semantic_slice(p, "taylor", 0.9, classes=[k for k in range(K) if k != 7])
    with pytest.raises(ValueError, match=r"neuslice.Slices.mask: class 7 \('7'\) has no critical set"):
        s.mask([1, 7])
    assert math.isnan(float(s.similarity()[7, 0])) and [7] not in s.groups()


@pytest.mark.parametrize("call, match", [
    (lambda p: neuslice.semantic_slice(p, "taylor", 0.0), r"neuslice.semantic_slice: theta must lie in \(0, 1\], got 0.0"),
    (lambda p: neuslice.semantic_slice(p, "taylor", 1.5), r"theta must lie in \(0, 1\], got 1.5"),
    (lambda p: neuslice.semantic_slice(p, "taylor", float("nan")), r"theta must lie in \(0, 1\], got nan"),
    (lambda p: neuslice.category_slice(p, "taylor", 0), r"neuslice.category_slice: ratio must lie in \(0, 1\], got 0"),
    (lambda p: neuslice.global_slice(p, "taylor", 1.01), r"neuslice.global_slice: ratio must lie in \(0, 1\]"),
    (lambda p: neuslice.global_slice(p, "gradcam", 0.5), r"neuslice.global_slice: unknown metric 'gradcam'"),
    (lambda p: neuslice.semantic_slice(p, "taylor", 0.9, share=0), r"share must lie in \(0, 1\], got 0"),
    (lambda p: neuslice.semantic_slice(p, "taylor", 0.9, tau=2), r"tau must lie in \[0, 1\], got 2"),
    (lambda p: neuslice.semantic_slice(p, "taylor", 0.9, min_keep=-1), r"min_keep must be an int >= 0, got -1"),
    (lambda p: neuslice.semantic_slice(p, "taylor", 0.9, classes=[10]), r"class 10 is outside \[0, 10\)"),
])
def test_bad_slicing_arguments(prof, call, match):
    with pytest.raises(ValueError, match=match):
        call(prof)


def test_compression_rate_by_hand_on_the_mlp(mlp_prof):
    model, p = mlp_prof
    s = neuslice.semantic_slice(p, "taylor", 0.9)
    t = [2, 5]
    keep = s.mask(t)
    r1, r2 = int((~keep["body.1"]).sum()), int((~keep["body.3"]).sum())
    removed = (r1 * 64 + r1) + (r2 * 64 + r1 * 32 - r1 * r2 + r2) + (r2 * 10 + 8 * 32 - 8 * r2 + 8)
    total = sum(q.numel() for q in model.parameters())
    assert s.compression_rate(model, t) == pytest.approx(removed / total, abs=1e-12)
    assert s.compression_rate(model, t, restrict_head=False) == pytest.approx(
        (removed - (8 * 32 - 8 * r2 + 8)) / total, abs=1e-12)
    full = neuslice.category_slice(p, "taylor", 1.0)
    assert full.compression_rate(model, range(K)) == 0.0


def test_compression_rate_counts_norm_entries_and_flattened_reads(prof):
    model = trained()
    s = neuslice.global_slice(prof, "taylor", 0.5)                 # keeps 8 of 16 and 16 of 32 channels
    # conv0 rows + bn0; conv1 rows ∪ input columns + bn1; the head's 4 flattened columns per removed channel
    removed = (8 * 9 + 2 * 8) + (16 * 16 * 9 + 32 * 8 * 9 - 16 * 8 * 9 + 2 * 16) + (10 * 16 * 4)
    total = sum(q.numel() for q in model.parameters())
    assert s.compression_rate(model, range(K)) == pytest.approx(removed / total, abs=1e-12)


def test_apply_masks_like_zeroed_weights_and_removes_its_hooks(mlp_prof):
    model, p = mlp_prof
    s = neuslice.semantic_slice(p, "taylor", 0.9)
    keep = s.mask([0, 3])
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("body.1", "body.3"):
            lin = dict(zeroed.named_modules())[name]
            lin.weight[~keep[name]] = 0
            lin.bias[~keep[name]] = 0
    x = next(iter(small_loader(50, 50, flatten=True)))[0]
    with s.apply(model, [0, 3]) as m:
        got = m(x)
    torch.testing.assert_close(got, zeroed(x), rtol=0, atol=0)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with s.apply(model, [0]):
            raise RuntimeError("boom")
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with pytest.raises(neuslice.SignatureError, match=r"Slices.apply: .*layer 'body.1' .* not in this model"):
        s.apply(trained(), [0])


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.bn0, self.act0 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, K)

    def forward(self, x):
        h = self.act0(self.bn0(self.conv0(x)))
        h = self.act1(self.bn1(self.conv1(h)) + h)
        return self.head(self.pw(self.dw(h)).mean((2, 3)))


def test_coupled_channels_are_kept_as_one():
    torch.manual_seed(0)
    model = _Residual().eval()
    p = neuslice.profile(model, small_loader(60, 30), K, progress=False)
    assert p.coupled == [["conv0", "conv1", "dw"]]
    assert [e["tap"] for e in p.layers] == ["act0", "conv1", "dw", "pw"]
    s = neuslice.semantic_slice(p, "taylor", 0.8)
    for k in range(K):
        c = s.critical(k)
        assert torch.equal(c["conv0"], c["conv1"]) and torch.equal(c["conv0"], c["dw"])


def test_same_seed_same_slices_from_scratch():
    import neuslice.models as M
    from neuslice.io.digits import digits_loaders
    runs = []
    for _ in range(2):
        model = M.fit(M.build("digits_mlp", seed=3), digits_loaders(64, seed=3)[0], epochs=2, seed=3)
        p = neuslice.profile(model, small_loader(100, 50, flatten=True), K, progress=False)
        runs.append(neuslice.semantic_slice(p, "ens", 0.9))
    a, b = runs
    assert all(torch.equal(a.critical_sets[n], b.critical_sets[n]) for n in a.layer_names)
    assert a.groups() == b.groups()
