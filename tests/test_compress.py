"""compress: magnitude pruning in prune → fine-tune iterations (docs/method.md §6)."""

import pytest
import torch
from torch import nn

import neuslice.ops
from neuslice.maintain import METHODS, compress, restructure
from neuslice.maintain.compress import _lamp, allocate

from maintain_fixtures import assert_unchanged, loader, slices, snapshot, tensors, trained

pytestmark = pytest.mark.usefixtures("one_thread")

KEEP = [2, 7]


def _iterations(start_density: float, target: float, step: float) -> int:
    n, d = 0, start_density
    while d > 1 - target + 1e-12:
        d = max(d * (1 - step), 1 - target)
        n += 1
    return n


@pytest.mark.parametrize("method", METHODS)
def test_each_method_reaches_the_target_and_pruned_weights_stay_zero(method):
    model = trained("digits_cnn")
    before = snapshot(model)
    data = loader("train", n=256, batch_size=64)
    out, rep = compress(model, data, 0.8, method=method, step=0.4, epochs=1, lr=0.01,
                        eval_data=loader("test", n=200))
    assert_unchanged(model, before)
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((m.weight == 0).sum()) for m in out.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert rep.compression_rate == pytest.approx(zeros / total) and 0.8 <= rep.compression_rate < 0.81
    assert rep.iterations == _iterations(1.0, 0.8, 0.4) == len(rep.history) == 4
    assert rep.reference_params == total and rep.method == method and not out.training
    assert [h[0] for h in rep.history] == [1, 2, 3, 4]
    assert all(a <= b + 1e-12 for a, b in zip([h[1] for h in rep.history], [h[1] for h in rep.history][1:]))
    assert 0.0 <= rep.accuracy_after <= 1.0 and rep.accuracy_after == rep.history[-1][2]
    if method == "uniform+":
        assert bool((out.features[0].weight != 0).all())             # first layer stays dense
        assert float((out.head.weight != 0).float().mean()) >= 0.2   # last keeps at least 20 %


def test_slicing_first_needs_fewer_iterations_and_counts_against_the_original():
    model = trained("digits_cnn")
    s = slices("digits_cnn")
    x, _ = tensors("test", n=2)
    phys, _ = restructure(model, s, KEEP, example_inputs=x)
    data = loader("train", KEEP, batch_size=64)
    out, rep = compress(phys, data, 0.9, method="global", epochs=1, step=0.3)
    total = sum(p.numel() for p in model.parameters())
    assert rep.reference_params == total == phys.original_params
    start = phys.num_params / total
    assert rep.iterations == _iterations(start, 0.9, 0.3) < _iterations(1.0, 0.9, 0.3)
    zeros = sum(int((m.weight == 0).sum()) for m in out.module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert rep.compression_rate == pytest.approx((total - phys.num_params + zeros) / total)
    assert rep.compression_rate >= 0.9 and out.class_map.tolist() == KEEP


def test_prune_only_without_fine_tuning():
    model = trained("digits_mlp")
    out, rep = compress(model, loader("train", n=64), 0.5, method="lamp", step=0.5, epochs=0)
    assert rep.iterations == 1 and rep.compression_rate >= 0.5
    kept = [m.weight != 0 for m in out.modules() if isinstance(m, nn.Linear)]
    orig = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    new = [m.weight for m in out.modules() if isinstance(m, nn.Linear)]
    assert all(torch.equal(n[k], o[k]) for n, o, k in zip(new, orig, kept))    # survivors untouched


def test_allocations():
    torch.manual_seed(0)
    ws = [torch.randn(8, 4, 3, 3), torch.randn(16, 8, 3, 3), torch.randn(10, 64)]
    alive = [torch.ones(w.shape, dtype=torch.bool) for w in ws]
    n = sum(w.numel() for w in ws)
    keep = allocate("global", ws, alive, n // 4)
    assert sum(int(k.sum()) for k in keep) == n // 4
    thr = min(float(w[k].abs().min()) for w, k in zip(ws, keep))
    assert all(bool((w[~k].abs() <= thr).all()) for w, k in zip(ws, keep))
    uni = allocate("uniform+", ws, alive, n // 4)
    assert bool(uni[0].all()) and sum(int(k.sum()) for k in uni) <= n // 4
    erk = allocate("erk", ws, alive, n // 4)
    dens = [float(k.float().mean()) for k in erk]
    assert dens[1] < dens[0] and sum(int(k.sum()) for k in erk) <= n // 4
    again = allocate("lamp", ws, keep, n // 8)                       # a subset of what was alive
    assert all(bool((a <= k).all()) for a, k in zip(again, keep)) and sum(int(a.sum()) for a in again) == n // 8


def test_lamp_score_by_hand():
    w = torch.tensor([1.0, -3.0, 2.0, 0.5])
    got = _lamp(w, torch.ones(4, dtype=torch.bool))
    want = [1 / (1 + 4 + 9), 9 / 9, 4 / (4 + 9), 0.25 / (0.25 + 1 + 4 + 9)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_fine_tuning_goes_through_masked_sgd(monkeypatch):
    calls = []
    real = neuslice.ops.masked_sgd_

    def spy(param, grad, buf, mask, *a):
        calls.append(mask.shape == param.shape or mask.dim() == 1)
        return real(param, grad, buf, mask, *a)
    monkeypatch.setattr(neuslice.ops, "masked_sgd_", spy)
    compress(trained("digits_mlp"), loader("train", n=64), 0.5, step=0.5, epochs=1)
    assert calls and all(calls)


def test_errors_name_the_function_and_change_nothing():
    model = trained("digits_cnn")
    before = snapshot(model)
    data = loader("train", n=64)
    with pytest.raises(ValueError, match=r"neuslice.compress: method must be one of \('global', 'uniform\+', 'erk', "
                                         r"'lamp'\), got 'random'"):
        compress(model, data, 0.5, method="random")
    with pytest.raises(ValueError, match=r"neuslice.compress: sparsity must lie in \(0, 1\), got 1.0"):
        compress(model, data, 1.0)
    with pytest.raises(ValueError, match=r"neuslice.compress: step must lie in \(0, 1\), got 0"):
        compress(model, data, 0.5, step=0)
    with pytest.raises(ValueError, match="neuslice.compress: sparsity 0.999 needs .* but method 'uniform\\+' can prune"):
        compress(model, data, 0.999, method="uniform+")
    with pytest.raises(ValueError, match="neuslice.compress: reference_params must be an int >= the model's"):
        compress(model, data, 0.5, reference_params=10)
    phys, _ = restructure(model, slices("digits_cnn"), KEEP, example_inputs=tensors("test", n=2)[0])
    with pytest.raises(ValueError, match=r"neuslice.compress: data has label \d, outside the declared classes \[2, 7\]"):
        compress(phys, data, 0.9)
    with pytest.raises(TypeError, match="neuslice.compress: model must be a torch.nn.Module, got str"):
        compress("model", data, 0.5)
    assert_unchanged(model, before)
