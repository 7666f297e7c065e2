"""The ``neuslice`` command (also ``python -m neuslice``).

Models: ``--model package.module:factory`` (or a built-in name) and ``--weights`` (safetensors or a
``torch.save``'d state dict, read with ``weights_only=True``). Data: see :mod:`neuslice.datafiles`.
Steps chain through files: ``profile`` (model + data → profile file), ``merge`` (profiles → one),
``slice`` (profile → slices file), ``restructure`` / ``readapt`` / ``incremental`` (model + slices + data →
model file), ``report`` (files → an HTML report), ``predict`` (model file + data → accuracy);
``demo`` runs the whole job on the embedded digits data.

Exit codes: 0 ok, 1 failure (bad files, errors of the run), 2 usage. ``--json`` prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .. import models as _models  # noqa: F401  (registers the demo models' names for --model)
from .progress import Progress
from .report import make_slices, print_layers, print_summary, slices_summary

__all__ = ["main", "build_parser", "Progress", "UsageError"]


class UsageError(Exception):
    """A command line that cannot be run as given (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# helpers shared by the commands

def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False) and not getattr(args, "json", False):
        print(msg, file=sys.stderr, flush=True)


def _bar(args, ds, desc: str, *, shuffle: bool = False) -> Progress:
    loader = ds.loader(args.batch_size, shuffle=shuffle, seed=getattr(args, "seed", 0))
    return Progress(loader, desc, enabled=not args.quiet)


