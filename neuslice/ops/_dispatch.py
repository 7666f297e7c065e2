"""THE single point that picks a backend for an op call.

Backends declare what they can run: ``refuse(op, args)`` returns None when the backend can run
this call, or a sentence saying why not. The first backend in the device's order that does not
refuse runs the call:

    CUDA tensors: triton -> cuda -> reference  (accumulate_: cuda -> triton -> reference, ORDER_BY_OP)
    CPU tensors:  cpu -> reference

``NEUSLICE_BACKEND=<name>`` (read at every call) forces one backend; when it cannot run the call,
:class:`~neuslice._errors.BackendError` lists every backend and why it refused. Backends whose
module cannot be imported (no ``_C``, no Triton) refuse with the import error as the reason, so a
missing build lowers speed but never breaks ``import neuslice``.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Dict, Optional, Tuple

import torch

from .._errors import BackendError

__all__ = ["call", "choose", "pick", "backends", "refusals", "implementation", "import_error", "ORDER", "ORDER_BY_OP",
           "ENV"]

ENV = "NEUSLICE_BACKEND"
ORDER: Dict[str, Tuple[str, ...]] = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
# Per op and device type, where the device's order does not suit the op. accumulate_ on CUDA: cuda first.
# The engine calls it once per tap per step, so per-call host time decides: on an H200, Profiler around an
# AdamW step of a BERT-base encoder took 78 ms with cuda against 148 ms with triton (bare step 60 ms), and
# 105 against 141 ms on a ViT-B/16 (bench/gpu_engine.py, gpu_engine_NVIDIA-H200_2026-11-30.md): the Triton
# launch and its ~10 torch ops cost about 1 ms of host time per call. Triton's kernel stays faster on the
# largest tensors alone (gpu_check: B=16 S=2048 N=14336 bf16, 1.48 against 1.86 ms), where forcing it pays.
ORDER_BY_OP: Dict[Tuple[str, str], Tuple[str, ...]] = {("accumulate_", "cuda"): ("cuda", "triton", "reference")}
# name -> module that defines `refuse(op, args) -> Optional[str]` and one function per op.
_MODULES = {
    "reference": "neuslice.ops._backend_reference",
    "cpu": "neuslice.ops._backend_cpu",
    "cuda": "neuslice.ops._backend_cuda",
    "triton": "neuslice._triton.backend",
}
# os.environ keeps its values in a dict of bytes on POSIX (``_data``, updated by every os.environ
# change, monkeypatch.setenv included): one lookup there, where os.environ.get runs four Python-level
# calls (33 us from a cold cache against ~3 us, measured after bench/harness.py's cache flush).
# Elsewhere, or where a Python lacks that store, os.environ.get.
_POSIX = os.name == "posix"
_ENV_KEY = os.fsencode(ENV)
_FS_ENCODING = sys.getfilesystemencoding()
_loaded: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}


def backends() -> Tuple[str, ...]:
    """Names of every backend, known or not importable."""
    return tuple(_MODULES)


def _module(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as e:  # a missing _C or Triton must never break import neuslice
        _import_errors[name] = f"cannot be imported ({type(e).__name__}: {e})"
        return None
    _loaded[name] = mod
    return mod


def _refusal(name: str, op: str, args: tuple) -> Optional[str]:
    mod = _module(name)
    if mod is None:
        return _import_errors[name]
    if not hasattr(mod, op):
        return f"does not implement {op}"
    return mod.refuse(op, args)


def _device_type(args: tuple) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def refusals(op: str, args: tuple) -> Dict[str, Optional[str]]:
    """For every backend, None if it would run ``op`` on ``args``, else why it would not."""
    return {name: _refusal(name, op, args) for name in _MODULES}


def _forced() -> str:
    """``NEUSLICE_BACKEND`` as os.environ holds it now, stripped ("" when unset)."""
    store = getattr(os.environ, "_data", None) if _POSIX else None
    if type(store) is not dict:
        return os.environ.get(ENV, "").strip()
    raw = store.get(_ENV_KEY)
    return "" if raw is None else raw.decode(_FS_ENCODING, "surrogateescape").strip()


def choose(op: str, args: tuple, device: Optional[str] = None) -> str:
    """Name of the backend that runs ``op`` on ``args`` (honouring ``NEUSLICE_BACKEND``).

    ``device``: the device type of ``args``' tensors when the caller has checked that they share one
    (the op front doors have); None finds it from the first tensor, as the caller would."""
    forced = _forced()
    if forced:
        if forced not in _MODULES:
            raise BackendError(f"neuslice: {ENV}={forced!r} names no backend; "
                               f"expected one of {', '.join(_MODULES)}")
        if _refusal(forced, op, args) is None:
            return forced
        detail = "; ".join(f"{n}: {r or 'would run'}" for n, r in refusals(op, args).items())
        raise BackendError(f"neuslice.{op}: backend {forced!r} was forced ({ENV}={forced}) "
                           f"but cannot run this call. Backends: {detail}")
    if device is None:
        device = _device_type(args)
    order = ORDER_BY_OP.get((op, device)) or ORDER.get(device, ("reference",))
    for name in order:
        if _refusal(name, op, args) is None:
            return name
    detail = "; ".join(f"{n}: {_refusal(n, op, args)}" for n in order)
    raise BackendError(f"neuslice.{op}: no backend can run this call on {device}. Backends: {detail}")


def pick(op: str, args: tuple, device: Optional[str] = None) -> Tuple[str, Callable]:
    """:func:`choose`'s backend and its function for ``op`` (a front door that first needs to know
    which backend runs the call, then runs it)."""
    name = choose(op, args, device)
    return name, getattr(_loaded[name], op)


def call(op: str, *args):
    """Run ``op`` on the chosen backend. Arguments were checked by :mod:`neuslice.ops`."""
    fn: Callable = getattr(_module(choose(op, args)), op)
    return fn(*args)


def implementation(name: str, op: str) -> Callable:
    """Backend ``name``'s function for ``op`` with no argument checks (benchmarks time it alone)."""
    mod = _module(name)
    if mod is None:
        raise BackendError(f"neuslice: backend {name!r} {_import_errors[name]}")
    return getattr(mod, op)


def import_error(name: str) -> Optional[str]:
    """Why backend ``name``'s module could not be imported, or None."""
    _module(name)
    return _import_errors.get(name)
