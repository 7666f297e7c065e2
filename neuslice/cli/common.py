"""What the commands and the demo pipeline share: options, loading models and data, progress bars,
accuracy, printing results, and the restructure pipeline (restructure → fine-tune → compress)."""
from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .. import models as _models  # noqa: F401  (registers the demo models' names for --model)
from ..engine.capture import call_model
from ..engine.classes import parse_class_list
from ..engine.evaluate import accuracy, restricted_predict
from ..io.data import data_paths, load_data, parse_classes
from ..io.modelfile import MissingFactoryError, load_model, read_weights
from ..maintain import compress, finetune, restructure
from .progress import Progress, TrainProgress
from .report import REPORT_FILES

__all__ = ["UsageError", "RunOptions", "RestructureOptions", "run_restructure", "bar", "train_bar", "model_args",
           "load_model_of", "factory_of", "load_data_of", "check_inputs", "say", "default_threads", "resolve_device",
           "head_outputs", "class_list", "acc", "emit", "kv", "example_input", "check_outputs"]


@dataclass
class RunOptions:
    """What every step reads besides its own options: batch size, quiet (no bars), the shuffling seed."""
    batch_size: int = 64
    quiet: bool = False
    seed: int = 0


class UsageError(Exception):
    """A command line that cannot be run as given (exit code 2)."""


def bar(args, ds, desc: str, *, shuffle: bool = False) -> Progress:
    loader = ds.loader(args.batch_size, shuffle=shuffle, seed=getattr(args, "seed", 0))
    return Progress(loader, desc, enabled=not args.quiet)


def train_bar(args, ds, desc: str) -> TrainProgress:
    """The shuffled training data of an operator: ``with train_bar(...) as data: op(model, data, ...)`` shows the
    label check, then each epoch with its loss."""
    loader = ds.loader(args.batch_size, shuffle=True, seed=getattr(args, "seed", 0))
    return TrainProgress(loader, desc, enabled=not args.quiet)


