"""safetensors files with JSON metadata (docs/method.md §5): atomic writes, checksummed reads, model signatures.

A file is plain safetensors: tensors plus a ``__metadata__`` entry ``"neuslice"`` holding one JSON
document, and ``"sha256"``: the digest of the tensor payload, so a corrupt or truncated file is an
error, never a partial result. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, List, Sequence, Tuple

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from .._errors import NeusliceError

__all__ = ["FORMAT_VERSION", "FileFormatError", "write", "read", "layer_entry", "signature", "check_model"]

FORMAT_VERSION = 1


class FileFormatError(NeusliceError, ValueError):
    """A file is not a valid neuslice file of the expected kind (truncated, corrupt, other kind)."""


class SignatureError(NeusliceError, ValueError):
    """A file's layers do not match a model's."""


def layer_entry(name: str, module: nn.Module) -> dict:
    """JSON description of one sliced layer: name, module type and weight shape."""
    return {"name": name, "type": type(module).__name__, "weight_shape": list(module.weight.shape)}


def signature(entries: Sequence[dict]) -> str:
    """Hash of the sliced layers' names, types and weight shapes (hex, 16 digits)."""
    doc = json.dumps([[e["name"], e["type"], list(e["weight_shape"])] for e in entries], separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def check_model(fn: str, entries: Sequence[dict], model: nn.Module) -> None:
    """Raise :class:`SignatureError` naming the first layer of ``entries`` that ``model`` lacks or shapes differently."""
    modules = dict(model.named_modules())
    for e in entries:
        m = modules.get(e["name"])
        if m is None:
            raise SignatureError(f"{fn}: the file was made for another model: layer {e['name']!r} "
                                 f"({e['type']} with weight {e['weight_shape']}) is not in this model")
        got = layer_entry(e["name"], m) if isinstance(getattr(m, "weight", None), torch.Tensor) else None
        if got is None or got["type"] != e["type"] or got["weight_shape"] != list(e["weight_shape"]):
            have = "no weight" if got is None else f"{got['type']} with weight {got['weight_shape']}"
            raise SignatureError(f"{fn}: the file was made for another model: layer {e['name']!r} is "
                                 f"{e['type']} with weight {list(e['weight_shape'])} in the file but {have} "
                                 "in this model")


def _payload(blob: bytes) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    return blob[8 + n:]


def write(fn: str, path, kind: str, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` (any device; saved from CPU copies) and ``meta`` atomically to ``path``."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    doc = {"format_version": FORMAT_VERSION, "kind": kind, **meta}
    blob = _st_save(cpu, metadata={"neuslice": json.dumps(doc)})
    digest = hashlib.sha256(_payload(blob)).hexdigest()
    blob = _st_save(cpu, metadata={"neuslice": json.dumps(doc), "sha256": digest})
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".neuslice-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read(fn: str, path, kind: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`write`; :class:`FileFormatError` on anything but a whole, valid file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    bad = f"{fn}: {path!r} is not a valid neuslice {kind} file"
    try:
        n = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 or n <= 0 or 8 + n > len(blob):
            raise ValueError(f"header of {n} bytes in a file of {len(blob)} bytes")
        header = json.loads(blob[8:8 + n])
        md = header.get("__metadata__") or {}
        doc = json.loads(md["neuslice"])
        tensors = _st_load(blob)
    except Exception as e:
        raise FileFormatError(f"{bad} (truncated or corrupt: {type(e).__name__}: {e})") from None
    if hashlib.sha256(_payload(blob)).hexdigest() != md.get("sha256"):
        raise FileFormatError(f"{bad} (corrupt: the tensor data does not match its sha256 checksum)")
    if doc.get("kind") != kind:
        raise FileFormatError(f"{bad} (it holds a {doc.get('kind')!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(f"{bad} (format version {doc.get('format_version')!r}; expected {FORMAT_VERSION})")
    return tensors, doc


def expect(fn: str, path, tensors: Dict[str, torch.Tensor], key: str, shape: List[int], dtype) -> torch.Tensor:
    """``tensors[key]`` checked for shape and dtype (a file that passes its checksum can still be foreign)."""
    t = tensors.get(key)
    if t is None or list(t.shape) != list(shape) or t.dtype != dtype:
        got = "missing" if t is None else f"{list(t.shape)} {t.dtype}"
        raise FileFormatError(f"{fn}: {os.fspath(path)!r} is not a valid neuslice file: tensor {key!r} must be "
                              f"{list(shape)} {dtype}, got {got}")
    return t
