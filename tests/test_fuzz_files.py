"""docs/method.md §5: fuzzing the profile, slices and model file loaders.

Every damaged file (truncated, extended, bit-flipped in the header or the payload, its metadata mutated
and re-serialised, with or without a recomputed checksum) must either load as exactly what the file says
(the original object when the damage is undone by the checksum, or what a re-hashed file describes) or
raise FileFormatError / SignatureError. Anything else, a different object loaded silently or another
exception, is counted and fails the test. The default suite samples; ``-m slow`` flips every header bit.
"""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuslice
from neuslice import FileFormatError, Profile, SignatureError, Slices
from neuslice.io import container
from neuslice.io.modelfile import read_weights, save_model

OK_ERRORS = (FileFormatError, SignatureError)


class _Res(nn.Module):
    """Three sliced layers, a residual add (a coupled group) and a head: every metadata field is non-trivial."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.fc0(x))
        h = h + F.relu(self.fc1(h))
        return self.head(F.relu(self.fc2(h)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Res().eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{kind: (loader, path, bytes, original object)}`` for a profile, slices and a model file."""
    d = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(1)
    x, y = torch.randn(30, 6), torch.arange(30) % 3
    prof = neuslice.profile(_model(), [(x, y)], 3, progress=False, class_names=["a", "b", "c"])
    assert prof.coupled and prof.heads
    sl = neuslice.semantic_slice(prof, "ens", 0.9, share=0.6, tau=0.4, min_keep=2)
    out = {}
    for kind, obj, load in (("profile", prof, Profile.load), ("slices", sl, Slices.load)):
        path = d / f"{kind}.safetensors"
        obj.save(path)
        out[kind] = (load, path, path.read_bytes(), _canon(load(path)))
    path = d / "model.safetensors"
    save_model(path, _model(), spec="fuzz:model")

    def load_model_file(p):          # the path every model file takes (load_model reads it so)
        return read_weights(p)
    out["model"] = (load_model_file, path, path.read_bytes(), _canon(load_model_file(path)))
    return out


# -- what an object says, comparably ------------------------------------------------------------------

def _norm(v):
    """JSON-like value with bools and numbers kept apart (True ≠ 1) but 1 == 1.0."""
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, (int, float)):
        return ("num", float(v))
    if isinstance(v, (list, tuple)):
        return ("list", tuple(_norm(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _norm(x)) for k, x in v.items())))
    return (type(v).__name__, v)


def _tensors(ts: dict) -> tuple:
    return tuple(sorted((k, str(t.dtype), tuple(t.shape), t.numpy().tobytes()) for k, t in ts.items()))


def _canon(obj):
    """(metadata, tensors) of a loaded object, as the file would hold them."""
    if isinstance(obj, tuple):                   # a model file: (tensors, doc)
        tensors, doc = obj
        return _norm(doc), _tensors(tensors)
    meta = {"layers": obj.layers, "heads": obj.heads, "class_names": obj.class_names, "coupled": obj.coupled,
            "signature": obj.signature}
    if isinstance(obj, Profile):
        meta.update(metrics=list(obj.metrics), target=obj.target, deeplift=obj.deeplift, num_batches=obj.num_batches)
        tensors = {f"{i}.{k}": v for i, n in enumerate(obj.layer_names) for k, v in obj.stats[n].items()}
    else:
        meta.update(mode=obj.mode, metric=obj.metric, value=obj.value, share=obj.share, tau=obj.tau,
                    min_keep=obj.min_keep)
        tensors = {"sliced": obj.sliced, **{f"{i}.critical": obj.critical_sets[n] for i, n in
                                            enumerate(obj.layer_names)},
                   **{f"{i}.scores": obj.scores[n] for i, n in enumerate(obj.layer_names)}}
    return _norm({"format_version": container.FORMAT_VERSION, "kind": "profile" if isinstance(obj, Profile)
                  else "slices", **meta}), _tensors(tensors)


def _says(blob: bytes):
    """What a well-formed file says (its metadata and tensors), or None when it cannot be parsed."""
    try:
        n = int.from_bytes(blob[:8], "little")
        doc = json.loads(json.loads(blob[8:8 + n])["__metadata__"]["neuslice"])
        from safetensors.torch import load
        return _norm(doc), _tensors(load(blob))
    except Exception:
        return None


# -- running one case -------------------------------------------------------------------------------

def _try(files, kind: str, blob: bytes, counts: Counter, *, resealed: bool = False) -> None:
    """Load ``blob`` as a ``kind`` file and count the outcome."""
    load, path, original, canon = files[kind]
    path.unlink()           # a new file, not a truncated one: ext4 flushes on truncation (3 ms a case)
    path.write_bytes(blob)
    try:
        got = _canon(load(path))
    except OK_ERRORS:
        counts["error"] += 1
        return
    except Exception as e:   # noqa: BLE001 - any other exception is a finding
        counts["other exception"] += 1
        counts.setdefault("examples", []).append(f"{type(e).__name__}: {e}")
        return
    if got == canon:
        counts["identical"] += 1
    elif resealed and got == _says(blob):
        counts["what the file says"] += 1    # a well-formed file re-hashed after its edit: a faithful load
    else:
        counts["silent different"] += 1
        counts.setdefault("examples", []).append(f"{kind}: {len(blob)} bytes loaded as a different object")


