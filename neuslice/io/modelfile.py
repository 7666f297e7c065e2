"""Model files, read without pickles and written atomically.

A model is a factory plus weights. The factory is ``package.module:factory`` (a callable returning the
``nn.Module``) or a name registered with :func:`register_factory` (the demo models of
:mod:`neuslice.models` register theirs when that module is imported). Weights are a safetensors file,
or a state dict read with ``torch.load(weights_only=True)``. Models written by :func:`save_model` are
safetensors files whose metadata names the factory, the shapes of pruned modules and, for
restructured and task-aware models, the class map, so ``load_model(weights=path)`` rebuilds them alone.

Trust (docs/method.md §5, "Model files: trust"): loading a file never imports or calls what the file
names unless the caller allowed it. A file's factory is used only when it is a registered name
(:data:`FACTORIES`), when it equals the ``spec`` the caller passes, or with ``trust_code=True``. The
metadata may set only the shape fields pruning changes (:data:`SHAPE_FIELDS`), each checked against the
weights.
"""
from __future__ import annotations

import importlib
import inspect
import json
import types
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from safetensors.torch import load as st_load

from .._errors import NeusliceError
from ..engine.graph import discover
from ..maintain import RestructuredModel, TaskAwareModel
from . import container
from .container import FileFormatError
from .data import DataFileError

__all__ = ["register_factory", "FACTORIES", "SHAPE_FIELDS", "FactoryError", "MissingFactoryError", "resolve_factory",
           "build_model", "read_weights", "save_model", "load_model", "WeightsFileError"]


class FactoryError(NeusliceError, ValueError):
    """A model factory cannot be used: not found, not allowed (a file's factory without trust), not a
    model factory, or it raised or returned something other than an ``nn.Module``."""


class MissingFactoryError(FactoryError):
    """No factory at all: no ``spec`` and the weights are not a model file written by neuslice."""

# name -> factory: the models a file may name without a module path (see register_factory)
FACTORIES: Dict[str, Callable[..., torch.nn.Module]] = {}


