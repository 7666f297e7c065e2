"""Model files, read without pickles and written atomically.

A model is a factory plus weights. The factory is ``package.module:factory`` (a callable returning the
``nn.Module``) or a name registered with :func:`register_factory` (the demo models of
:mod:`neuslice.models` register theirs when that module is imported). Weights are a safetensors file,
or a state dict read with ``torch.load(weights_only=True)``. Models written by :func:`save_model` are
safetensors files whose metadata names the factory, the shapes of pruned modules and, for
restructured and task-aware models, the class map, so ``load_model(weights=path)`` rebuilds them alone.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from safetensors.torch import load as st_load

from ..engine.graph import discover
from ..maintain import RestructuredModel, TaskAwareModel
from . import container
from .data import _fail

__all__ = ["register_factory", "FACTORIES", "resolve_factory", "build_model", "read_weights", "save_model",
           "load_model"]

# name -> factory: the models a file may name without a module path (see register_factory)
FACTORIES: Dict[str, Callable[..., torch.nn.Module]] = {}


def register_factory(name: str, factory: Callable[..., torch.nn.Module]) -> None:
    """Let model files and ``--model`` name ``factory`` by ``name`` alone."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"neuslice.io.register_factory: name must be a non-empty string without ':', got {name!r}")
    if not callable(factory):
        raise TypeError(f"neuslice.io.register_factory: factory must be callable, got {type(factory).__name__}")
    FACTORIES[name] = factory


_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "normalized_shape")