def _header_len(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


def _flip(blob: bytes, bit: int) -> bytes:
    b = bytearray(blob)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def _reseal(blob: bytes):
    try:
        return container.seal(blob)
    except Exception:
        return None


def _rebuild(blob: bytes, doc) -> bytes:
    """``blob`` with its neuslice metadata replaced by ``doc`` (re-serialised; the old digest kept)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["__metadata__"]["neuslice"] = json.dumps(doc)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[n + 8:]


_POOL = [None, True, False, 0, 1, -1, 2, 3, 0.5, 1.5, -0.5, 1e308, 1e-300, float("nan"), float("inf"), "", "x",
         "avg", "ens", "logit", "loss", "semantic", "global", "rescale", "gradient", "fc0", "fc1", "head", "Linear",
         "layer", [], [1], ["fc0", "fc1"], [["fc0"]], {}, {"name": "fc0"}, 10 ** 20, "0" * 64]


def _paths(v, prefix=()):
    yield prefix
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, prefix + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, prefix + (i,))


def _mutate(doc, rng: random.Random):
    doc = json.loads(json.dumps(doc))
    path = rng.choice([p for p in _paths(doc) if p])
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key, old = path[-1], parent[path[-1]]
    action = rng.random()
    if action < 0.15:
        del parent[key]                                   # a missing key / a shorter list
    elif action < 0.25 and isinstance(parent, list):
        parent.insert(key, old)                           # a duplicate entry
    elif action < 0.4 and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = old + rng.choice([-1, 1, 0.25, -0.25, 1e-9])   # near the original
    elif action < 0.5 and isinstance(old, str):
        parent[key] = old + rng.choice(["", "x", " "])[:1] if old else "y"
    else:
        parent[key] = rng.choice(_POOL)
    return doc


def _fuzz(files, kind: str, *, header_bits, resealed_bits, payload_flips: int, truncations: int, mutations: int,
          seed: int = 0):
    rng = random.Random(seed)
    blob = files[kind][2]
    n = _header_len(blob)
    res = {what: Counter() for what in ("header flips", "header flips re-hashed", "payload flips", "truncations",
                                        "metadata mutations", "metadata mutations re-hashed")}
    bits = range(8 * n) if header_bits is None else rng.sample(range(8 * n), min(header_bits, 8 * n))
    for i, bit in enumerate(bits):
        damaged = _flip(blob, bit)
        _try(files, kind, damaged, res["header flips"])
        if kind != "model" and (resealed_bits is None or i < resealed_bits):
            resealed = _reseal(damaged)
            if resealed is not None:
                _try(files, kind, resealed, res["header flips re-hashed"], resealed=True)
    for _ in range(payload_flips):
        _try(files, kind, _flip(blob, rng.randrange(8 * n, 8 * len(blob))), res["payload flips"])
    for _ in range(truncations):
        cut = rng.randrange(len(blob))
        _try(files, kind, blob[:cut] if rng.random() < 0.8 else blob + blob[cut:cut + 8], res["truncations"])
    doc = json.loads(json.loads(blob[8:n])["__metadata__"]["neuslice"])
    for _ in range(mutations if kind != "model" else 0):
        damaged = _rebuild(blob, _mutate(doc, rng))
        _try(files, kind, damaged, res["metadata mutations"])
        _try(files, kind, container.seal(damaged), res["metadata mutations re-hashed"], resealed=True)
    files[kind][1].unlink()
    files[kind][1].write_bytes(blob)
    return {k: v for k, v in res.items() if v}


def _check(kind: str, res: dict) -> None:
    lines = [f"{kind} {what}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k != "examples")
             for what, c in res.items()]
    print("\n" + "\n".join(lines))
    bad = {what: c for what, c in res.items() if c["other exception"] or c["silent different"]}
    examples = [e for c in bad.values() for e in c.get("examples", [])[:3]]
    assert not bad, "\n".join(lines + examples)
    for what in ("header flips", "payload flips", "truncations", "metadata mutations"):
        assert res.get(what, Counter())["identical"] == 0 or what == "metadata mutations", (what, lines)


@pytest.mark.parametrize("kind", ["profile", "slices", "model"])
def test_fuzz_file_loaders(files, kind):
    """Sampled: 4,000 header flips per file type (they stop at the checksum), 500 of them re-hashed (they
    reach the validation), a few hundred of everything else; about a second of CPU per file type."""
    res = _fuzz(files, kind, header_bits=4000, resealed_bits=500, payload_flips=200, truncations=200, mutations=200)
    assert res["header flips"].total() >= 4000
    _check(kind, res)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["profile", "slices", "model"])
def test_fuzz_file_loaders_exhaustive(files, kind):
    """Every bit of the header, re-hashed or not, and thousands of payload flips, truncations, mutations."""
    res = _fuzz(files, kind, header_bits=None, resealed_bits=None, payload_flips=3000, truncations=3000,
                mutations=5000, seed=1)
    _check(kind, res)
