"""The ``neuslice`` command line: the parser and ``main`` (exit codes: 0 ok, 1 failure, 2 usage)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from . import commands
from .common import UsageError

__all__ = ["main", "build_parser"]


def _common(p, *, batch: bool = True) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    if batch:
        p.add_argument("--batch-size", type=int, default=64, help="batch size of every pass (default: 64)")
        p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def _model_opts(p, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="package.module:factory (a callable returning the nn.Module), or a built-in "
                                   "name (digits_cnn, digits_mlp, ...); default: the one a neuslice model file names")
    g.add_argument("--model-args", help="JSON object of keyword arguments for the factory")
    g.add_argument("--weights", required=required,
                   help="safetensors file, or a state dict saved with torch.save (read with weights_only=True)")


def _data_opts(p, required: bool = True, what: str = "data") -> None:
    p.add_argument("--data", required=required,
                   help=f"{what}: digits[:train|test|all], an IDX images file (*-images-idx3-ubyte[.gz]) or a folder "
                        "holding one, an .npz with x and y, or an image folder tree (one folder per class)")
    p.add_argument("--classes", help="class names, comma-separated or @FILE (one per line); a label outside "
                                     "them is an error")


def _train_opts(p, epochs: int, lr: float) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default: {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default: {lr})")
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
    p.add_argument("--metrics", default="avg,var,taylor,deeplift", help="comma-separated subset of avg, var, taylor, "
                                                                       "deeplift, ens (default: all)")
    p.add_argument("--target", default="logit", choices=("logit", "loss"), help="what the gradient is taken of")
    p.add_argument("--layers", help="comma-separated layer names to profile (default: every Conv/Linear but the head)")
    p.add_argument("--out", default="profile.safetensors", help="profile file to write")
    _common(p)
    p = _add(sub, "merge", commands.cmd_merge, "add profiles made on different machines or data shards",
             "Profiles are sums, so profiles of disjoint data merge by addition.")
    p.add_argument("profiles", nargs="+", help="profile files of the same model and classes")
    p.add_argument("--out", default="merged.safetensors", help="profile file to write")
    _common(p, batch=False)
    p = _add(sub, "slice", commands.cmd_slice, "slice a profile (profile file → slices file)",
             "Critical neurons per class: semantic (cumulative theta), category-wise or global (top ratio).")
    p.add_argument("--profile", required=True, help="profile file")
    p.add_argument("--mode", default="semantic", choices=("semantic", "category", "global"))
    p.add_argument("--metric", help="avg, var, taylor, deeplift or ens (default: taylor when profiled)")
    p.add_argument("--theta", type=float, default=0.9, help="semantic: cumulative threshold in (0, 1]")
    p.add_argument("--ratio", type=float, default=0.5, help="category/global: fraction of neurons kept, in (0, 1]")
    p.add_argument("--share", type=float, default=0.5, help="semantic: shared-neuron fraction rho")
    p.add_argument("--tau", type=float, default=0.5, help="semantic: similarity cut of the semantic groups")
    p.add_argument("--min-keep", type=int, default=1, help="neurons kept per layer at least")
    p.add_argument("--out", default="slices.safetensors", help="slices file to write")
    _common(p, batch=False)


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
    p.add_argument("--input-shape", help="one sample's shape, e.g. 1,28,28, to trace without --data")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune epochs on the kept classes (default: 0)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (default: 0.01)")
    p.add_argument("--compress", type=float, help="then prune by magnitude to this compression rate, e.g. 0.9")
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
    _train_opts(p, 5, 1e-3)
    p.add_argument("--out", default="readapted.safetensors", help="model file to write")
    _common(p)
    p = _add(sub, "incremental", commands.cmd_incremental, "learn new classes in non-critical neurons (→ model file)",
             "The model was trained on task A (the classes its slices sliced); --data holds the new classes (task B). "
             "The written model is task-aware: task A's predictions stay bit-identical.")
    _model_opts(p)
    p.add_argument("--slices", required=True, help="semantic slices of the task-A model")
    _data_opts(p, what="task-B training data")
    p.add_argument("--new-classes", required=True, help="the classes of task B, indices or names")
    p.add_argument("--replay", type=float, help="fraction of --replay-data (task A) mixed in, in (0, 1]")
    p.add_argument("--replay-data", help="task-A training data for --replay")
    p.add_argument("--test-a", help="task-A test data")
    p.add_argument("--test-b", help="task-B test data")
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
    p.add_argument("--theta", type=float, default=0.9)
    p.add_argument("--metric", help="metric for slicing --profile (default: taylor when profiled)")
    _model_opts(p, required=False)
    p.add_argument("--test-data", help="test data for the accuracy/compression curves")
    p.add_argument("--classes", help="class names of --test-data")
    p.add_argument("--results", nargs="*", help="model files written by restructure/readapt/incremental, or "
                                                "their --json output")
    p.add_argument("--out", default="neuslice-report", help="report folder (default: ./neuslice-report)")
    _common(p)
    p = _add(sub, "demo", commands.cmd_demo, "the whole job on the embedded digits data, no network",
             "Trains a small CNN on scikit-learn's digits (seeded), profiles and slices it, runs restructure, "
             "readapt and incremental, prints a summary table and writes the report folder.")
    p.add_argument("--out", default="neuslice-report", help="report folder (default: ./neuslice-report)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    p.add_argument("--theta", type=float, default=0.9, help="cumulative threshold, in (0, 1]")
    p.add_argument("--metric", default="taylor", help="avg, var, taylor, deeplift or ens")
    p.add_argument("--no-maintenance", action="store_true", help="stop after slicing")
    _common(p, batch=False)
    p = _add(sub, "info", commands.cmd_info, "what this installation can run (backends, build, devices)",
             "Backends, build and devices of this installation.")
    p.add_argument("--json", action="store_true", help="one line of JSON")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuslice", description="Neuron-level semantic slicing of DNNs (NeuSemSlice) "
                                "and the model maintenance it enables.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _parsers_steps(sub)
    _parsers_maintain(sub)
    _parsers_output(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.fn(args)
    except UsageError as e:
        print(f"neuslice {args.command}: usage error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError, ImportError, KeyError) as e:
        msg = str(e) if not isinstance(e, KeyError) else f"missing {e}"
        print(f"neuslice {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
