"""The front door shared by the ops of :mod:`neuslice.ops`: argument-error wording, the checks on in-place
outputs and scalar arguments, and :func:`_custom_op` (a ``torch.library.custom_op`` whose eager calls skip
the dispatcher where that changes nothing). Moved out of ``ops/__init__.py``, which keeps the ops themselves.
"""
from __future__ import annotations

import functools
import inspect
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor


def _fail(op: str, msg: str, exc=ValueError):
    raise exc(f"neuslice.{op}: {msg}")


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _check_same(op: str, name: str, t: Tensor, like: Tensor, like_name: str, shape: Optional[Sequence[int]] = None):
    if t.device != like.device:
        _fail(op, f"{name} must be on {like_name}'s device {like.device}, got {t.device}")
    want = tuple(like.shape) if shape is None else tuple(shape)
    if tuple(t.shape) != want:
        _fail(op, f"{name} must have shape {list(want)}, got {_shape(t)}")


def _overlaps_itself(t: Tensor) -> bool:
    """True when two elements of ``t`` may share memory (an ``expand()``ed or ``as_strided`` view), so
    an in-place kernel would race on it or the reference would refuse it part-way through. torch's
    own test answers "too hard" for some non-dense views; those are decided by the sufficient test of
    sorting the dims by stride: each stride must step over everything the smaller ones span."""
    status = torch._debug_has_internal_overlap(t)  # 0 no, 1 yes, 2 too hard to tell
    if status != 2:
        return status == 1
    extent = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


def _span(t: Tensor):
    """The bytes ``[first, end)`` that ``t``'s elements lie in (strides are never negative in torch)."""
    first = t.data_ptr()
    return first, first + t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))


def _check_outputs(op: str, outputs: Sequence[Tensor], out_names: Sequence[str], inputs: Sequence,
                   in_names: Sequence[str]) -> None:
    """The checks on an op's in-place outputs that need real tensors (the fake kernels skip them):
    each output can be written element by element, and none shares memory with an input or another
    output. ``inputs`` may hold None (an absent optional input).

    Inference tensors are refused outside inference mode, as torch refuses in-place updates to them
    there; without this check the reference failed part-way through while cpu and triton wrote them.
    Kept cheap (it runs on every call, the front door's included): one pass of C-level queries, and
    the slow paths only when an output is suspect or two tensors share a storage.
    """
    inference = torch.is_inference_mode_enabled()
    ptrs = []
    for t in outputs:
        if not t.is_contiguous() or (not inference and t.is_inference()):
            _check_writable(op, t, out_names[len(ptrs)], inference)
        ptrs.append(t.untyped_storage().data_ptr())
    for t in inputs:  # (an absent input gets a pointer of its own, negative: it shares nothing)
        ptrs.append(~len(ptrs) if t is None else t.untyped_storage().data_ptr())
    if len(set(ptrs)) < len(ptrs):
        _check_shared(op, ptrs, (*outputs, *inputs), (*out_names, *in_names), len(outputs))


def _check_writable(op: str, t: Tensor, name: str, inference: bool) -> None:
    if not inference and t.is_inference():
        _fail(op, f"{name} must be a normal tensor to be updated in place outside torch.inference_mode(), "
                  "got an inference tensor (clone it outside inference mode, or call inside inference mode)")
    if _overlaps_itself(t):
        _fail(op, f"{name} must not have elements sharing memory, got a view of shape {_shape(t)} with "
                  f"strides {list(t.stride())} (an expand()ed or as_strided tensor: pass {name}.clone())")


def _check_shared(op: str, ptrs, tensors, names, n_out: int) -> None:
    """Tensors on one storage: refused when the bytes of an output and of another tensor overlap, so
    disjoint slices of one buffer pass (interleaved views of one buffer count as overlapping). Absent,
    empty and meta tensors (storage pointer 0) share nothing."""
    for i in range(n_out):
        for j in range(i + 1, len(tensors)):
            if ptrs[i] != ptrs[j] or ptrs[i] <= 0 or tensors[i].numel() == 0 or tensors[j].numel() == 0:
                continue
            (a0, a1), (b0, b1) = _span(tensors[i]), _span(tensors[j])
            if a0 < b1 and b0 < a1:
                what = "another output" if j < n_out else "an input"
                base = ptrs[i]
                _fail(op, f"{names[i]} and {names[j]} must not share memory (an output may not alias {what}), "
                          f"got both in one storage, at bytes [{a0 - base}, {a1 - base}) and "
                          f"[{b0 - base}, {b1 - base}): pass separate tensors")


# Scalar arguments on the front door. The dispatcher checks them against the schema; the front door
# skips it, so it checks them itself. Both paths refuse what the schema refuses (a float for an int);
# the front door also refuses bools for numbers and 0-dim tensors for scalars, and hands the backends
# Python ints, floats and bools, as the dispatcher does.
_SCALAR_KINDS = {"int": (numbers.Integral, torch.SymInt), "float": (numbers.Real, torch.SymFloat),
                 "bool": (bool, torch.SymBool)}
_SCALAR_CAST = {"int": int, "float": float, "bool": bool}


def _scalar_args(schema) -> tuple:
    """``(index, name, kind)`` of the schema's int, float and bool arguments."""
    return tuple((i, a.name, str(a.type)) for i, a in enumerate(schema.arguments)
                 if str(a.type) in _SCALAR_KINDS)