def model_args(args) -> Optional[dict]:
    if args.model_args is None:
        return None
    try:
        value = json.loads(args.model_args)
    except ValueError as e:
        raise UsageError(f"--model-args must be a JSON object, got {args.model_args!r} ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"--model-args must be a JSON object, got {args.model_args!r}")
    return value


def default_threads() -> int:
    """torch's thread count, lowered to the cores idle now (CPU count minus the 1-minute load average,
    at least 1). On a busy 2-core box, torch's two OpenMP threads wait for a core at every barrier: a
    bench_cnn profile of 3,000 samples took 31.8 s with them, 14.0 s with this default (README)."""
    n = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
    except (AttributeError, OSError):     # no affinity or load average on this platform: torch's choice
        return n
    return max(1, min(n, int(cores - load + 0.5)))


def resolve_device(text: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                             "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices (0…"
                             f"{torch.cuda.device_count() - 1})")
    return dev


def load_model_of(args):
    """The model of ``--model/--weights/--model-args`` under the trust rules (``--trust-model-code``), on
    ``--device``."""
    device = resolve_device(getattr(args, "device", "cpu"))
    try:
        model = load_model(args.model, args.weights, model_args(args), trust_code=args.trust_model_code)
    except MissingFactoryError as e:
        raise UsageError(str(e)) from None
    return model.to(device)


def head_outputs(model, ds) -> int:
    """How many classes ``model`` scores: the last axis of its output on samples of ``ds``."""
    out = check_inputs(model, ds)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise ValueError(f"the model's output on one sample of {ds.source} is "
                         f"{type(out).__name__ if not isinstance(out, torch.Tensor) else list(out.shape)}, "
                         "not logits [B, K]")
    return int(out.shape[-1])


def factory_of(args, model) -> str:
    """The factory of ``model`` for its output file: --model, or the one its weights file named."""
    if args.model:
        return args.model
    return read_weights(args.weights)[1]["model"]


# the options naming files a command reads (the data options are expanded by io.data.data_paths)
_INPUT_FILES = {"weights": "--weights", "profile": "--profile", "slices": "--slices", "profiles": "the profile",
                "results": "--results"}
_INPUT_DATA = ("data", "test_data", "new_test_data", "replay_data", "test_a", "test_b")


def _inputs(args):
    """``(option, path)`` for every file the parsed command line ``args`` reads."""
    for dest, option in _INPUT_FILES.items():
        value = getattr(args, dest, None)
        for p in [value] if isinstance(value, str) else value or []:
            yield option, p
    for dest in _INPUT_DATA:
        if getattr(args, dest, None):
            yield from ((f"--{dest.replace('_', '-')}", str(p)) for p in data_paths(getattr(args, dest)))
    classes = getattr(args, "classes", None)
    if classes and classes.startswith("@"):
        yield "--classes", classes[1:]


def _same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one existing file: the same path, a symbolic link to it or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:   # either is missing (or unreadable): nothing there to destroy
        return False


def check_outputs(args) -> None:
    """Refuse (usage error), before any work, an ``--out`` that is one of the command's input files (after
    links: os.path.samefile), or that would write over one (the report folder's files), and a file
    ``--out`` that exists but is not a regular file."""
    out = getattr(args, "out", None)
    if not out or args.command == "demo":
        return
    if args.command == "report":
        targets = [out] + [os.path.join(out, f) for f in REPORT_FILES]
    elif os.path.exists(out) and not os.path.isfile(out):
        raise UsageError(f"--out {out}: exists and is not a regular file (a folder, device or pipe)")
    else:
        targets = [out]
    for option, path in _inputs(args):
        for t in targets:
            if _same_file(t, path):
                what = "" if t == out else f" (its {os.path.basename(t)})"
                raise UsageError(f"--out {out}{what} is the input {option} {path}: writing it would destroy that "
                                 "input; choose another --out")


def say(args, kind: str, text: str) -> None:
    """One line on stderr, ``neuslice COMMAND: KIND: text``; notes are hidden by ``--quiet``, warnings never."""
    if kind == "note" and getattr(args, "quiet", False):
        return
    print(f"neuslice {getattr(args, 'command', '')}: {kind}: {text}", file=sys.stderr)


def load_data_of(args, spec: Optional[str], names: Optional[Sequence[str]] = None, model=None):
    """The data set ``spec`` as the data options say (``--classes``, ``--normalize``, ``--data-classes``), its
    notes and warnings printed; with ``model``, checked to be inputs ``model`` can take."""
    if spec is None:
        return None
    declared = parse_classes(getattr(args, "classes", None)) or names
    norm = getattr(args, "normalize", None)   # (means, stds), parsed by io.data.parse_normalize
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_data(spec, declared, normalize=norm)
        if getattr(args, "data_classes", None):
            ds = ds.subset(class_list(args.data_classes, ds.class_names, "--data-classes"))
            if ds.y.numel() == 0:
                raise ValueError(f"{spec}: holds no sample of --data-classes {args.data_classes}")
    for note in ds.notes:
        say(args, "note", note)
    for w in caught:
        say(args, "warning", str(w.message))
    if model is not None:
        check_inputs(model, ds)
    return ds


def check_inputs(model, ds):
    """Run ``model`` (in eval mode, on its device) on two samples of ``ds`` and return its output: an error
    naming the data, its shape and how it was read, instead of a layer's error deep in the run, when the model
    cannot take them."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return call_model(model, ds.x[:2])
    except (RuntimeError, ValueError, TypeError) as e:
        how = f" ({'; '.join(ds.notes)})" if ds.notes else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{ds.source}: the model cannot take these inputs: one sample is {list(ds.x.shape[1:])}"
                         f"{how}; the model said: {first}") from None
    finally:
        model.train(was)


def class_list(text: str, names: Sequence[str], option: str) -> List[int]:
    """``"3,8"`` or ``"cat,dog"`` → class indices (a usage error otherwise)."""
    try:
        return parse_class_list(option, text, names)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def acc(predict, ds, args, classes=None, desc: str = "evaluate") -> Optional[float]:
    if ds is None:
        return None
    return round(accuracy(predict, bar(args, ds, desc), classes), 4)


def emit(args, result: Dict, text) -> int:
    if args.json:
        print(json.dumps(result, default=str))
    else:
        text(result)
    return 0


def kv(result: Dict) -> None:
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, (list, dict)):
            v = json.dumps(v, default=str)
        print(f"{k:<26}{v}")


def example_input(opts, ds):
    if ds is not None:
        return ds.x[:2]
    if opts.input_shape:
        return torch.zeros(1, *[int(s) for s in opts.input_shape.split(",")])
    raise UsageError("restructure --mode physical needs --data or --input-shape (e.g. 1,28,28) to trace the model")


@dataclass
class RestructureOptions:
    """How ``restructure`` runs: mode, the example input shape for tracing (physical mode without data),
    fine-tune epochs and learning rate, an optional compression target and its method."""
    mode: str = "physical"
    input_shape: Optional[str] = None
    finetune_epochs: int = 1
    lr: float = 0.01
    compress: Optional[float] = None
    compress_method: str = "global"


def run_restructure(run, opts: RestructureOptions, model, slices, keep: List[int], train, test) -> tuple:
    """Restructure (+ fine-tune, + compress) as ``opts`` say, with batching and progress from ``run``
    (a :class:`RunOptions` or the parsed command line); returns ``(model, result dict)``."""
    example = example_input(opts, train) if opts.mode == "physical" else None
    new, _ = restructure(model, slices, keep, mode=opts.mode, example_inputs=example)
    tr = train.subset(keep) if train is not None else None
    te = test.subset(keep) if test is not None else None
    res = {"classes": [slices.class_names[k] for k in keep], "mode": opts.mode, "params": new.num_params,
           "original_params": new.original_params, "compression_rate": round(new.compression_rate, 4),
           "slice_compression_rate": round(slices.compression_rate(model, keep), 4),
           "accuracy_original": acc(restricted_predict(model, keep), te, run, keep, "eval original"),
           "accuracy_restructured": acc(new.predict, te, run, keep, "eval restructured"),
           "finetune_epochs": opts.finetune_epochs, "accuracy_finetuned": None, "compress": None}
    if opts.finetune_epochs:
        if tr is None:
            raise UsageError("--finetune-epochs needs --data (the training data of the kept classes)")
        with train_bar(run, tr, "finetune") as data:
            new, _ = finetune(new, data, epochs=opts.finetune_epochs, lr=opts.lr)
        res["accuracy_finetuned"] = acc(new.predict, te, run, keep, "eval finetuned")
    if opts.compress is not None:
        if tr is None:
            raise UsageError("--compress needs --data (the training data of the kept classes)")
        with train_bar(run, tr, "compress") as data:
            new, rep = compress(new, data, opts.compress, method=opts.compress_method, lr=opts.lr,
                                eval_data=bar(run, te or tr, "eval compress"))
        res["compress"] = {k: v for k, v in rep.as_dict().items() if k != "history"}
    return new, res