def resolve_factory(spec: str):
    """The callable named by ``package.module:attr[.attr]``, or a name given to :func:`register_factory`."""
    if ":" not in spec:
        if spec in FACTORIES:
            return FACTORIES[spec]
        raise ValueError(f"--model {spec!r}: expected 'package.module:factory' or one of {sorted(FACTORIES)} "
                         "(the demo models register theirs when neuslice.models is imported)")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())   # as `python -m` does: a console script finds the user's own modules too
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"--model {spec!r}: cannot import module {mod_name!r} ({e})") from None
    for part in attr.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise ValueError(f"--model {spec!r}: {mod_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise ValueError(f"--model {spec!r}: {attr!r} is not callable")
    return obj


def build_model(spec: str, model_args: Optional[dict] = None):
    """Call the factory ``spec`` with ``model_args``; it must return a ``torch.nn.Module``."""
    model = resolve_factory(spec)(**(model_args or {}))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _neuslice_meta(raw: bytes) -> Optional[dict]:
    """The JSON header of a safetensors blob (None if ``raw`` is not one)."""
    if len(raw) < 10:
        return None
    n = int.from_bytes(raw[:8], "little")
    if not (2 <= n <= len(raw) - 8) or raw[8:9] != b"{":
        return None
    try:
        return json.loads(raw[8:8 + n])
    except ValueError:
        return None


def read_weights(path) -> Tuple[dict, Optional[dict]]:
    """``(state dict, neuslice metadata or None)`` from safetensors or a ``torch.load(weights_only=True)`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    header = _neuslice_meta(raw)
    if header is not None:
        if "neuslice" in (header.get("__metadata__") or {}):
            tensors, doc = container.read("neuslice.io.read_weights", path, "model")
            return tensors, doc
        try:
            return st_load(raw), None
        except Exception as e:   # safetensors raises its own error types
            raise _fail(path, f"not a valid safetensors file (truncated or corrupt: {e})") from None
    return _torch_state(path), None


def _torch_state(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # pickle refusals, zip errors, truncation: all mean "not a weights file"
        raise _fail(path, "not a safetensors file nor a state dict that torch.load(weights_only=True) accepts "
                          f"(a pickled module is refused; save model.state_dict()): {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _fail(path, f"holds a {type(obj).__name__}, not a state dict (a dict of names to tensors)")
    return obj


def _resize(model: torch.nn.Module, state: dict, attrs: dict) -> None:
    """Give ``model`` the module attributes and tensor shapes of a pruned state dict (before loading it)."""
    modules = dict(model.named_modules())
    for name, values in attrs.items():
        m = modules.get(name)
        for k, v in (values.items() if m is not None else ()):
            setattr(m, k, tuple(v) if isinstance(v, list) else v)
    for key, t in state.items():
        owner, _, attr = key.rpartition(".")
        m = modules.get(owner)
        cur = getattr(m, attr, None) if m is not None else None
        if not isinstance(cur, torch.Tensor) or cur.shape == t.shape:
            continue
        if isinstance(cur, torch.nn.Parameter):
            setattr(m, attr, torch.nn.Parameter(torch.empty_like(t), requires_grad=cur.requires_grad))
        else:
            m._buffers[attr] = torch.empty_like(t)


def _shape_attrs(module: torch.nn.Module) -> dict:
    out = {}
    for name, m in module.named_modules():
        vals = {a: getattr(m, a) for a in _SHAPE_ATTRS if isinstance(getattr(m, a, None), (int, tuple))}
        if vals:
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in vals.items()}
    return out


def save_model(path, model: torch.nn.Module, *, spec: str, model_args: Optional[dict] = None,
               report: Optional[dict] = None) -> None:
    """Write ``model`` (plain, :class:`~neuslice.maintain.RestructuredModel` or
    :class:`~neuslice.maintain.TaskAwareModel`) as one safetensors file, atomically; the metadata holds the
    factory ``spec``, its arguments, pruned module shapes, the class map or tasks, and ``report``."""
    tensors, wrapper = {}, None
    net = model.module if isinstance(model, (RestructuredModel, TaskAwareModel)) else model
    if isinstance(model, RestructuredModel):
        wrapper = {"kind": "restructured", "mode": model.mode, "class_map": model.class_map.tolist(),
                   "class_names": model.class_names, "original_params": model.original_params, "kept": model.kept,
                   "layers": [i.name for i in model._infos]}
        tensors.update({f"__mask__.{info.name}": getattr(model, f"_mask{i}") for i, info in enumerate(model._infos)})
    elif isinstance(model, TaskAwareModel):
        wrapper = {"kind": "task_aware", "tasks": model.tasks, "masked_task": model.masked_task,
                   "class_names": model.class_names, "layers": [i.name for i in model._infos]}
        tensors.update({f"__keep__.{info.name}": getattr(model, f"_keep{i}") for i, info in enumerate(model._infos)})
    tensors.update({k: v.detach().clone() for k, v in net.state_dict().items()})
    meta = {"model": spec, "model_args": model_args or {}, "wrapper": wrapper, "modules": _shape_attrs(net),
            "report": report}
    container.write("neuslice.io.save_model", path, "model", tensors, meta)


def load_model(spec: Optional[str] = None, weights=None, model_args: Optional[dict] = None) -> torch.nn.Module:
    """A model in eval mode: factory ``spec`` (default: the one a neuslice model file names) with ``weights``.

    Files written by :func:`save_model` come back as the same kind of model (restructured models with their
    class map and ``predict``, task-aware models with their tasks)."""
    state, meta = read_weights(weights) if weights is not None else ({}, None)
    if meta is not None:
        spec = spec or meta.get("model")
        model_args = meta.get("model_args") if model_args is None else model_args
    if not spec:
        raise ValueError("--model is required (package.module:factory) unless --weights is a model file "
                         "written by neuslice")
    net = build_model(spec, model_args)
    extra = {k: state.pop(k) for k in list(state) if k.startswith("__")}
    if meta is not None:
        _resize(net, state, meta.get("modules") or {})
    if weights is not None:
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            lines = " ".join(str(e).splitlines()[:4])
            raise ValueError(f"{weights}: the weights do not fit the model {spec!r}: {lines}") from None
    net.eval()
    wrapper = (meta or {}).get("wrapper")
    return _wrap(net, wrapper, extra) if wrapper else net


def _wrap(net: torch.nn.Module, w: dict, extra: dict) -> torch.nn.Module:
    infos = list(discover(net, list(w["layers"])).layers) if w["layers"] else []
    if w["kind"] == "restructured":
        masks = {i.name: extra[f"__mask__.{i.name}"] for i in infos}
        return RestructuredModel(net, w["class_map"], w["class_names"], mode=w["mode"],
                                 original_params=w["original_params"], kept=w["kept"], infos=infos,
                                 masks=masks).eval()
    keep = {i.name: extra[f"__keep__.{i.name}"] for i in infos}
    tasks = {k: [int(c) for c in v] for k, v in w["tasks"].items()}
    return TaskAwareModel(net, infos, keep, tasks, w["masked_task"], w["class_names"]).eval()
