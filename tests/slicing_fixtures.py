"""Small trained digits models and loaders shared by the slicing-engine tests (cached per session)."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neuslice.models as M
from neuslice.io.digits import digits_loaders, load_digits
from tolerances import ACCUMULATE

# float32 statistics against float64 loops / Captum: the accumulate table (measured: ≤ 1e-6 relative)
F32 = dict(zip(("rtol", "atol"), ACCUMULATE[torch.float32]))


def loaders(batch_size: int = 64, flatten: bool = False):
    """Fresh (train, test) loaders: a shuffling loader's generator advances with every pass."""
    return digits_loaders(batch_size, flatten=flatten)


@lru_cache(maxsize=None)
def test_tensors():
    return load_digits("test")


def small_loader(n: int = 120, batch_size: int = 40, flatten: bool = False) -> DataLoader:
    """The first ``n`` test samples (every class present), in fixed order."""
    x, y = test_tensors()
    x, y = x[:n], y[:n]
    if flatten:
        x = x.flatten(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@lru_cache(maxsize=None)
def _trained(name: str, epochs: int, kwargs: tuple = ()) -> dict:
    model = M.build(name, seed=0, **dict(kwargs))
    M.fit(model, loaders()[0], epochs=epochs, seed=0)
    return model.state_dict()


def trained(name: str = "digits_cnn", epochs: int = 3, **kwargs) -> nn.Module:
    """A fresh copy of a model trained on digits (eval mode); training runs once per session."""
    state = _trained(name, epochs, tuple(sorted(kwargs.items())))
    model = M.build(name, **kwargs)
    model.load_state_dict(state)
    return model.eval()


def relu_cnn() -> nn.Module:
    """Conv-BN-ReLU without max-pooling (Captum's DeepLIFT has its own max-pool rule)."""
    return trained("digits_cnn", channels=(8, 16), pool_after=(), head_pool=2)


def stats_close(a: dict, b: dict, rtol=F32["rtol"], atol=F32["atol"], keys=None):
    for layer in a:
        for k in keys or a[layer]:
            torch.testing.assert_close(a[layer][k].double(), b[layer][k].double(), rtol=rtol, atol=atol,
                                       msg=lambda m, layer=layer, k=k: f"{layer}/{k}: {m}")
