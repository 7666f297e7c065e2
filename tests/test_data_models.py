"""neuslice.data (digits, offline) and neuslice.models (our small reference models)."""
from __future__ import annotations

import pytest
import torch

import neuslice.models as M
from neuslice.io.digits import DIGITS_CLASSES, digits_loaders, load_digits, subset_classes


def test_digits_split_is_fixed_stratified_and_scaled():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    assert x.shape == (1347, 1, 8, 8) and xt.shape == (450, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10)) == set(yt.tolist())
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    x2, y2 = load_digits("train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(load_digits("test", seed=1)[1], yt)
    xa, ya = load_digits("all")
    assert torch.equal(xa, torch.cat([x, xt])) and len(DIGITS_CLASSES) == 10
    with pytest.raises(ValueError, match=r"neuslice.data.load_digits: split must be 'train', 'test' or 'all', got 'val'"):
        load_digits("val")


def test_loaders_shuffle_by_seed_and_restrict_classes():
    tr1, te1 = digits_loaders(32, seed=0)
    tr2, _ = digits_loaders(32, seed=0)
    assert torch.equal(next(iter(tr1))[1], next(iter(tr2))[1])
    xb, yb = next(iter(te1))
    assert xb.shape == (32, 1, 8, 8)
    tr, te = digits_loaders(16, flatten=True, classes=[3, 5])
    xb, yb = next(iter(tr))
    assert xb.shape == (16, 64) and set(yb.tolist()) <= {3, 5}
    xs, ys = subset_classes(*load_digits("test"), [0])
    assert set(ys.tolist()) == {0}
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        digits_loaders(0)


def test_models_build_train_and_score():
    for name, shape in (("digits_cnn", (4, 1, 8, 8)), ("digits_mlp", (4, 1, 8, 8)), ("bench_cnn", (2, 1, 28, 28))):
        m = M.build(name, seed=0)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                     M.build(name, seed=0).state_dict().values()))
        assert m(torch.zeros(shape)).shape == (shape[0], 10)
    with pytest.raises(ValueError, match=r"neuslice.models.build: unknown model 'resnet'; expected one of"):
        M.build("resnet")
    tr, te = digits_loaders(64)
    m = M.fit(M.build("digits_mlp", seed=0), tr, epochs=5)
    assert not m.training and M.accuracy(m, te) > 0.85
    acc2 = M.accuracy(m, te, classes=[0, 1])
    assert acc2 >= M.accuracy(m, te) - 0.05
    with pytest.raises(ValueError, match="no sample in the loader has a label in"):
        M.accuracy(m, digits_loaders(64, classes=[0])[1], classes=[5])
