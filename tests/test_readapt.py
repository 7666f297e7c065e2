"""readapt: critical-neuron tuning (docs/method.md §6 'Re-adapt')."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import neuslice
import neuslice.ops
from neuslice.maintain import readapt
from neuslice.maintain.readapt import critical_masks

from maintain_fixtures import assert_unchanged, loader, slices, snapshot, tensors, trained

pytestmark = pytest.mark.usefixtures("one_thread")


def shifted(split: str, classes, n: int = 0, batch_size: int = 32) -> DataLoader:
    """Digits shifted one pixel right and down, plus fixed Gaussian noise (σ = 0.1)."""
    x, y = tensors(split, tuple(classes), n)
    g = torch.Generator().manual_seed(1)
    x = torch.roll(x, shifts=(1, 1), dims=(2, 3)) + 0.1 * torch.randn(x.shape, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _check_frozen(model, new, masks, frozen_norms):
    """Every entry outside ``masks`` (and every frozen BN running statistic) is bit-identical."""
    params = dict(new.named_parameters())
    for name, p in model.named_parameters():
        m = masks.get(name)
        if m is None:
            assert torch.equal(params[name], p), f"{name} is frozen but changed"
            continue
        m = m.view(-1, *([1] * (p.dim() - 1))).expand(p.shape) if m.shape != p.shape else m
        assert torch.equal(params[name][~m], p[~m]), f"frozen entries of {name} changed"
    new_mods = dict(new.named_modules())
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            f = frozen_norms.get(mod, torch.ones(mod.num_features, dtype=torch.bool))
            for buf in ("running_mean", "running_var"):
                assert torch.equal(getattr(new_mods[name], buf)[f], getattr(mod, buf)[f]), f"{name}.{buf}"
            assert torch.equal(new_mods[name].num_batches_tracked, mod.num_batches_tracked)


@pytest.mark.parametrize("arch,optimizer", [("digits_cnn", "adamw"), ("digits_resnet", "sgd")])
def test_only_critical_neurons_of_the_new_classes_train(arch, optimizer):
    model = trained(arch)
    s = slices(arch)
    before = snapshot(model)
    data = shifted("train", (1, 3, 8), n=300)
    new, rep = readapt(model, s, data, epochs=2, lr=5e-3, optimizer=optimizer, weight_decay=0.01,
                       eval_data=loader("test", n=200), new_eval_data=shifted("test", (1, 3, 8)))
    assert_unchanged(model, before)
    assert rep.classes == [1, 3, 8] and rep.steps == 2 * len(data)
    masks, frozen_norms = critical_masks("t", model, s, [1, 3, 8])
    _check_frozen(model, new, masks, frozen_norms)
    changed = sum(int((a != b).sum()) for a, b in zip(model.parameters(), new.parameters()))
    assert 0 < changed <= rep.trainable_params
    total = sum(p.numel() for p in model.parameters())
    assert rep.total_params == total and rep.trainable_fraction == pytest.approx(rep.trainable_params / total)
    assert 0 < rep.trainable_fraction < 1
    assert rep.new_acc_after > rep.new_acc_before
    assert 0 <= rep.orig_acc_after <= 1 and 0 <= rep.orig_acc_before <= 1
    head = model.head.weight
    assert torch.equal(new.head.weight[[0, 2, 4, 5, 6, 7, 9]], head[[0, 2, 4, 5, 6, 7, 9]])


def test_trainable_fraction_counts_rows_of_the_slice():
    model = trained("digits_mlp")
    s = slices("digits_mlp")
    new, rep = readapt(model, s, shifted("train", (4,), n=40), classes=[4], epochs=1, lr=1e-3)
    keep = s.mask([4])
    n0, n1 = int(keep["body.1"].sum()), int(keep["body.3"].sum())
    want = n0 * (64 + 1) + n1 * (32 + 1) + (16 + 1)          # rows + biases of the slice, head row of class 4
    assert rep.trainable_params == want and rep.orig_acc_before is None and rep.new_acc_before is not None


def test_every_step_goes_through_the_masked_ops(monkeypatch):
    calls = {"adamw": 0, "sgd": 0}
    real_adamw, real_sgd = neuslice.ops.masked_adamw_, neuslice.ops.masked_sgd_

    def adamw(*a, **k):
        calls["adamw"] += 1
        return real_adamw(*a, **k)

    def sgd(*a, **k):
        calls["sgd"] += 1
        return real_sgd(*a, **k)
    monkeypatch.setattr(neuslice.ops, "masked_adamw_", adamw)
    monkeypatch.setattr(neuslice.ops, "masked_sgd_", sgd)
    monkeypatch.setattr(torch.optim.Optimizer, "step", lambda *a, **k: pytest.fail("torch.optim used"))
    model, s = trained("digits_cnn"), slices("digits_cnn")
    data = shifted("train", (0,), n=64)
    readapt(model, s, data, epochs=1, lr=1e-3)
    assert calls["adamw"] > 0 and calls["sgd"] == 0
    readapt(model, s, data, epochs=1, lr=1e-3, optimizer="sgd")
    assert calls["sgd"] > 0


def test_errors_name_the_function_and_change_nothing():
    model = trained("digits_cnn")
    s = slices("digits_cnn")
    before = snapshot(model)
    data = shifted("train", (1, 3), n=40)
    with pytest.raises(ValueError, match=r"neuslice.readapt: data has label 3, outside the declared classes \[1\]"):
        readapt(model, s, data, classes=[1])
    with pytest.raises(ValueError, match=r"neuslice.readapt: class 11 is outside \[0, 10\)"):
        readapt(model, s, data, classes=[1, 11])
    with pytest.raises(ValueError, match="neuslice.readapt: expected at least one class, got none"):
        readapt(model, s, data, classes=[])
    with pytest.raises(ValueError, match="neuslice.readapt: optimizer must be 'sgd' or 'adamw', got 'adam'"):
        readapt(model, s, data, optimizer="adam")
    with pytest.raises(ValueError, match="neuslice.readapt: epochs must be an int > 0, got 0"):
        readapt(model, s, data, epochs=0)
    with pytest.raises(neuslice.SignatureError, match="neuslice.readapt: the file was made for another model"):
        readapt(trained("digits_mlp"), s, data)
    with pytest.raises(ValueError, match=r"neuslice.readapt: class 7 \('7'\) has no critical set"):
        readapt(model, slices("digits_cnn", classes=(0, 1, 2, 3, 4)), shifted("train", (1, 7), n=40))
    with pytest.raises(ValueError, match="neuslice.readapt: data yielded no sample"):
        readapt(model, s, [])
    assert_unchanged(model, before)


# --- replay: old samples mixed into the batches; the trainable neurons stay those of the new samples' classes

def _capture(monkeypatch):
    """Record the batches of the first epoch readapt trains on (then train as usual)."""
    from neuslice.maintain import _common
    seen = []
    real = _common.fit_masked

    def fit(model, data, masks, **kw):
        seen.append([(x.clone(), y.clone()) for x, y in data])
        return real(model, data, masks, **kw)
    monkeypatch.setattr(_common, "fit_masked", fit)
    return seen


def _rows(x):
    return {tuple(r.tolist()) for r in x.flatten(1)}


@pytest.mark.parametrize("replay,want", [(0.25, 15), (0.5, 30), (1.0, 60), (0.001, 1)])
def test_replay_mixes_that_many_old_samples_per_new_sample(monkeypatch, replay, want):
    seen = _capture(monkeypatch)
    model, s = trained("digits_cnn"), slices("digits_cnn")
    data = shifted("train", (3, 8), n=60, batch_size=16)
    old = loader("train", n=200, batch_size=50)
    _, rep = readapt(model, s, data, replay=replay, replay_data=old, epochs=2, lr=1e-3, seed=3)
    assert rep.replay == replay and rep.replayed == want and rep.classes == [3, 8]
    x, y = (torch.cat(t) for t in zip(*seen[0]))
    assert len(y) == 60 + want and rep.steps == 2 * -(-(60 + want) // 16)    # batches of data's batch size
    assert [len(b[1]) for b in seen[0][:-1]] == [16] * (len(seen[0]) - 1)
    new_x, _ = next(iter(shifted("train", (3, 8), n=60, batch_size=60)))
    old_x, old_y = tensors("train", tuple(range(10)), 200)
    mixed = _rows(x)
    assert _rows(new_x) <= mixed                                 # every new sample, once
    replayed = mixed - _rows(new_x)
    assert len(replayed) == want and replayed <= _rows(old_x)   # distinct samples of replay_data
    if want >= 30:
        assert set(y.tolist()) - {3, 8}                          # old samples of any class


def test_replay_is_seeded_and_deterministic(monkeypatch):
    seen = _capture(monkeypatch)
    model, s = trained("digits_cnn"), slices("digits_cnn")
    data, old = shifted("train", (3, 8), n=60, batch_size=16), loader("train", n=200, batch_size=50)
    runs = [readapt(model, s, data, replay=0.5, replay_data=old, epochs=1, seed=seed)[0] for seed in (3, 3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(seen[0], seen[1]))
    assert _rows(torch.cat([b[0] for b in seen[0]])) != _rows(torch.cat([b[0] for b in seen[2]]))  # another draw


@pytest.mark.parametrize("arch,optimizer", [("digits_cnn", "adamw"), ("digits_resnet", "sgd")])
def test_frozen_weights_stay_bit_identical_with_replay(arch, optimizer):
    model, s = trained(arch), slices(arch)
    before = snapshot(model)
    new, rep = readapt(model, s, shifted("train", (3, 8), n=100), replay=1.0, replay_data=loader("train", n=300),
                       epochs=2, lr=5e-3, optimizer=optimizer, weight_decay=0.01)
    assert_unchanged(model, before)
    assert rep.replayed == 100 and rep.classes == [3, 8]
    masks, frozen_norms = critical_masks("t", model, s, [3, 8])
    _check_frozen(model, new, masks, frozen_norms)
    others = [c for c in range(10) if c not in (3, 8)]
    assert torch.equal(new.head.weight[others], model.head.weight[others])
    assert not torch.equal(new.head.weight[[3, 8]], model.head.weight[[3, 8]])


def test_replay_default_is_0_5_with_replay_data_and_none_without():
    from neuslice.maintain.readapt import DEFAULT_REPLAY
    model, s = trained("digits_cnn"), slices("digits_cnn")
    data = shifted("train", (3, 8), n=60, batch_size=16)
    _, rep = readapt(model, s, data, replay_data=loader("train", n=200), epochs=1)
    assert DEFAULT_REPLAY == 0.5 and rep.replay == 0.5 and rep.replayed == 30
    _, rep = readapt(model, s, data, epochs=1)
    assert rep.replay == 0.0 and rep.replayed == 0 and rep.steps == len(data)
    _, rep = readapt(model, s, data, replay=0, replay_data=loader("train", n=200), epochs=1)
    assert rep.replay == 0.0 and rep.replayed == 0 and rep.steps == len(data)


def test_bad_replay_arguments_name_the_function_and_change_nothing():
    model, s = trained("digits_cnn"), slices("digits_cnn")
    before = snapshot(model)
    data, old = shifted("train", (3, 8), n=40), loader("train", n=100)
    for bad in (1.5, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match=r"neuslice.readapt: replay must be a fraction in \[0, 1\] \(old "
                                             r"samples per new sample\), got"):
            readapt(model, s, data, replay=bad, replay_data=old)
    with pytest.raises(ValueError, match="neuslice.readapt: replay=0.1 needs replay_data"):
        readapt(model, s, data, replay=0.1)
    x, y = tensors("train", n=30)
    with pytest.raises(ValueError, match=r"neuslice.readapt: replay_data has label 12, outside the declared classes"):
        readapt(model, s, data, replay_data=[(x, torch.full((30,), 12))])
    with pytest.raises(ValueError, match="neuslice.readapt: replay needs 40 old samples but replay_data has 30"):
        readapt(model, s, data, replay=1.0, replay_data=[(x, y)])
    with pytest.raises(ValueError, match=r"neuslice.readapt: replay_data inputs have shape \[1, 4, 4\] per sample, "
                                         r"data's \[1, 8, 8\]"):
        readapt(model, s, data, replay_data=[(x[:, :, :4, :4], y)])
    with pytest.raises(TypeError, match="neuslice.readapt: with replay, replay_data inputs must be tensors, got list"):
        readapt(model, s, data, replay_data=[(x.tolist(), y)])
    assert_unchanged(model, before)