def _model_args(args) -> Optional[dict]:
    if args.model_args is None:
        return None
    try:
        value = json.loads(args.model_args)
    except ValueError as e:
        raise UsageError(f"--model-args must be a JSON object, got {args.model_args!r} ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"--model-args must be a JSON object, got {args.model_args!r}")
    return value


def _model(args):
    from ..io.modelfile import load_model
    return load_model(args.model, args.weights, _model_args(args))


def _spec(args, model) -> str:
    """The factory of ``model`` for its output file: --model, or the one its weights file named."""
    if args.model:
        return args.model
    from ..io.modelfile import read_weights
    return read_weights(args.weights)[1]["model"]


def _data(args, spec: Optional[str], names: Optional[Sequence[str]] = None):
    from ..io.data import load_data, parse_classes
    if spec is None:
        return None
    return load_data(spec, parse_classes(getattr(args, "classes", None)) or names)


def _class_list(text: str, names: Sequence[str], option: str) -> List[int]:
    """``"3,8"`` or ``"cat,dog"`` → class indices."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if item.lstrip("-").isdigit():
            out.append(int(item))
        elif item in names:
            out.append(list(names).index(item))
        else:
            raise UsageError(f"{option}: {item!r} is neither a class index nor one of the classes {list(names)}")
    if not out:
        raise UsageError(f"{option}: expected at least one class")
    return sorted(set(out))


def _acc(predict, ds, args, classes=None, desc: str = "evaluate") -> Optional[float]:
    from ..maintain import evaluate
    if ds is None:
        return None
    return round(evaluate(predict, _bar(args, ds, desc), classes), 4)


def _emit(args, result: Dict, text) -> int:
    if args.json:
        print(json.dumps(result, default=str))
    else:
        text(result)
    return 0


def _kv(result: Dict) -> None:
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, (list, dict)):
            v = json.dumps(v, default=str)
        print(f"{k:<26}{v}")


def _example(args, ds):
    if ds is not None:
        return ds.x[:2]
    if args.input_shape:
        return torch.zeros(1, *[int(s) for s in args.input_shape.split(",")])
    raise UsageError("restructure --mode physical needs --data or --input-shape (e.g. 1,28,28) to trace the model")


# ---------------------------------------------------------------------------------------------
# the commands

def _cmd_profile(args) -> int:
    import neuslice
    model = _model(args)
    ds = _data(args, args.data)
    metrics = [m.strip() for m in args.metrics.split(",")]
    layers = [n.strip() for n in args.layers.split(",")] if args.layers else None
    prof = neuslice.profile(model, _bar(args, ds, "profile"), ds.num_classes, class_names=ds.class_names,
                            metrics=metrics, target=args.target, layers=layers, progress=False)
    prof.save(args.out)
    counts = prof.counts.tolist()
    result = {"profile": str(args.out), "data": ds.source, "samples": int(sum(counts)),
              "per_class": {c: int(n) for c, n in zip(prof.class_names, counts)}, "metrics": list(prof.metrics),
              "layers": [{"name": e["name"], "type": e["type"], "neurons": int(e["n"])} for e in prof.layers]}
    return _emit(args, result, _kv)


def _cmd_merge(args) -> int:
    from ..engine.slices import Profile
    profs = [Profile.load(p) for p in args.profiles]
    total = profs[0]
    for p in profs[1:]:
        total = total + p
    total.save(args.out)
    result = {"profile": str(args.out), "merged": [str(p) for p in args.profiles],
              "samples": int(total.counts.sum()), "batches": total.num_batches}
    return _emit(args, result, _kv)


def _cmd_slice(args) -> int:
    from ..engine.slices import Profile
    prof = Profile.load(args.profile)
    value = args.theta if args.mode == "semantic" else args.ratio
    slices = make_slices(prof, args.mode, args.metric, value, share=args.share, tau=args.tau, min_keep=args.min_keep)
    slices.save(args.out)
    result = {"slices": str(args.out), **slices_summary(slices)}
    return _emit(args, result, print_layers)


def run_restructure(args, model, slices, keep: List[int], train, test) -> tuple:
    """Restructure (+ fine-tune, + compress) as the options say; returns ``(model, result dict)``."""
    from ..maintain import compress, finetune, restructure
    from ..maintain._common import restricted_predict
    example = _example(args, train) if args.mode == "physical" else None
    new, _ = restructure(model, slices, keep, mode=args.mode, example_inputs=example)
    tr = train.subset(keep) if train is not None else None
    te = test.subset(keep) if test is not None else None
    res = {"classes": [slices.class_names[k] for k in keep], "mode": args.mode, "params": new.num_params,
           "original_params": new.original_params, "compression_rate": round(new.compression_rate, 4),
           "slice_compression_rate": round(slices.compression_rate(model, keep), 4),
           "accuracy_original": _acc(restricted_predict(model, keep), te, args, keep, "eval original"),
           "accuracy_restructured": _acc(new.predict, te, args, keep, "eval restructured"),
           "finetune_epochs": args.finetune_epochs, "accuracy_finetuned": None, "compress": None}
    if args.finetune_epochs:
        if tr is None:
            raise UsageError("--finetune-epochs needs --data (the training data of the kept classes)")
        new, _ = finetune(new, _bar(args, tr, "finetune", shuffle=True), epochs=args.finetune_epochs, lr=args.lr)
        res["accuracy_finetuned"] = _acc(new.predict, te, args, keep, "eval finetuned")
    if args.compress is not None:
        if tr is None:
            raise UsageError("--compress needs --data (the training data of the kept classes)")
        new, rep = compress(new, _bar(args, tr, "compress", shuffle=True), args.compress,
                            method=args.compress_method, lr=args.lr,
                            eval_data=_bar(args, te or tr, "eval compress"))
        res["compress"] = {k: v for k, v in rep.as_dict().items() if k != "history"}
    return new, res


def _cmd_restructure(args) -> int:
    from ..io.modelfile import save_model
    from ..engine.slices import Slices
    model = _model(args)
    slices = Slices.load(args.slices, model)
    train, test = _data(args, args.data, slices.class_names), _data(args, args.test_data, slices.class_names)
    keep = _class_list(args.keep, slices.class_names, "--keep")
    new, res = run_restructure(args, model, slices, keep, train, test)
    save_model(args.out, new, spec=_spec(args, model), model_args=_model_args(args), report={"restructure": res})
    return _emit(args, {"model": str(args.out), **res}, _kv)


def _cmd_readapt(args) -> int:
    from ..io.modelfile import save_model
    from ..maintain import readapt
    from ..engine.slices import Slices
    model = _model(args)
    slices = Slices.load(args.slices, model)
    names = slices.class_names
    data, orig, new_test = (_data(args, s, names) for s in (args.data, args.test_data, args.new_test_data))
    tune = _class_list(args.tune, names, "--tune") if args.tune else None
    new, rep = readapt(model, slices, _bar(args, data, "readapt", shuffle=True), classes=tune, epochs=args.epochs,
                       lr=args.lr, optimizer=args.optimizer,
                       eval_data=None if orig is None else _bar(args, orig, "eval original"),
                       new_eval_data=None if new_test is None else _bar(args, new_test, "eval new"))
    res = rep.as_dict()
    save_model(args.out, new, spec=_spec(args, model), model_args=_model_args(args), report={"readapt": res})
    return _emit(args, {"model": str(args.out), **res}, _kv)


def _cmd_incremental(args) -> int:
    from ..io.modelfile import save_model
    from ..maintain import incremental
    from ..engine.slices import Slices
    model = _model(args)
    slices = Slices.load(args.slices, model)
    names = slices.class_names
    new_classes = _class_list(args.new_classes, names, "--new-classes")
    data, replay, test_a, test_b = (_data(args, s, names) for s in
                                    (args.data, args.replay_data, args.test_a, args.test_b))
    if (args.replay is None) != (replay is None):
        raise UsageError("--replay and --replay-data go together")
    out, rep = incremental(model, slices, _bar(args, data, "incremental", shuffle=True), new_classes=new_classes,
                           replay=args.replay, replay_data=None if replay is None else _bar(args, replay, "replay"),
                           epochs=args.epochs, lr=args.lr,
                           eval_data=None if test_a is None else _bar(args, test_a, "eval task A"),
                           new_eval_data=None if test_b is None else _bar(args, test_b, "eval task B"))
    res = rep.as_dict()
    save_model(args.out, out, spec=_spec(args, model), model_args=_model_args(args), report={"incremental": res})
    return _emit(args, {"model": str(args.out), **res}, _kv)


def _cmd_predict(args) -> int:
    from ..maintain import RestructuredModel, TaskAwareModel
    model = _model(args)
    ds = _data(args, args.data)
    if isinstance(model, TaskAwareModel):
        task = args.task
        predict, classes = (lambda x: model.predict(x, task=task)), (model.tasks[task] if task else None)
    elif isinstance(model, RestructuredModel):
        predict, classes = model.predict, model.class_map.tolist()
    else:
        predict, classes = (lambda x: model(x).argmax(-1)), None
    preds = torch.cat([predict(x) for x, _ in _bar(args, ds, "predict")])
    result = {"data": ds.source, "samples": int(preds.numel()), "accuracy": _acc(predict, ds, args, classes),
              "classes": classes}
    if args.out:
        lines = ["index,label,prediction"] + [f"{i},{int(y)},{int(p)}" for i, (y, p) in enumerate(zip(ds.y, preds))]
        Path(args.out).write_text("\n".join(lines) + "\n")
        result["predictions"] = str(args.out)
    return _emit(args, result, _kv)


def _cmd_report(args) -> int:
    from . import report
    from ..engine.slices import Profile, Slices
    if not args.profile and not args.slices:
        raise UsageError("report needs --profile or --slices")
    prof = Profile.load(args.profile) if args.profile else None
    slices = Slices.load(args.slices) if args.slices else make_slices(prof, "semantic", args.metric, args.theta)
    curves = None
    if args.test_data:
        if prof is None or not (args.model or args.weights):
            raise UsageError("accuracy curves (--test-data) need --profile and --model/--weights")
        model = _model(args)
        test = _data(args, args.test_data, slices.class_names)
        curves = report.accuracy_curves(model, prof, _bar(args, test, "curves"), slices.metric,
                                        report.default_subsets(slices))
    maint = report.load_results(args.results or [])
    summary = {"profile": args.profile, "slices": args.slices, **slices_summary(slices)}
    index = report.write_report(Path(args.out), slices=slices, curves=curves, maintenance=maint, summary=summary)
    return _emit(args, {"report": str(index), "figures": report.figures_of(index)}, _kv)


def _cmd_demo(args) -> int:
    summary = run_demo(Path(args.out), seed=args.seed, epochs=args.epochs, theta=args.theta, metric=args.metric,
                       quiet=args.quiet or args.json, maintenance=not args.no_maintenance)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
        print(f"report written to {args.out}/index.html")
    return 0


def _cmd_info(args) -> int:
    import neuslice
    info = neuslice.backend_info()
    print(json.dumps(info, indent=None if args.json else 1, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# the demo: the whole job on the embedded digits data

def _corrupt(x: torch.Tensor, seed: int) -> torch.Tensor:
    """New samples for re-adaptation: shifted one pixel right and down (wrapping) plus N(0, 0.1²) noise."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.roll(x, shifts=(1, 1), dims=(2, 3)) + 0.1 * torch.randn(x.shape, generator=g)


def _demo_maintenance(args, model, slices, train, test, epochs: int) -> Dict:
    import neuslice
    from ..io.data import Dataset
    from ..maintain import incremental, readapt
    from ..models import build, fit
    keep = [3, 8]
    _, res = run_restructure(args, model, slices, keep, train, test)
    out = {"restructure": res}
    new_tr, new_te = (Dataset(_corrupt(d.x, args.seed), d.y, d.class_names, f"{d.source} shifted, noisy")
                      .subset(keep) for d in (train, test))
    _, rep = readapt(model, slices, _bar(args, new_tr, "readapt", shuffle=True), epochs=min(5, epochs), lr=1e-3,
                     eval_data=_bar(args, test, "eval clean"), new_eval_data=_bar(args, new_te, "eval new"))
    out["readapt"] = {**rep.as_dict(), "new_samples": f"digits {keep} shifted by (1, 1) pixels plus N(0, 0.1^2) noise"}
    a, b = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    model_a = fit(build("digits_cnn", seed=args.seed), _bar(args, train.subset(a), "train task A", shuffle=True),
                  epochs=epochs, seed=args.seed)
    prof_a = neuslice.profile(model_a, _bar(args, train.subset(a), "profile task A"), 10,
                              class_names=train.class_names, progress=False)
    slices_a = neuslice.semantic_slice(prof_a, slices.metric, 0.7, classes=a)
    _, rep = incremental(model_a, slices_a, _bar(args, train.subset(b), "incremental", shuffle=True),
                         new_classes=b, epochs=min(10, epochs), lr=3e-3,
                         eval_data=_bar(args, test.subset(a), "eval task A"),
                         new_eval_data=_bar(args, test.subset(b), "eval task B"))
    out["incremental"] = rep.as_dict()
    return out


def run_demo(out: Path, *, seed: int = 0, epochs: int = 15, theta: float = 0.9, metric: str = "taylor",
             quiet: bool = False, maintenance: bool = True) -> Dict:
    """Train digits_cnn on digits (seeded), profile, slice, run the three maintenance tasks and write the
    report folder ``out`` (``index.html``, figures, ``summary.json``, the model, profile and slices files)."""
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # one thread: on this 2-core box the demo took 95 s with torch's default threads under load, 8.5 s with one
    # (its batches are tiny, so threads only add synchronisation)
    torch.set_num_threads(1)
    try:
        return _demo(out, seed, epochs, theta, metric, quiet, maintenance, t0)
    finally:
        torch.set_num_threads(threads)


def _demo(out: Path, seed: int, epochs: int, theta: float, metric: str, quiet: bool, maintenance: bool,
          t0: float) -> Dict:
    import neuslice
    from . import report
    from ..io.data import load_data
    from ..io.modelfile import save_model
    from ..models import build, fit
    args = argparse.Namespace(batch_size=64, quiet=quiet, json=False, seed=seed, mode="physical", input_shape=None,
                              finetune_epochs=1, lr=0.01, compress=None, compress_method="global")
    train, test = load_data("digits:train"), load_data("digits:test")
    model = fit(build("digits_cnn", seed=seed), _bar(args, train, "train", shuffle=True), epochs=epochs, seed=seed)
    base = _acc(lambda x: model(x).argmax(-1), test, args)
    prof = neuslice.profile(model, _bar(args, train, "profile"), 10, class_names=train.class_names, progress=False)
    slices = make_slices(prof, "semantic", metric, theta)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / "model.safetensors", model, spec="digits_cnn")
    prof.save(out / "profile.safetensors")
    slices.save(out / "slices.safetensors")
    curves = report.accuracy_curves(model, prof, test.loader(64), metric, report.default_subsets(slices),
                                    progress=not quiet)
    maint = _demo_maintenance(args, model, slices, train, test, epochs) if maintenance else {}
    summary = {"data": "scikit-learn digits (embedded)", "train_samples": len(train.y), "test_samples": len(test.y),
               "model": "digits_cnn", "params": sum(p.numel() for p in model.parameters()), "seed": seed,
               "epochs": epochs, "test_accuracy": base, **slices_summary(slices)}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    report.write_report(out, slices=slices, curves=curves, maintenance=maint, summary=summary)
    return json.loads((out / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# the parser

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
    p = _add(sub, "profile", _cmd_profile, "profile a model on data (model + data → profile file)",
             "One pass over the data: the per-class neuron statistics of every Conv/Linear layer but the head.")
    _model_opts(p)
    _data_opts(p)
    p.add_argument("--metrics", default="avg,var,taylor,deeplift", help="comma-separated subset of avg, var, taylor, "
                                                                       "deeplift, ens (default: all)")
    p.add_argument("--target", default="logit", choices=("logit", "loss"), help="what the gradient is taken of")
    p.add_argument("--layers", help="comma-separated layer names to profile (default: every Conv/Linear but the head)")
    p.add_argument("--out", default="profile.safetensors", help="profile file to write")
    _common(p)
    p = _add(sub, "merge", _cmd_merge, "add profiles made on different machines or data shards",
             "Profiles are sums, so profiles of disjoint data merge by addition.")
    p.add_argument("profiles", nargs="+", help="profile files of the same model and classes")
    p.add_argument("--out", default="merged.safetensors", help="profile file to write")
    _common(p, batch=False)
    p = _add(sub, "slice", _cmd_slice, "slice a profile (profile file → slices file)",
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
    p = _add(sub, "restructure", _cmd_restructure, "keep some classes: a smaller model (→ model file)",
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
    p = _add(sub, "readapt", _cmd_readapt, "fit new samples by critical-neuron tuning (→ model file)",
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
    p = _add(sub, "incremental", _cmd_incremental, "learn new classes in non-critical neurons (→ model file)",
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
    p = _add(sub, "predict", _cmd_predict, "predict with a model file and score it on data",
             "Loads a model (plain, restructured or task-aware) and predicts original class ids.")
    _model_opts(p)
    _data_opts(p)
    p.add_argument("--task", help="task-aware models: the task to predict under (default: every neuron)")
    p.add_argument("--out", help="CSV file of index,label,prediction")
    _common(p)
    p = _add(sub, "report", _cmd_report, "write an HTML report (index.html, PNG figures, summary.json)",
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
    p = _add(sub, "demo", _cmd_demo, "the whole job on the embedded digits data, no network",
             "Trains a small CNN on scikit-learn's digits (seeded), profiles and slices it, runs restructure, "
             "readapt and incremental, prints a summary table and writes the report folder.")
    p.add_argument("--out", default="neuslice-report", help="report folder (default: ./neuslice-report)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    p.add_argument("--theta", type=float, default=0.9, help="cumulative threshold, in (0, 1]")
    p.add_argument("--metric", default="taylor", help="avg, var, taylor, deeplift or ens")
    p.add_argument("--no-maintenance", action="store_true", help="stop after slicing")
    _common(p, batch=False)
    p = _add(sub, "info", _cmd_info, "what this installation can run (backends, build, devices)",
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


if __name__ == "__main__":
    sys.exit(main())
