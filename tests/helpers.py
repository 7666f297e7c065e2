"""Small helpers shared by more than one test module (test modules never import each other)."""
from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import torch
from torch import nn

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if tag in ("link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))


def check_page(folder: Path) -> list:
    """Parse index.html: every image it references exists beside it and decodes as a PNG; nothing external."""
    import matplotlib.image as mpimg
    parser = _Refs()
    parser.feed((folder / "index.html").read_text())
    assert parser.images and not parser.links
    for src in parser.images:
        assert "/" not in src and not src.startswith("http")
        data = (folder / src).read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
        img = mpimg.imread(folder / src)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    return parser.images


class TokenNet(nn.Module):
    """Embedding → FFN (Linear-GELU-Linear) → head, channels-last [B, T, ·]; per-token or pooled logits."""

    def __init__(self, pooled: bool):
        super().__init__()
        torch.manual_seed(2)
        self.pooled = pooled
        self.emb = nn.Embedding(20, 8)
        self.ffn1, self.act, self.ffn2 = nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, tok):
        h = self.ffn2(self.act(self.ffn1(self.emb(tok))))
        return self.head(h.mean(1) if self.pooled else h)


def token_data(per_token: bool):
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, 20, (12, 5), generator=g)
    y = tok % 4 if per_token else tok[:, 0] % 4
    return [(tok[:6], y[:6]), (tok[6:], y[6:])]


class WideHead(nn.Module):
    """Flatten → Linear(64, 12) → ReLU → Poison → Linear(12, 10) → ReLU → Linear(10, K): a K-output MLP for
    profiling with many classes, most of them absent from a batch. ``poison = True`` makes the activations
    between the two hidden layers infinite, so the second layer's tap is non-finite and the first's is not."""

    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(4)
        self.fc1, self.act1 = nn.Linear(64, 12), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(12, 10), nn.ReLU()
        self.head = nn.Linear(10, k)
        self.poison = False

    def forward(self, x):
        h = self.act1(self.fc1(x.flatten(1)))
        if self.poison:
            h = h * float("inf")
        return self.head(self.act2(self.fc2(h)))


def spread_labels(y: torch.Tensor, k: int) -> torch.Tensor:
    """Labels in ``[0, 10)`` as classes of ``[0, k)``: c mod k for k ≤ 10; c·(k // 10) + 1 otherwise, so with
    k = 500 a batch holds at most 10 of the 500 classes, none of them class 0."""
    return y % k if k <= 10 else y * (k // 10) + 1


def physical_equals_mask(model, slices, keep, example_inputs, other_inputs):
    """Restructure ``model`` to the classes ``keep`` in mask and physical mode: the physical outputs on
    ``other_inputs`` equal mask mode's (≤ 1e-4 relative) and ``compression_rate`` counts exactly the parameters
    removed. Returns the physical model (a ``RestructuredModel``) and, per attention block of the slices, the
    heads it keeps."""
    import neuslice
    from neuslice.engine import heads
    from neuslice.engine.capture import call_model
    masked, _ = neuslice.restructure(model, slices, keep, mode="mask")
    phys, rep = neuslice.restructure(model, slices, keep, example_inputs=example_inputs)
    with torch.no_grad():
        ym, yp = call_model(masked, other_inputs), call_model(phys, other_inputs)
    assert (yp - ym).abs().max() <= 1e-4 * ym.abs().max()
    total = sum(p.numel() for p in model.parameters())
    assert round(slices.compression_rate(model, keep) * total) == total - phys.num_params == total - rep.params
    m = slices.mask(keep)
    left = {a: a.heads - int((~heads.unit_keep(a, {n: m[n].unsqueeze(0) for n in (a.q[0], a.k[0], a.v[0])})[0]).sum())
            for a in slices.attention}
    return phys, left
