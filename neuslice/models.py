"""Small reference models (ours; no torchvision) and the few helpers to train and score them.

Every model is a classifier ``[B, ...] -> logits [B, K]`` built from ``nn`` modules only (activations
are ``nn.ReLU`` modules, so the profiler taps them and DeepLIFT's Rescale rule sees them). Add a model
by writing its class and registering a builder in :data:`MODELS`; :func:`build` looks it up.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from .engine.capture import call_model
from .engine.evaluate import accuracy  # noqa: F401  (re-exported: train, then score, in one place)
from .io.modelfile import register_factory

__all__ = ["ConvNet", "MLP", "MODELS", "build", "fit", "accuracy"]


class ConvNet(nn.Module):
    """Conv-BN-ReLU blocks, then adaptive average pooling to ``head_pool``² positions and a linear head.

    Args:
        in_channels: input channels C of ``[B, C, H, W]`` float32 inputs.
        channels: output channels of each 3×3 block (one block per entry).
        num_classes: K, the head's outputs.
        pool_after: indices of blocks followed by a 2×2 max-pool.
        head_pool: side of the pooled map the head reads (1: global average pooling).
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32), num_classes: int = 10,
                 pool_after: Iterable[int] = (), head_pool: int = 1):
        super().__init__()
        pools = set(pool_after)
        blocks = []
        c = in_channels
        for i, out in enumerate(channels):
            blocks += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if i in pools:
                blocks.append(nn.MaxPool2d(2))
            c = out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(head_pool)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c * head_pool * head_pool, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(x))))


class MLP(nn.Module):
    """Flatten, then Linear-ReLU layers and a linear head: ``[B, ...] -> [B, K]``."""

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (64, 32), num_classes: int = 10):
        super().__init__()
        layers = [nn.Flatten()]
        f = in_features
        for h in hidden:
            layers += [nn.Linear(f, h), nn.ReLU()]
            f = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(f, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


MODELS: Dict[str, Callable[..., nn.Module]] = {
    # digits: [B, 1, 8, 8]
    "digits_cnn": lambda **kw: ConvNet(**{"in_channels": 1, "channels": (16, 32), "num_classes": 10,
                                          "pool_after": (0,), "head_pool": 2, **kw}),
    "digits_mlp": lambda **kw: MLP(**{"in_features": 64, "hidden": (64, 32), "num_classes": 10, **kw}),
    # the profiler benchmark's net: [B, 1, 28, 28], 4 conv layers of 64–128 channels
    "bench_cnn": lambda **kw: ConvNet(**{"in_channels": 1, "channels": (64, 64, 128, 128), "num_classes": 10,
                                         "pool_after": (1,), **kw}),
}


def build(name: str, *, seed: Optional[int] = None, **kwargs) -> nn.Module:
    """A model from :data:`MODELS` by name; ``seed`` fixes its initial weights."""
    if name not in MODELS:
        raise ValueError(f"neuslice.models.build: unknown model {name!r}; expected one of {sorted(MODELS)}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MODELS[name](**kwargs)
    return MODELS[name](**kwargs)


def fit(model: nn.Module, loader: Iterable, *, epochs: int = 5, lr: float = 0.05, momentum: float = 0.9,
        weight_decay: float = 5e-4, seed: int = 0) -> nn.Module:
    """Train ``model`` in place with SGD + cross-entropy on ``(inputs, labels [B] int64)`` batches; returns it."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                out = call_model(model, x)                        # the batch moves to the model's device
                nn.functional.cross_entropy(out, y.to(out.device)).backward()
                opt.step()
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Architectures for the maintenance operators: residual, depthwise-separable, transformer.

class BasicBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus a shortcut (identity, or 1×1 conv + BN when the shape changes), then ReLU.

    ``[B, C_in, H, W] -> [B, C_out, H/stride, W/stride]`` float32.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(out_channels), nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem Conv-BN-ReLU, residual :class:`BasicBlock` stages (the first block of a stage downsamples
    with a 1×1-conv shortcut when its stride is 2), global average pooling and a linear head.

    Args:
        in_channels: C of ``[B, C, H, W]`` float32 inputs. stem: stem channels.
        stages: ``(channels, stride)`` per stage, one block each. num_classes: K.
    """

    def __init__(self, in_channels: int = 1, stem: int = 16, stages: Sequence = ((16, 1), (32, 2)),
                 num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU())
        blocks, c = [], stem
        for out, stride in stages:
            blocks.append(BasicBlock(c, out, stride))
            c = out
        self.blocks = nn.Sequential(*blocks)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.blocks(self.stem(x)))))


class SeparableNet(nn.Module):
    """Depthwise-separable CNN (MobileNet-style): stem Conv-BN-ReLU, then per block a depthwise 3×3
    Conv-BN-ReLU (``groups = channels``) and a pointwise 1×1 Conv-BN-ReLU; average pooling, linear head.

    ``[B, C, H, W]`` float32 ``-> [B, K]``. ``channels``: pointwise outputs per block.
    """

    def __init__(self, in_channels: int = 1, stem: int = 16, channels: Sequence[int] = (32, 32),
                 num_classes: int = 10):
        super().__init__()
        layers = [nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()]
        c = stem
        for i, out in enumerate(channels):
            layers += [nn.Conv2d(c, c, 3, stride=2 if i == 0 else 1, padding=1, groups=c, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(x))))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block on ``[B, T, D]``: x + MHA(LN(x)), then x + FFN(LN(x)) with
    FFN = Linear(D, F) → GELU → Linear(F, D). The FFN's hidden units (``ffn1``'s outputs) are its neurons."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn1, self.act, self.ffn2 = nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn2(self.act(self.ffn1(self.ln2(x))))


class TransformerClassifier(nn.Module):
    """A small transformer encoder classifier for images: each of the H rows of ``[B, 1, H, W]`` float32
    is a token of W features; Linear embedding plus learned positions, :class:`EncoderBlock` s, a final
    LayerNorm, mean over tokens and a linear head ``-> [B, K]``."""

    def __init__(self, tokens: int = 8, features: int = 8, dim: int = 32, heads: int = 4, ffn: int = 64,
                 depth: int = 2, num_classes: int = 10):
        super().__init__()
        self.flatten = nn.Flatten(1, 2)          # [B, 1, H, W] -> [B, H, W]
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Embedding(tokens, dim)
        self.register_buffer("positions", torch.arange(tokens), persistent=False)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.flatten(x)) + self.pos(self.positions)
        return self.head(self.norm(self.blocks(h)).mean(1))


MODELS.update({
    "digits_resnet": lambda **kw: ResNet(**{"in_channels": 1, "stem": 16, "stages": ((16, 1), (32, 2)),
                                            "num_classes": 10, **kw}),
    "digits_separable": lambda **kw: SeparableNet(**{"in_channels": 1, "stem": 16, "channels": (32, 32),
                                                     "num_classes": 10, **kw}),
    "digits_transformer": lambda **kw: TransformerClassifier(**{"tokens": 8, "features": 8, "dim": 32, "heads": 4,
                                                                "ffn": 64, "depth": 2, "num_classes": 10, **kw}),
})
__all__ += ["ResNet", "BasicBlock", "SeparableNet", "EncoderBlock", "TransformerClassifier"]

for _name, _factory in MODELS.items():   # model files and --model may name these alone
    register_factory(_name, _factory)
