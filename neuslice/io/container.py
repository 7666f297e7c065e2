"""safetensors files with JSON metadata (docs/method.md §5): atomic writes, checksummed and validated reads,
model signatures.

A file is plain safetensors: tensors plus a ``__metadata__`` entry ``"neuslice"`` holding one JSON
document, and ``"sha256"``: the digest of the **whole file** with those 64 hex digits read as zeros (the
length prefix, the header with every tensor's name, dtype, shape and offsets, the metadata, and the tensor
payload), so a corrupt or truncated file is an error, never a partial or different result. Nothing is ever
unpickled. :class:`Fields` reads the document field by field; every failure names the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import stat
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from .._errors import NeusliceError

__all__ = ["FORMAT_VERSION", "FileFormatError", "SignatureError", "write", "read", "expect", "Fields",
           "layer_entry", "signature", "check_model", "compare_layers", "write_atomic"]

# 2: the sha256 covers the whole file (1: the tensor payload only); layer sets record the model's head
FORMAT_VERSION = 2

_MARK = b'"sha256":"'
_ZEROS = b"0" * 64
_HEX = re.compile(rb"[0-9a-f]{64}")
_TMP = re.compile(r"\.neuslice-(\d+)-[0-9a-f]+\.tmp")
_MAX_HEADER = 100 << 20     # safetensors' own limit on the JSON header


class FileFormatError(NeusliceError, ValueError):
    """A file is not a valid neuslice file of the expected kind (truncated, corrupt, other kind, bad field)."""


class SignatureError(NeusliceError, ValueError):
    """A file's layers do not match a model's."""


# -- layers and signatures --------------------------------------------------------------------------

def layer_entry(name: str, module: nn.Module) -> dict:
    """JSON description of one sliced layer: name, module type and weight shape."""
    return {"name": name, "type": type(module).__name__, "weight_shape": list(module.weight.shape)}


def signature(entries: Sequence[dict], heads: Sequence[dict] = ()) -> str:
    """Hash of the sliced layers' names, types, weight shapes and widths ``n`` in order, and of the model's
    head(s) (name, type, ``n``) (docs/method.md §5; hex, 16 digits)."""
    doc = [[e["name"], e["type"], list(e["weight_shape"]), e.get("n")] for e in entries]
    if heads:
        doc.append([[h["name"], h["type"], h["n"]] for h in heads])
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:16]


def _describe(e: Optional[dict], unit: str) -> str:
    if e is None:
        return "missing"
    shape = f" with weight {list(e['weight_shape'])}" if "weight_shape" in e else ""
    return f"{e['name']!r} ({e['type']}{shape}, {e['n']} {unit})"


def compare_layers(fn: str, what: str, expected: Sequence[dict], found: Sequence[dict]) -> None:
    """Raise :class:`SignatureError` naming the first position where ``found`` (the model's) differs from
    ``expected`` (the file's) in name, type, width ``n`` or weight shape, or has a layer more or less."""
    keys = ("name", "type", "n", "weight_shape")
    for i in range(max(len(expected), len(found))):
        e = expected[i] if i < len(expected) else None
        f = found[i] if i < len(found) else None
        if e is not None and f is not None and all(e.get(k) == f.get(k) for k in keys if k in e and k in f):
            continue
        where = f"{what} {i + 1}" if max(len(expected), len(found)) > 1 else what
        unit = "outputs" if what == "head" else "neurons"
        raise SignatureError(f"{fn}: the file was made for another model: {where} is {_describe(e, unit)} in the "
                             f"file but {_describe(f, unit)} in this model")


def _wrapper_error(fn: str, model: nn.Module, name: str) -> str:
    """The error when ``model`` wraps the model that holds layer ``name`` (else ""): torch.compile's wrapper
    (whose compiled code does not see hooks added to the model, so slices apply to the bare model) or
    DistributedDataParallel / DataParallel."""
    if isinstance(getattr(model, "_orig_mod", None), nn.Module) and name in dict(model._orig_mod.named_modules()):
        return (f"{fn}: model is torch.compile's wrapper of the model the file was made for: pass the model you "
                "compiled (model._orig_mod); a compiled model's code does not see the hooks that apply slices")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and \
            name in dict(model.module.named_modules()):
        return (f"{fn}: model is a {type(model).__name__} wrapper of the model the file was made for: pass the "
                "model it wraps (model.module)")
    return ""


def check_model(fn: str, entries: Sequence[dict], model: nn.Module) -> None:
    """Raise :class:`SignatureError` naming the first layer of ``entries`` that ``model`` lacks or shapes
    differently (names, types and weight shapes; ``neuslice.engine`` adds order, widths and the head)."""
    modules = dict(model.named_modules())
    for e in entries:
        m = modules.get(e["name"])
        if m is None:
            raise SignatureError(_wrapper_error(fn, model, e["name"]) or
                                 f"{fn}: the file was made for another model: layer {e['name']!r} "
                                 f"({e['type']} with weight {e['weight_shape']}) is not in this model")
        got = layer_entry(e["name"], m) if isinstance(getattr(m, "weight", None), torch.Tensor) else None
        if got is None or got["type"] != e["type"] or got["weight_shape"] != list(e["weight_shape"]):
            have = "no weight" if got is None else f"{got['type']} with weight {got['weight_shape']}"
            raise SignatureError(f"{fn}: the file was made for another model: layer {e['name']!r} is "
                                 f"{e['type']} with weight {list(e['weight_shape'])} in the file but {have} "
                                 "in this model")


# -- the checksum -------------------------------------------------------------------------------------

def _digest(blob: bytes, at: int) -> str:
    """SHA-256 of ``blob`` with the 64 digest characters at ``at`` read as zeros."""
    h = hashlib.sha256(blob[:at])
    h.update(_ZEROS)
    h.update(blob[at + 64:])
    return h.hexdigest()


def _digest_at(header: bytes) -> int:
    """Offset (within the file) of the digest's 64 characters; -1 unless exactly one ``"sha256":"…"``."""
    i = header.find(_MARK)
    if i < 0 or header.find(_MARK, i + 1) >= 0:
        return -1
    return 8 + i + len(_MARK)


def seal(blob: bytes) -> bytes:
    """``blob`` (a safetensors file whose metadata holds ``"sha256"``) with its digest recomputed."""
    n = int.from_bytes(blob[:8], "little")
    at = _digest_at(blob[8:8 + n])
    if at < 0:
        raise ValueError("no single sha256 entry in the header")
    return blob[:at] + _digest(blob, at).encode() + blob[at + 64:]


def encode(kind: str, tensors: Dict[str, torch.Tensor], meta: dict) -> bytes:
    """The bytes of a neuslice file: ``tensors`` (CPU copies) and ``meta`` under ``kind``, sealed."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    doc = {"format_version": FORMAT_VERSION, "kind": kind, **meta}
    text = json.dumps(doc, allow_nan=False)
    return seal(_st_save(cpu, metadata={"neuslice": text, "sha256": _ZEROS.decode()}))


# -- writing ------------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:           # EPERM: another user's process
        return True
    return True


def _sweep(folder: str) -> None:
    """Remove temporary files of earlier saves into ``folder`` whose writer process is gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TMP.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _os_error(fn: str, path: str, e: OSError, tmp: Optional[str]) -> OSError:
    """``e`` reworded to name the user's ``path`` (never the temporary file)."""
    text = e.strerror or str(e)
    if tmp:
        text = text.replace(tmp, path).replace(os.path.basename(tmp), os.path.basename(path))
    msg = f"{fn}: cannot write {path!r}: {text}"
    return OSError(e.errno, msg) if e.errno is not None else OSError(msg)


def write(fn: str, path, kind: str, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` (any device; saved from CPU copies) and ``meta`` atomically to ``path``
    (docs/method.md §5), as :func:`write_atomic` does."""
    write_atomic(fn, path, encode(kind, tensors, meta))


def write_atomic(fn: str, path, blob: bytes) -> None:
    """``blob`` to ``path`` whole or not at all: a temporary file in the target's folder, ``fsync``, rename.
    A symlink at ``path`` stays and its target is replaced; the file's mode follows the umask; errors name
    ``path``; temporary files of dead writers in that folder are removed first."""
    path = os.fspath(path)
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    _sweep(folder)
    tmp = None
    try:
        tmp = os.path.join(folder, f".neuslice-{os.getpid()}-{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = None
        finally:
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise _os_error(fn, path, e, tmp) from None
    try:                      # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# -- reading ------------------------------------------------------------------------------------------

def _read_regular(fn: str, path: str) -> bytes:
    """The bytes of the regular file ``path``; a FIFO, device or folder is refused without blocking, and
    no more than the size ``stat`` reported is read."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise FileFormatError(f"{fn}: {path!r} is not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileFormatError(f"{fn}: {path!r} is not a regular file")
            chunks, left = [], st.st_size
            while left > 0:
                b = os.read(fd, min(left, 1 << 24))
                if not b:
                    break
                chunks.append(b)
                left -= len(b)
            return b"".join(chunks)
        finally:
            os.close(fd)
    except OSError as e:
        msg = f"{fn}: cannot read {path!r}: {e.strerror or e}"
        raise (OSError(e.errno, msg) if e.errno is not None else OSError(msg)) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _json(text) -> object:
    return json.loads(text, parse_constant=_no_constant)


def read(fn: str, path, kind: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`write`; :class:`FileFormatError` on anything but a whole, valid file of
    ``kind`` (docs/method.md §5). The returned document is checksummed but not yet validated: read its
    fields through :class:`Fields`."""
    path = os.fspath(path)
    blob = _read_regular(fn, path)
    bad = f"{fn}: {path!r} is not a valid neuslice {kind} file"
    n = int.from_bytes(blob[:8], "little")
    if len(blob) < 10 or not 2 <= n <= min(len(blob) - 8, _MAX_HEADER):
        raise FileFormatError(f"{bad} (truncated or corrupt: a header of {n} bytes in a file of {len(blob)} "
                              "bytes)")
    at = _digest_at(blob[8:8 + n])
    if at < 0 or not _HEX.fullmatch(blob[at:at + 64]) or blob[at + 64:at + 65] != b'"':
        raise FileFormatError(f"{bad} (truncated or corrupt: no sha256 checksum in its header)")
    if _digest(blob, at) != blob[at:at + 64].decode():
        raise FileFormatError(f"{bad} (corrupt: the file does not match its sha256 checksum{_old(blob, n)})")
    try:
        header = _json(blob[8:8 + n])
        md = header["__metadata__"]
        doc = _json(md["neuslice"])
        if not isinstance(doc, dict):
            raise TypeError(f"the metadata is a {type(doc).__name__}, not an object")
        tensors = _st_load(blob)
    except Exception as e:    # safetensors raises its own error types; json, KeyError, TypeError: all "corrupt"
        raise FileFormatError(f"{bad} (corrupt: {type(e).__name__}: {e})") from None
    if doc.get("kind") != kind:
        raise FileFormatError(f"{bad} (it holds a {doc.get('kind')!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(f"{bad} (format version {doc.get('format_version')!r}; this neuslice reads "
                              f"version {FORMAT_VERSION} only: re-create the file)")
    return tensors, doc


def _old(blob: bytes, n: int) -> str:
    """A hint when the checksum failed because the file is of format version 1 (payload-only sha256)."""
    try:
        md = _json(blob[8:8 + n])["__metadata__"]
        if _json(md["neuslice"]).get("format_version") == 1 and \
                hashlib.sha256(blob[8 + n:]).hexdigest() == md["sha256"]:
            return ("; it was written by an older neuslice in format version 1, which this neuslice no longer "
                    "reads: re-create it")
    except Exception:
        pass
    return ""


def expect(fn: str, path, tensors: Dict[str, torch.Tensor], key: str, shape: List[int], dtype) -> torch.Tensor:
    """``tensors[key]`` checked for shape and dtype (a file that passes its checksum can still be foreign)."""
    t = tensors.get(key)
    if t is None or list(t.shape) != list(shape) or t.dtype != dtype:
        got = "missing" if t is None else f"{list(t.shape)} {t.dtype}"
        raise FileFormatError(f"{fn}: {os.fspath(path)!r} is not a valid neuslice file: tensor {key!r} must be "
                              f"{list(shape)} {dtype}, got {got}")
    return t


# -- validated fields ------------------------------------------------------------------------------

class Fields:
    """Typed, range-checked access to the metadata document of one file (docs/method.md §5): every failure
    is a :class:`FileFormatError` naming the file and the field."""

    def __init__(self, fn: str, path, kind: str, doc: dict, tensors: Dict[str, torch.Tensor]):
        self.fn, self.path, self.kind, self.doc, self.tensors = fn, os.fspath(path), kind, doc, tensors
        self.used = set()

    def error(self, field: str, problem: str) -> FileFormatError:
        return FileFormatError(f"{self.fn}: {self.path!r} is not a valid neuslice {self.kind} file: "
                               f"field {field!r} {problem}")

    def get(self, key: str, field: Optional[str] = None, obj: Optional[dict] = None):
        obj = self.doc if obj is None else obj
        if not isinstance(obj, dict) or key not in obj:
            raise self.error(field or key, "is missing")
        return obj[key]

    def str(self, value, field: str, choices: Optional[Iterable] = None, *, none: bool = False):
        if value is None and none:
            return None
        choices = tuple(choices) if choices is not None else None
        if not isinstance(value, str) or not value or (choices is not None and value not in choices):
            want = f"one of {choices}" if choices is not None else "a non-empty string"
            raise self.error(field, f"must be {want}{' or null' if none else ''}, got {_short(value)}")
        return value

    def int(self, value, field: str, lo: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise self.error(field, f"must be an integer >= {lo}, got {_short(value)}")
        return value

    def number(self, value, field: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (lo < value <= hi if open_lo else lo <= value <= hi):
            raise self.error(field, f"must be a number in {'(' if open_lo else '['}{lo:g}, {hi:g}], got "
                                    f"{_short(value)}")
        return float(value)

    def list(self, value, field: str) -> list:
        if not isinstance(value, list):
            raise self.error(field, f"must be a list, got {_short(value)}")
        return value

    def names(self, value, field: str, *, nonempty: bool = True, choices: Optional[Iterable] = None) -> List[str]:
        """A list of distinct strings (of ``choices`` if given)."""
        out = [self.str(v, f"{field}[{i}]", choices) for i, v in enumerate(self.list(value, field))]
        if nonempty and not out:
            raise self.error(field, "must not be empty")
        if len(set(out)) != len(out):
            dup = next(v for i, v in enumerate(out) if v in out[:i])
            raise self.error(field, f"names {dup!r} twice")
        return out

    def layers(self, key: str, extra: Dict[str, object] = {}) -> List[dict]:
        """The sliced layers: ``name`` (distinct), ``type``, ``weight_shape`` (≥ 2 dims, ≥ 1 each), ``n`` =
        ``weight_shape[0]``, and the keys of ``extra`` (``key -> callable(value, field)``); only these keys."""
        out = []
        for i, e in enumerate(self.list(self.get(key), key)):
            f = f"{key}[{i}]"
            if not isinstance(e, dict):
                raise self.error(f, f"must be an object, got {_short(e)}")
            shape = self.list(self.get("weight_shape", f"{f}.weight_shape", e), f"{f}.weight_shape")
            shape = [self.int(s, f"{f}.weight_shape[{j}]", 1) for j, s in enumerate(shape)]
            if not 2 <= len(shape) <= 5:
                raise self.error(f"{f}.weight_shape", f"must have 2 to 5 dimensions, got {shape}")
            entry = {"name": self.str(self.get("name", f"{f}.name", e), f"{f}.name"),
                     "type": self.str(self.get("type", f"{f}.type", e), f"{f}.type"),
                     "weight_shape": shape,
                     "n": self.int(self.get("n", f"{f}.n", e), f"{f}.n", 1)}
            if entry["n"] != shape[0]:
                raise self.error(f"{f}.n", f"is {entry['n']} but the weight has {shape[0]} rows")
            for k, check in extra.items():
                entry[k] = check(self.get(k, f"{f}.{k}", e), f"{f}.{k}")
            out.append(entry)
        if not out:
            raise self.error(key, "must list at least one layer")
        self.names([e["name"] for e in out], f"{key}[].name")
        return out

    def heads(self, key: str = "heads") -> List[dict]:
        """The model's head(s): ``name``, ``type``, ``n`` each."""
        out = []
        for i, e in enumerate(self.list(self.get(key), key)):
            f = f"{key}[{i}]"
            if not isinstance(e, dict):
                raise self.error(f, f"must be an object, got {_short(e)}")
            out.append({"name": self.str(self.get("name", f"{f}.name", e), f"{f}.name"),
                        "type": self.str(self.get("type", f"{f}.type", e), f"{f}.type"),
                        "n": self.int(self.get("n", f"{f}.n", e), f"{f}.n", 1)})
        self.names([e["name"] for e in out], f"{key}[].name", nonempty=False)
        return out

    def coupled(self, key: str, layers: Sequence[dict]) -> List[List[str]]:
        """Disjoint groups of ≥ 2 known layer names of one width."""
        width = {e["name"]: e["n"] for e in layers}
        out, seen = [], set()
        for i, g in enumerate(self.list(self.get(key), key)):
            f = f"{key}[{i}]"
            names = self.names(g, f, choices=list(width))
            if len(names) < 2 or len({width[x] for x in names}) != 1 or seen & set(names):
                raise self.error(f, f"must name at least 2 layers of one width, each in one group only, got "
                                    f"{_short(g)}")
            seen |= set(names)
            out.append(names)
        return out

    def attention(self, key: str, layers: Sequence[dict]) -> List[dict]:
        """Attention blocks (docs/method.md §5): ``module`` (a string, may be empty), ``q``/``k``/``v``
        (``[layer name, first channel]``), ``out`` (a layer name), ``heads``, ``head_dim``, ``kv_heads`` (≥ 1,
        ``heads`` a multiple of ``kv_heads``); a q/k/v layer that is sliced must hold the block's channels.
        A file without the field (written before it existed) has none."""
        if key not in self.doc:
            return []
        width = {e["name"]: e["n"] for e in layers}
        out = []
        for i, e in enumerate(self.list(self.get(key), key)):
            f = f"{key}[{i}]"
            if not isinstance(e, dict):
                raise self.error(f, f"must be an object, got {_short(e)}")
            module = self.get("module", f"{f}.module", e)
            if not isinstance(module, str):
                raise self.error(f"{f}.module", f"must be a string, got {_short(module)}")
            entry = {"module": module}
            for n in ("heads", "head_dim", "kv_heads"):
                entry[n] = self.int(self.get(n, f"{f}.{n}", e), f"{f}.{n}", 1)
            if entry["heads"] % entry["kv_heads"]:
                raise self.error(f"{f}.heads", f"must be a multiple of kv_heads ({entry['kv_heads']}), got "
                                               f"{entry['heads']}")
            for n, count in (("q", entry["heads"]), ("k", entry["kv_heads"]), ("v", entry["kv_heads"])):
                pair = self.list(self.get(n, f"{f}.{n}", e), f"{f}.{n}")
                if len(pair) != 2:
                    raise self.error(f"{f}.{n}", f"must be [layer name, first channel], got {_short(pair)}")
                name, off = self.str(pair[0], f"{f}.{n}[0]"), self.int(pair[1], f"{f}.{n}[1]")
                if name in width and off + count * entry["head_dim"] > width[name]:
                    raise self.error(f"{f}.{n}", f"needs channels {off}..{off + count * entry['head_dim'] - 1} of "
                                                 f"layer {name!r}, which has {width[name]}")
                entry[n] = [name, off]
            entry["out"] = self.str(self.get("out", f"{f}.out", e), f"{f}.out")
            out.append(entry)
        return out

    def tensor(self, key: str, shape: List[int], dtype) -> torch.Tensor:
        self.used.add(key)
        return expect(self.fn, self.path, self.tensors, key, shape, dtype)

    def no_other_tensors(self) -> None:
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            raise FileFormatError(f"{self.fn}: {self.path!r} is not a valid neuslice {self.kind} file: "
                                  f"unexpected tensor {extra[0]!r}")

    def signature(self, layers: Sequence[dict], heads: Sequence[dict]) -> None:
        if self.get("signature") != signature(layers, heads):
            raise self.error("signature", "does not match the layers and heads")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
