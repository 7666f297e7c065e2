"""Small trained digits models, their slices and loaders for the maintenance-operator tests (cached)."""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neuslice
import neuslice.models as M
from neuslice.io.digits import load_digits, subset_classes

ARCHS = ("digits_mlp", "digits_cnn", "digits_resnet", "digits_separable", "digits_transformer")
SMALL = {"digits_cnn": dict(channels=(8, 16)), "digits_mlp": dict(hidden=(32, 16)),
         "digits_resnet": dict(stem=8, stages=((8, 1), (16, 2))), "digits_separable": dict(stem=8, channels=(16, 16)),
         "digits_transformer": dict(dim=16, heads=2, ffn=32, depth=1)}



def ffn_layers(name: str, module: nn.Module) -> bool:
    """The transformer's FFN neurons: the first Linear of each FFN."""
    return name.endswith("ffn1")


def layers_for(arch: str):
    return ffn_layers if arch == "digits_transformer" else None


@lru_cache(maxsize=None)
def tensors(split: str, classes: Tuple[int, ...] = tuple(range(10)), n: int = 0):
    x, y = subset_classes(*load_digits(split), classes)
    return (x[:n], y[:n]) if n else (x, y)


def loader(split: str = "train", classes: Sequence[int] = tuple(range(10)), n: int = 0, batch_size: int = 64,
           shuffle: bool = False) -> DataLoader:
    x, y = tensors(split, tuple(classes), n)
    gen = torch.Generator().manual_seed(0) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


@lru_cache(maxsize=None)
def _state(arch: str, classes: Tuple[int, ...], epochs: int) -> Dict[str, torch.Tensor]:
    model = M.build(arch, seed=0, **SMALL[arch])
    M.fit(model, loader("train", classes, shuffle=True), epochs=epochs, lr=0.05, seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained(arch: str, classes: Sequence[int] = tuple(range(10)), epochs: int = 4) -> nn.Module:
    """A fresh copy (eval mode) of a small ``arch`` trained on ``classes`` of digits."""
    model = M.build(arch, **SMALL[arch])
    model.load_state_dict(_state(arch, tuple(classes), epochs))
    return model.eval()


@lru_cache(maxsize=None)
def _slices(arch: str, classes: Tuple[int, ...], theta: float, metric: str):
    model = trained(arch, classes)
    prof = neuslice.profile(model, loader("train", classes, n=400), 10, layers=layers_for(arch), progress=False)
    return neuslice.semantic_slice(prof, metric, theta, classes=list(classes))


def slices(arch: str, classes: Sequence[int] = tuple(range(10)), theta: float = 0.9, metric: str = "taylor"):
    return _slices(arch, tuple(classes), theta, metric)


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model: nn.Module, before: Dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(before)
    for k, v in before.items():
        assert torch.equal(now[k], v), f"{k} changed"
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