def _checked_scalars(op: str, args: tuple, scalars: tuple) -> tuple:
    """``args`` with every scalar argument checked against its schema type and made a Python value."""
    out = None
    for i, name, kind in scalars:
        v = args[i]
        if type(v) is _SCALAR_CAST[kind]:
            continue
        if not isinstance(v, _SCALAR_KINDS[kind]) or (kind != "bool" and isinstance(v, bool)):
            _fail(op, f"{name} must be {'an' if kind == 'int' else 'a'} {kind} (schema: {kind} {name}), "
                      f"got {type(v).__name__} {v!r}", TypeError)
        if not isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            out = list(args) if out is None else out
            out[i] = _SCALAR_CAST[kind](v)
    return args if out is None else tuple(out)


# Private torch hooks the front door needs; where a torch build lacks one, every call takes the op.
_DISPATCH_MODES = getattr(torch._C, "_len_torch_dispatch_stack", None)
_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)
# torch.jit.is_tracing() and torch.autograd.graph.increment_version() are these behind a Python
# frame each (an is_scripting() test that is False in eager Python; a tensor-to-tuple wrap): called
# directly they save ~10 us each from a cold cache. Where a torch build lacks them, the public ones.
_IS_TRACING = getattr(torch._C, "_is_tracing", None) or torch.jit.is_tracing
_INCREMENT_VERSION = getattr(torch._C, "_increment_version", None) or torch.autograd.graph.increment_version


def _direct(args, mutated) -> bool:
    """True when running an op's kernel directly is indistinguishable from the dispatcher's call:
    eager, plain tensors, no torch function/dispatch mode or functorch transform, no tracing or
    profiler, and no mutated tensor that requires grad.

    Runs on every front-door call, so one pass over ``args`` and no list built: with every tensor of
    exactly type Tensor, ``has_torch_function`` of any of them answers as of all of them (only an
    active torch function mode can make it True), so the first one is asked."""
    if _DISPATCH_MODES is None or _FUNCTORCH_ACTIVE is None:
        return False
    if torch.compiler.is_compiling() or _IS_TRACING() or torch.autograd._profiler_enabled():
        return False  # (first: dynamo traces this function; under torch.profiler the op's name shows)
    if _DISPATCH_MODES() or _FUNCTORCH_ACTIVE():
        return False
    first = None
    for a in args:
        if isinstance(a, Tensor):
            if type(a) is not Tensor:
                return False
            if first is None:
                first = a
    if first is not None and torch.overrides.has_torch_function((first,)):
        return False
    # (An inference tensor among them raises in the kernel's checks on either path: see _check_outputs.)
    for i in mutated:
        if args[i] is not None and args[i].requires_grad:
            return False
    return True


def _custom_op(qualname: str, *, mutates_args, schema: str, front_only: Sequence[str] = (), slow=None):
    """``torch.library.custom_op`` with an eager front door.

    Through the dispatcher a Python custom op runs three Python-level kernels (autograd,
    ADInplaceOrView, the op's): measured 78 us per ``accumulate_`` call on a tiny input, against
    16 us for the checks, dispatch and cpu kernel alone. Where :func:`_direct` says that changes
    nothing, the returned function runs the kernel itself and bumps the mutated tensors' version
    counters as ADInplaceOrView would; everywhere else (torch.compile, tracing, fake or functional
    tensors, modes, vmap) it calls the registered op. The op is ``.op``; ``torch.ops.neuslice.<name>``
    is the same op. On both paths the scalar arguments are first checked against the schema
    (:func:`_checked_scalars`), since the direct path skips the dispatcher's check.

    ``front_only``: the kernel's last parameters (default None), which the front door takes but the
    registered op does not (accumulate_'s ``status``: a mutated optional argument with a default breaks
    torch < 2.13's ADInplaceOrView kernel whenever a call leaves it out, which opcheck and torch.compile
    do). They are mutated in place when given. Off the direct path a call giving one runs
    ``slow(opdef, args)``; one giving none calls the op without them.
    """
    def wrap(kernel):
        opdef = torch.library.custom_op(qualname, kernel, mutates_args=mutates_args, schema=schema)
        sig = inspect.signature(kernel)
        nop = len(sig.parameters) - len(front_only)
        mutated = tuple(list(sig.parameters).index(m) for m in (*mutates_args, *front_only))
        op, scalars = qualname.split("::")[1], _scalar_args(opdef._opoverload._schema)
        nparams = len(sig.parameters)
        # Defaults of the trailing parameters, for positional calls that omit them: filled in
        # directly, since inspect's bind costs ~0.1 ms per call from a cold cache (measured on
        # accumulate_ calls after a cache flush, as bench/bench_ops.py times them).
        defaults = [p.default for p in sig.parameters.values()]
        first_default = next((i for i, d in enumerate(defaults) if d is not inspect.Parameter.empty), nparams)

        @functools.wraps(kernel)
        def front(*args, **kwargs):
            if not kwargs and first_default <= len(args) < nparams:
                args = (*args, *defaults[len(args):])
            elif kwargs or len(args) < nparams:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                args = bound.args
            args = _checked_scalars(op, args, scalars)
            if _direct(args, mutated):
                out = kernel(*args)
                if mutated:
                    _INCREMENT_VERSION([args[i] for i in mutated if args[i] is not None])
                return out
            if nop < nparams:
                if any(a is not None for a in args[nop:]):
                    return slow(opdef, args)
                args = args[:nop]
            return opdef(*args)

        front.op = opdef
        front.register_fake = opdef.register_fake
        return front
    return wrap
