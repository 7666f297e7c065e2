"""The ``neuslice`` command line: the parser and ``main``.

Exit codes: 0 ok, 1 failure (bad files, errors of the run), 2 usage (every argument error: argparse's,
values out of range checked at parse time, and :class:`~neuslice.cli.common.UsageError`). ``main``
catches every ``Exception``: the user sees one line naming the problem (and, with ``--json``, the JSON
object ``{"error": ..., "exit_code": ...}`` on stdout); ``--debug`` prints the traceback too.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from typing import List, Optional

import torch

from .._errors import NeusliceError
from .._version import __version__
from ..engine.metrics import METRICS
from ..io.data import parse_normalize
from . import commands
from .common import UsageError, default_threads, check_outputs

__all__ = ["main", "build_parser"]


class _ArgumentError(Exception):
    """argparse's error, raised instead of exiting so ``main`` reports it like every other error."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _ArgumentError(self, message)


def _checked(cast, ok, want: str):
    """An argparse ``type``: ``cast(text)`` that must satisfy ``ok`` (else a usage error saying ``want``)."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value
    return parse


_UNIT = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_OPEN_UNIT = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
_CLOSED_UNIT = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
_POSITIVE = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_POSITIVE_INT = _checked(int, lambda v: v >= 1, "an integer >= 1")
_COUNT = _checked(int, lambda v: v >= 0, "an integer >= 0")
_METRIC_LIST = _checked(lambda t: [m.strip() for m in t.split(",")], lambda v: bool(v) and set(v) <= set(METRICS),
                        f"a comma-separated subset of {', '.join(METRICS)}")
_NORMALIZE = _checked(parse_normalize, lambda v: all(math.isfinite(m) for m in v[0]) and
                      all(math.isfinite(d) and d > 0 for d in v[1]),
                      "MEAN,STD or M1,...,MC,S1,...,SC: an even count of numbers, stds > 0")
_SHAPE = _checked(str, lambda t: all(s.strip().isdigit() and int(s) >= 1 for s in t.split(",")),
                  "comma-separated positive integers, e.g. 1,28,28")


_DEVICE = _checked(str, lambda t: t in ("auto", "cpu", "cuda") or (t.startswith("cuda:") and t[5:].isdigit()),
                   "auto, cpu, cuda or cuda:N")


def _common(p, *, batch: bool = True, device: bool = True) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument("--json", action="store_true", help="print the result (or the error) as one JSON object")
    p.add_argument("--debug", action="store_true", help="on an error, print the Python traceback too")
    if batch:
        p.add_argument("--batch-size", type=_POSITIVE_INT, default=64, help="batch size of every pass (default: 64)")
    if batch or device:
        p.add_argument("--threads", type=_POSITIVE_INT,
                       help="CPU threads for torch (default: torch's choice, lowered to the cores idle now)")
    if device:
        p.add_argument("--device", type=_DEVICE, default="auto",
                       help="where the model runs: auto (CUDA when available, else CPU), cpu, cuda or cuda:N "
                            "(default: auto)")


def _steps_without_a_model(p) -> None:
    _common(p, batch=False, device=False)


def _model_opts(p, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="package.module:factory (a callable returning the nn.Module), or a built-in "
                                   "name (digits_cnn, digits_mlp, ...); default: the one a neuslice model file names")
    g.add_argument("--model-args", help="JSON object of keyword arguments for the factory")
    g.add_argument("--weights", required=required,
                   help="safetensors file, or a state dict saved with torch.save (read with weights_only=True)")
    g.add_argument("--trust-model-code", action="store_true",
                   help="let a model file written by neuslice import and call the factory it names when that is "
                        "not a built-in name (default: refused; pass --model instead)")


def _data_opts(p, required: bool = True, what: str = "data") -> None:
    p.add_argument("--data", required=required,
                   help=f"{what}: digits[:train|test|all], an IDX images file (*-images-idx3-ubyte[.gz]) or a folder "
                        "holding one, an .npz with x and y, or an image folder tree (one folder per class)")
    p.add_argument("--classes", help="class names, comma-separated or @FILE (one per line); a label outside "
                                     "them is an error")
    _input_opts(p)


def _input_opts(p) -> None:
    """How every data option of the command is read: normalisation and a class subset."""
    p.add_argument("--normalize", metavar="MEAN,STD", type=_NORMALIZE,
                   help="standardise the inputs, (x - mean) / std: MEAN,STD for every channel (e.g. 0.1307,0.3081) "
                        "or M1,...,MC,S1,...,SC per channel (C means, then C stds); applies to every data option")
    p.add_argument("--data-classes", metavar="CLASSES",
                   help="keep only these classes (indices or names, comma-separated) of every data option; labels "
                        "keep their class ids")


def _train_opts(p, epochs: int, lr: float) -> None:
    p.add_argument("--epochs", type=_POSITIVE_INT, default=epochs, help=f"training epochs (default: {epochs})")
    p.add_argument("--lr", type=_POSITIVE, default=lr, help=f"learning rate (default: {lr})")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (default: 0)")


def _add(sub, name: str, fn, help_: str, description: str):
    p = sub.add_parser(name, help=help_, description=description)
    p.set_defaults(fn=fn)
    return p


def _parsers_steps(sub) -> None:
    p = _add(sub, "profile", commands.cmd_profile, "profile a model on data (model + data → profile file)",
             "One pass over the data: the per-class neuron statistics of every Conv/Linear layer but the head.")
    _model_opts(p)
    _data_opts(p)
    p.add_argument("--metrics", type=_METRIC_LIST, default="avg,var,taylor,deeplift",
                   help="comma-separated subset of avg, var, taylor, deeplift, ens (default: all)")
    p.add_argument("--target", default="logit", choices=("logit", "loss"), help="what the gradient is taken of")
    p.add_argument("--layers", help="comma-separated layer names to profile (default: every Conv/Linear but the head)")
    p.add_argument("--out", default="profile.safetensors", help="profile file to write")
    _common(p)
    p = _add(sub, "merge", commands.cmd_merge, "add profiles made on different machines or data shards",
             "Profiles are sums, so profiles of disjoint data merge by addition.")
    p.add_argument("profiles", nargs="+", help="profile files of the same model and classes")
    p.add_argument("--out", default="merged.safetensors", help="profile file to write")
    _steps_without_a_model(p)
    p = _add(sub, "slice", commands.cmd_slice, "slice a profile (profile file → slices file)",
             "Critical neurons per class: semantic (cumulative theta), category-wise or global (top ratio).")
    p.add_argument("--profile", required=True, help="profile file")
    p.add_argument("--mode", default="semantic", choices=("semantic", "category", "global"))
    p.add_argument("--metric", choices=METRICS,
                   help="avg, var, taylor, deeplift or ens (default: taylor when profiled)")
    p.add_argument("--theta", type=_UNIT, default=0.9, help="semantic: cumulative threshold in (0, 1]")
    p.add_argument("--ratio", type=_UNIT, default=0.5, help="category/global: fraction of neurons kept, in (0, 1]")
    p.add_argument("--share", type=_UNIT, default=0.5, help="semantic: shared-neuron fraction rho, in (0, 1]")
    p.add_argument("--tau", type=_CLOSED_UNIT, default=0.5, help="semantic: similarity cut of the semantic groups")
    p.add_argument("--min-keep", type=_COUNT, default=1, help="neurons kept per layer at least")
    p.add_argument("--out", default="slices.safetensors", help="slices file to write")
    _steps_without_a_model(p)


def _parsers_maintain(sub) -> None:
    p = _add(sub, "restructure", commands.cmd_restructure, "keep some classes: a smaller model (→ model file)",
             "Critical-neuron preservation: the slice of the kept classes, physically removed or masked; "
             "optionally fine-tuned and compressed. The written model carries its class map.")
    _model_opts(p)
    p.add_argument("--slices", required=True, help="slices file of this model")
    p.add_argument("--keep", required=True, help="classes to keep, indices or names, comma-separated")
    p.add_argument("--mode", default="physical", choices=("physical", "mask"))
    _data_opts(p, required=False, what="training data (fine-tuning, compression, tracing)")
    p.add_argument("--test-data", help="test data (same forms as --data) for the accuracies")
    p.add_argument("--input-shape", type=_SHAPE, help="one sample's shape, e.g. 1,28,28, to trace without --data")
    p.add_argument("--finetune-epochs", type=_COUNT, default=0,
                   help="fine-tune epochs on the kept classes (default: 0)")
    p.add_argument("--lr", type=_POSITIVE, default=0.01, help="fine-tuning learning rate (default: 0.01)")
    p.add_argument("--compress", type=_OPEN_UNIT, help="then prune by magnitude to this compression rate, e.g. 0.9")
    p.add_argument("--compress-method", default="global", choices=("global", "uniform+", "erk", "lamp"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="restructured.safetensors", help="model file to write")
    _common(p)
    p = _add(sub, "readapt", commands.cmd_readapt, "fit new samples by critical-neuron tuning (→ model file)",
             "Trains only the critical neurons of the new samples' classes; everything else stays bit-identical.")
    _model_opts(p)
    p.add_argument("--slices", required=True, help="slices file of this model")
    _data_opts(p, what="the new samples")
    p.add_argument("--test-data", help="held-out original data, scored before and after")
    p.add_argument("--new-test-data", help="held-out new samples, scored before and after (default: --data)")
    p.add_argument("--tune", help="classes whose critical neurons train (default: those in --data)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    p.add_argument("--replay-data", help="the original training data: old samples mixed into training keep the "
                                         "other classes (recommended; see the README's re-adapt table)")
    p.add_argument("--replay", type=_CLOSED_UNIT,
                   help="old samples per new sample, in [0, 1] (default: 0.5 with --replay-data, else none)")
    _train_opts(p, 10, 3e-3)
    p.add_argument("--out", default="readapted.safetensors", help="model file to write")
    _common(p)
    p = _add(sub, "incremental", commands.cmd_incremental, "learn new classes in non-critical neurons (→ model file)",
             "The model was trained on task A (the classes its slices sliced); --data holds the new classes (task B). "
             "The written model is task-aware: task A's predictions stay bit-identical.")
    _model_opts(p)
    p.add_argument("--slices", required=True, help="semantic slices of the task-A model")
    _data_opts(p, what="task-B training data")
    p.add_argument("--new-classes", required=True, help="the classes of task B, indices or names")
    p.add_argument("--replay", type=_UNIT, help="fraction of --replay-data (task A) mixed in, in (0, 1]")
    p.add_argument("--replay-data", help="task-A training data for --replay")
    p.add_argument("--test-a", help="task-A test data")
    p.add_argument("--test-b", help="task-B test data")
    p.add_argument("--objective", default="task", choices=("task", "joint"),
                   help="task: each sample's cross-entropy over its own task's logits; joint: over old and new "
                        "classes together (default: task)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    _train_opts(p, 10, 3e-3)
    p.add_argument("--out", default="incremental.safetensors", help="model file to write")
    _common(p)


def _parsers_output(sub) -> None:
    p = _add(sub, "predict", commands.cmd_predict, "predict with a model file and score it on data",
             "Loads a model (plain, restructured or task-aware) and predicts original class ids.")
    _model_opts(p)
    _data_opts(p)
    p.add_argument("--task", help="task-aware models: the task to predict under (default: every neuron)")
    p.add_argument("--out", help="CSV file of index,label,prediction")
    _common(p)
    p = _add(sub, "report", commands.cmd_report, "write an HTML report (index.html, PNG figures, summary.json)",
             "Figures: critical neurons per layer and class, class similarity with the semantic groups, accuracy "
             "against compression rate for the three slicing modes (needs --test-data), maintenance results.")
    p.add_argument("--profile", help="profile file")
    p.add_argument("--slices", help="slices file (default: semantic slices of --profile at --theta)")
    p.add_argument("--theta", type=_UNIT, default=0.9, help="cumulative threshold, in (0, 1]")
    p.add_argument("--metric", choices=METRICS, help="metric for slicing --profile (default: taylor when profiled)")
    _model_opts(p, required=False)
    p.add_argument("--test-data", help="test data for the accuracy/compression curves")
    p.add_argument("--classes", help="class names of --test-data")
    _input_opts(p)
    p.add_argument("--results", nargs="*", help="model files written by restructure/readapt/incremental, or "
                                                "their --json output")
    p.add_argument("--out", default="neuslice-report", help="report folder (default: ./neuslice-report)")
    _common(p)
    p = _add(sub, "demo", commands.cmd_demo, "the whole job on the embedded digits data, no network",
             "Trains a small CNN on scikit-learn's digits (seeded), profiles and slices it, runs restructure, "
             "readapt and incremental, prints a summary table and writes the report folder.")
    p.add_argument("--out", default="neuslice-report", help="report folder (default: ./neuslice-report)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=_POSITIVE_INT, default=15, help="training epochs (default: 15)")
    p.add_argument("--theta", type=_UNIT, default=0.9, help="cumulative threshold, in (0, 1]")
    p.add_argument("--metric", default="taylor", choices=METRICS, help="avg, var, taylor, deeplift or ens")
    p.add_argument("--no-maintenance", action="store_true", help="stop after slicing")
    _common(p, batch=False, device=True)
    p = _add(sub, "info", commands.cmd_info, "what this installation can run (backends, build, devices)",
             "Backends, build and devices of this installation.")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.add_argument("--debug", action="store_true", help="on an error, print the Python traceback too")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="neuslice", description="Neuron-level semantic slicing of DNNs (NeuSemSlice) "
                                "and the model maintenance it enables.")
    p.add_argument("--version", action="version", version=f"neuslice {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _parsers_steps(sub)
    _parsers_maintain(sub)
    _parsers_output(sub)
    return p


def _describe(e: BaseException) -> str:
    """One line for the user: the message of an expected error, the type and message of anything else."""
    if isinstance(e, KeyError):
        return f"missing {e}"
    msg = str(e) or type(e).__name__
    if isinstance(e, (NeusliceError, ValueError, OSError, ImportError)):
        return msg
    return f"{type(e).__name__}: {msg}"


def _error(prog: str, label: str, message: str, code: int, *, json_out: bool, debug: bool,
           exc: Optional[BaseException] = None) -> int:
    """Report an error: ``prog: label: message`` on stderr (the traceback first with ``--debug``), and the
    JSON object ``{"error": message, "exit_code": code}`` on stdout with ``--json``; returns ``code``."""
    if debug and exc is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"{prog}: {label}: {message}", file=sys.stderr)
    if json_out:
        print(json.dumps({"error": message, "exit_code": code}))
    return code


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code (0 ok, 1 failure,
    2 usage). ``--help`` exits through ``SystemExit(0)`` as argparse does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except _ArgumentError as e:
        e.parser.print_usage(sys.stderr)
        return _error(e.parser.prog, "error", str(e), 2, json_out="--json" in argv, debug="--debug" in argv)
    prog = f"neuslice {args.command}"
    report = dict(json_out=bool(getattr(args, "json", False)), debug=bool(getattr(args, "debug", False)))
    threads = torch.get_num_threads()
    try:
        if hasattr(args, "threads"):
            torch.set_num_threads(args.threads or default_threads())
        check_outputs(args)
        return args.fn(args)
    except UsageError as e:
        return _error(prog, "usage error", str(e), 2, exc=e, **report)
    except KeyboardInterrupt as e:
        return _error(prog, "error", "interrupted", 130, exc=e, **report)
    except Exception as e:   # every failure is one line (and exit 1); --debug shows where it came from
        hint = "" if report["debug"] else " (--debug prints the traceback)"
        known = isinstance(e, (NeusliceError, ValueError, OSError, ImportError, KeyError))
        return _error(prog, "error", f"{_describe(e)}{'' if known else hint}", 1, exc=e, **report)
    finally:
        torch.set_num_threads(threads)