def register_factory(name: str, factory: Callable[..., torch.nn.Module]) -> None:
    """Let model files and ``--model`` name ``factory`` by ``name`` alone."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"neuslice.io.register_factory: name must be a non-empty string without ':', got {name!r}")
    if not callable(factory):
        raise TypeError(f"neuslice.io.register_factory: factory must be callable, got {type(factory).__name__}")
    FACTORIES[name] = factory


# the module fields a model file's metadata may set: the ones structured pruning changes (all shapes)
SHAPE_FIELDS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "normalized_shape")

# callables written in C (sys.exit, os.system, print, ...): never a model factory, so never called
_NATIVE = (types.BuiltinFunctionType, types.MethodWrapperType, types.WrapperDescriptorType,
           types.MethodDescriptorType, types.ClassMethodDescriptorType)


def resolve_factory(spec: str):
    """The model factory named by ``package.module:attr[.attr]``, or a name given to :func:`register_factory`.

    A factory is an ``nn.Module`` subclass or a callable written in Python (function, lambda, method,
    ``functools.partial``, an object with ``__call__``); a class that is not an ``nn.Module``, a
    callable written in C (``sys:exit``, ``os:system``, ``builtins:print``) and anything not callable
    are refused with :class:`FactoryError` before anything is called. Importing the module runs it:
    pass only names you would import yourself."""
    if not isinstance(spec, str) or not spec:
        raise FactoryError(f"--model must be a non-empty string, got {spec!r}")
    if ":" not in spec:
        if spec in FACTORIES:
            return FACTORIES[spec]
        raise FactoryError(f"--model {spec!r}: expected 'package.module:factory' or one of {sorted(FACTORIES)} "
                           "(the demo models register theirs when neuslice.models is imported)")
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise FactoryError(f"--model {spec!r}: expected 'package.module:factory'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())   # as `python -m` does: a console script finds the user's own modules too
    try:
        obj = importlib.import_module(mod_name)
    except (Exception, SystemExit) as e:   # a module may fail, or exit, at import
        raise FactoryError(f"--model {spec!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e})") from e
    for part in attr.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise FactoryError(f"--model {spec!r}: {mod_name!r} has no attribute {attr!r}")
    if inspect.isclass(obj):
        if not issubclass(obj, torch.nn.Module):
            raise FactoryError(f"--model {spec!r}: {attr!r} is the class {obj.__qualname__}, not a torch.nn.Module")
    elif not callable(obj):
        raise FactoryError(f"--model {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    elif isinstance(obj, _NATIVE):
        raise FactoryError(f"--model {spec!r}: {attr!r} is a built-in function, not a model factory (a torch.nn.Module "
                           "class or a Python function returning one)")
    return obj


def _call_factory(spec: str, factory, model_args: Optional[dict]) -> torch.nn.Module:
    try:
        model = factory(**(model_args or {}))
    except (Exception, SystemExit) as e:   # SystemExit: a factory calling sys.exit must not end the caller
        raise FactoryError(f"--model {spec!r}: the factory raised {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise FactoryError(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(spec: str, model_args: Optional[dict] = None):
    """Call the factory ``spec`` (see :func:`resolve_factory`) with ``model_args``; :class:`FactoryError` unless
    it returns a ``torch.nn.Module``."""
    return _call_factory(spec, resolve_factory(spec), model_args)


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


class WeightsFileError(container.FileFormatError, DataFileError):
    """A weights file that is neither a neuslice model file, nor plain safetensors, nor a state dict that
    ``torch.load(weights_only=True)`` reads (truncated, corrupt, a pickled module)."""


def _unreadable(path, problem: str) -> WeightsFileError:
    return WeightsFileError(f"{os.fspath(path)}: {problem}")


# Any one of these in a file's header marks it as written by neuslice: a single damaged byte can hide one
# of them, never all, so a damaged neuslice file is never mistaken for a plain weights file.
_NEUSLICE_MARKS = (b'"neuslice"', b'"sha256"', b"format_version")


def _written_by_neuslice(raw: bytes) -> bool:
    if raw[:2] == b"PK":                 # a torch.save zip (whose entries include a .format_version)
        return False
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else 0
    head = raw[:max(8 + n if 2 <= n <= len(raw) - 8 else 0, 1 << 20)]   # a damaged length: the first MiB
    return any(m in head for m in _NEUSLICE_MARKS)


def read_weights(path) -> Tuple[dict, Optional[dict]]:
    """``(state dict, neuslice metadata or None)`` from safetensors or a ``torch.load(weights_only=True)`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if _written_by_neuslice(raw):        # checked and read whole by the container: a damaged one is an error
        return container.read("neuslice.io.read_weights", path, "model")
    header = _neuslice_meta(raw)
    if header is not None:
        try:
            return st_load(raw), None
        except Exception as e:   # safetensors raises its own error types
            raise _unreadable(path, f"not a valid safetensors file (truncated or corrupt: {e})") from None
    return _torch_state(path), None


def _torch_state(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # pickle refusals, zip errors, truncation: all mean "not a weights file"
        raise _unreadable(path, "not a safetensors file nor a state dict that torch.load(weights_only=True) accepts "
                          f"(a pickled module is refused; save model.state_dict()): {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _unreadable(path, f"holds a {type(obj).__name__}, not a state dict (a dict of names to tensors)")
    return obj


def _bad(path, field: str, problem: str) -> FileFormatError:
    return FileFormatError(f"{os.fspath(path)}: metadata field {field} {problem}")


def _shape_value(cur, v):
    """``v`` (JSON) as a value of the kind of ``cur``: a positive int, or a tuple of as many positive ints."""
    def pos(x):
        return isinstance(x, int) and not isinstance(x, bool) and x > 0
    if isinstance(cur, int):
        return v if pos(v) else None
    if isinstance(v, list) and len(v) == len(cur) and all(pos(x) for x in v):
        return tuple(v)
    return None


def _shape_problem(m: torch.nn.Module) -> Optional[str]:
    """How ``m``'s shape fields disagree with its tensors (None when they agree or ``m`` is not a known type)."""
    nn = torch.nn
    w = getattr(m, "weight", None)
    if isinstance(m, nn.modules.conv._ConvNd):
        g = m.groups
        if m.in_channels % g or m.out_channels % g:
            return f"groups {g} does not divide in_channels {m.in_channels} and out_channels {m.out_channels}"
        want = ((m.in_channels, m.out_channels // g) if m.transposed else (m.out_channels, m.in_channels // g))
        want += tuple(m.kernel_size)
    elif isinstance(m, nn.Linear):
        want = (m.out_features, m.in_features)
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        want, w = (m.num_features,), (w if w is not None else m.running_mean)
    elif isinstance(m, nn.LayerNorm):
        want = tuple(m.normalized_shape)
    else:
        return None
    if isinstance(w, torch.Tensor) and tuple(w.shape) != want:
        return f"give a {type(m).__name__} weight of {list(want)} but the weights hold {list(w.shape)}"
    return None


def _resize(path, model: torch.nn.Module, state: dict, attrs) -> None:
    """Give ``model`` the module fields and tensor shapes of a pruned state dict (before loading it).

    Only :data:`SHAPE_FIELDS` that the module has may be set, each to a positive int (or a tuple of as
    many positive ints), and they must agree with the weights; anything else is :class:`FileFormatError`
    naming the file and the field."""
    if not isinstance(attrs, dict):
        raise _bad(path, "'modules'", f"must be an object of module names, got {type(attrs).__name__}")
    modules = dict(model.named_modules())
    fields = []
    for name, values in attrs.items():
        where = f"modules[{name!r}]"
        m = modules.get(name)
        if m is None or not isinstance(values, dict):
            raise _bad(path, where, "names no module of the model" if m is None else "must be an object")
        for k, v in values.items():
            if k not in SHAPE_FIELDS:
                raise _bad(path, f"{where}.{k}", f"may not be set from a file (only {', '.join(SHAPE_FIELDS)})")
            cur = getattr(m, k, None)
            if isinstance(cur, bool) or not isinstance(cur, (int, tuple)):
                raise _bad(path, f"{where}.{k}", f"is not a field of {type(m).__name__} {name!r}")
            new = _shape_value(cur, v)
            if new is None:
                want = "a positive int" if isinstance(cur, int) else f"a list of {len(cur)} positive ints"
                raise _bad(path, f"{where}.{k}", f"must be {want}, got {v!r}")
            fields.append((name, m, k, new))
    for _, m, k, new in fields:
        setattr(m, k, new)
    changed = {name: m for name, m, _, _ in fields}
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
        changed[owner] = m
    for name, m in changed.items():
        problem = _shape_problem(m)
        if problem:
            raise _bad(path, f"modules[{name!r}]", problem)


def _shape_attrs(module: torch.nn.Module) -> dict:
    out = {}
    for name, m in module.named_modules():
        vals = {a: getattr(m, a) for a in SHAPE_FIELDS if isinstance(getattr(m, a, None), (int, tuple))}
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
    tensors.update(net.state_dict())
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}   # a model on a GPU saves too
    meta = {"model": spec, "model_args": model_args or {}, "wrapper": wrapper, "modules": _shape_attrs(net),
            "report": report}
    container.write("neuslice.io.save_model", path, "model", tensors, meta)


def _file_factory(path, meta: dict) -> Tuple[str, Optional[dict]]:
    """The factory spec and arguments a model file names, checked for type (nothing is resolved)."""
    spec, args = meta.get("model"), meta.get("model_args")
    if not isinstance(spec, str) or not spec:
        raise _bad(path, "'model'", f"must name the factory as a non-empty string, got {spec!r}")
    if args is not None and not isinstance(args, dict):
        raise _bad(path, "'model_args'", f"must be an object of keyword arguments, got {type(args).__name__}")
    return spec, args


def _factory_for(path, spec: Optional[str], file_spec: str, trust_code: bool) -> Tuple[str, Callable]:
    """The factory to build a model file with, under the trust rules (docs/method.md §5)."""
    if spec is not None:
        factory = resolve_factory(spec)
        if spec != file_spec and not (file_spec in FACTORIES and FACTORIES[file_spec] is factory):
            raise FactoryError(f"{os.fspath(path)}: the file was written with the factory {file_spec!r}, but the "
                               f"factory passed (--model / spec) is {spec!r}; they must be the same")
        return spec, factory
    if file_spec in FACTORIES or trust_code:
        return file_spec, resolve_factory(file_spec)
    raise FactoryError(f"{os.fspath(path)}: the file names the factory {file_spec!r}, which is not a registered "
                       f"factory ({', '.join(sorted(FACTORIES)) or 'none registered'}); neuslice does not import "
                       "or call code a file names. Pass the factory yourself (--model, load_model(spec=...)), or "
                       "allow the file's with --trust-model-code (trust_code=True) if you trust the file")


def load_model(spec: Optional[str] = None, weights=None, model_args: Optional[dict] = None, *,
               trust_code: bool = False) -> torch.nn.Module:
    """A model in eval mode: factory ``spec`` (default: the one a neuslice model file names) with ``weights``.

    Files written by :func:`save_model` come back as the same kind of model (restructured models with their
    class map and ``predict``, task-aware models with their tasks). The factory a file names is used only
    if it is registered (:data:`FACTORIES`), equals ``spec``, or ``trust_code`` is True; a ``spec`` that
    differs from the file's is a :class:`FactoryError` naming both (docs/method.md §5)."""
    state, meta = read_weights(weights) if weights is not None else ({}, None)
    if meta is not None:
        file_spec, file_args = _file_factory(weights, meta)
        spec, factory = _factory_for(weights, spec, file_spec, trust_code)
        model_args = file_args if model_args is None else model_args
    elif not spec:
        raise MissingFactoryError("--model is required (package.module:factory) unless --weights is a model file "
                                  "written by neuslice")
    else:
        factory = resolve_factory(spec)
    net = _call_factory(spec, factory, model_args)
    extra = {k: state.pop(k) for k in list(state) if k.startswith("__")}
    if meta is not None:
        _resize(weights, net, state, meta.get("modules") or {})
    if weights is not None:
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            lines = " ".join(str(e).splitlines()[:4])
            raise ValueError(f"{weights}: the weights do not fit the model {spec!r}: {lines}") from None
    net.eval()
    wrapper = (meta or {}).get("wrapper")
    if not wrapper:
        return net
    try:
        return _wrap(net, wrapper, extra)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise _bad(weights, "'wrapper'", f"is malformed ({type(e).__name__}: {e})") from e


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
