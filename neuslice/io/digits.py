"""Embedded data: scikit-learn's bundled digits data set (offline), as tensors and DataLoaders.

``sklearn.datasets.load_digits`` ships 1797 grey-level 8×8 images of the digits 0–9 with the
library, so nothing is downloaded. Pixel values (0…16) are scaled to [0, 1]. The train/test split
is stratified and fixed by ``seed``; the training loader shuffles with a generator seeded by
``seed`` too, so one seed gives one sequence of batches.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DIGITS_CLASSES", "load_digits", "digits_loaders", "subset_classes"]

DIGITS_CLASSES: Tuple[str, ...] = tuple(str(d) for d in range(10))


@lru_cache(maxsize=8)
def _split(test_size: float, seed: int):
    try:
        from sklearn.datasets import load_digits as _sk_load
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is a test/extra dependency
        raise ImportError("neuslice.data.load_digits: needs scikit-learn (pip install scikit-learn)") from e
    ds = _sk_load()
    return train_test_split(ds.images, ds.target, test_size=test_size, random_state=seed, stratify=ds.target)


def load_digits(split: str = "train", *, test_size: float = 0.25, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The digits data set as tensors.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (train followed by test).
        test_size: fraction held out for ``"test"``, in (0, 1).
        seed: fixes the stratified split.

    Returns:
        ``(images, labels)``: float32 ``[B, 1, 8, 8]`` in [0, 1] and int64 ``[B]`` in [0, 10).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"neuslice.data.load_digits: split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"neuslice.data.load_digits: test_size must lie in (0, 1), got {test_size!r}")
    x_tr, x_te, y_tr, y_te = _split(float(test_size), int(seed))
    parts = {"train": [(x_tr, y_tr)], "test": [(x_te, y_te)], "all": [(x_tr, y_tr), (x_te, y_te)]}[split]
    xs = torch.cat([torch.as_tensor(x, dtype=torch.float32) for x, _ in parts]) / 16.0
    ys = torch.cat([torch.as_tensor(y, dtype=torch.int64) for _, y in parts])
    return xs.unsqueeze(1).contiguous(), ys


def subset_classes(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The samples of ``x [B, ...]``, ``y [B]`` whose label is in ``classes``."""
    keep = torch.isin(y, torch.as_tensor(list(classes), dtype=y.dtype))
    return x[keep], y[keep]


def digits_loaders(batch_size: int = 64, *, test_size: float = 0.25, seed: int = 0, flatten: bool = False,
                   classes: Optional[Sequence[int]] = None) -> Tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over digits.

    Batches are ``(float32 [b, 1, 8, 8], int64 [b])`` (``[b, 64]`` with ``flatten=True``). The training
    loader shuffles with a generator seeded by ``seed``; the test loader keeps order. ``classes``
    restricts both splits to those labels (labels keep their original values).
    """
    if int(batch_size) < 1:
        raise ValueError(f"neuslice.data.digits_loaders: batch_size must be >= 1, got {batch_size!r}")
    loaders = []
    for split, shuffle in (("train", True), ("test", False)):
        x, y = load_digits(split, test_size=test_size, seed=seed)
        if classes is not None:
            x, y = subset_classes(x, y, classes)
        if flatten:
            x = x.flatten(1)
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        loaders.append(DataLoader(TensorDataset(x, y), batch_size=int(batch_size), shuffle=shuffle, generator=gen))
    return loaders[0], loaders[1]
