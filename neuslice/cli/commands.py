"""The ``neuslice`` commands: each reads files, runs one step and writes its result (``args`` is the
parsed command line of :mod:`neuslice.cli.main`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import neuslice

from ..engine.calls import call_model
from ..engine.graph import discover
from ..engine.slices import Profile, Slices
from ..io import container
from ..io.modelfile import save_model
from ..maintain import RestructuredModel, TaskAwareModel, incremental, readapt
from ..maintain._common import head_module
from . import report
from .common import (RestructureOptions, UsageError, acc, bar, class_list, emit, factory_of, head_outputs, kv,
                     load_data_of, load_model_of, model_args, resolve_device, run_restructure, train_bar)
from .demo import DemoConfig, run_demo
from .report import make_slices, print_layers, print_summary, slices_summary


def _profile_classes(model, ds) -> list:
    """The classes of a profile: as many as the model's head scores (declared classes win over the labels
    the data happens to hold: task-A data of a 10-output model still gives a 10-class profile)."""
    k = head_outputs(model, ds)
    names = list(ds.class_names)
    if len(names) > k:
        raise ValueError(f"{ds.source} declares {len(names)} classes {names[:12]} but the model scores {k}: "
                         "pass --classes with the model's classes, or the matching --model")
    return names + [str(c) for c in range(len(names), k)]


def cmd_profile(args) -> int:
    model = load_model_of(args)
    ds = load_data_of(args, args.data, model=model)
    layers = [n.strip() for n in args.layers.split(",")] if args.layers else None
    names = _profile_classes(model, ds)
    prof = neuslice.profile(model, bar(args, ds, "profile"), len(names), class_names=names,
                            metrics=args.metrics, target=args.target, layers=layers, progress=False)
    prof.to("cpu").save(args.out)
    counts = prof.counts.tolist()
    result = {"profile": str(args.out), "data": ds.source, "samples": int(sum(counts)),
              "per_class": {c: int(n) for c, n in zip(prof.class_names, counts)}, "metrics": list(prof.metrics),
              "layers": [{"name": e["name"], "type": e["type"], "neurons": int(e["n"])} for e in prof.layers]}
    return emit(args, result, kv)


def cmd_merge(args) -> int:
    profs = [Profile.load(p) for p in args.profiles]
    total = profs[0]
    for p in profs[1:]:
        total = total + p
    total.save(args.out)
    result = {"profile": str(args.out), "merged": [str(p) for p in args.profiles],
              "samples": int(total.counts.sum()), "batches": total.num_batches}
    return emit(args, result, kv)


def cmd_slice(args) -> int:
    prof = Profile.load(args.profile)
    value = args.theta if args.mode == "semantic" else args.ratio
    slices = make_slices(prof, args.mode, args.metric, value, share=args.share, tau=args.tau, min_keep=args.min_keep)
    slices.save(args.out)
    result = {"slices": str(args.out), **slices_summary(slices)}
    return emit(args, result, print_layers)


def _model_and_slices(args):
    """The model of ``--model/--weights``, its slices (checked against it), and the class names."""
    model = load_model_of(args)
    slices = Slices.load(args.slices, model)
    return model, slices, slices.class_names


def _save_result(args, model, new, step: str, res: dict) -> int:
    """Write ``new`` to ``--out`` with ``res`` as its report; print the result."""
    save_model(args.out, new, spec=factory_of(args, model), model_args=model_args(args), report={step: res})
    return emit(args, {"model": str(args.out), **res}, kv)


def _bar_or_none(args, ds, desc: str):
    return None if ds is None else bar(args, ds, desc)


def cmd_restructure(args) -> int:
    model, slices, names = _model_and_slices(args)
    train, test = (load_data_of(args, s, names, model) for s in (args.data, args.test_data))
    keep = class_list(args.keep, names, "--keep")
    opts = RestructureOptions(mode=args.mode, input_shape=args.input_shape, finetune_epochs=args.finetune_epochs,
                              lr=args.lr, compress=args.compress, compress_method=args.compress_method)
    new, res = run_restructure(args, opts, model, slices, keep, train, test)
    return _save_result(args, model, new, "restructure", res)


def cmd_readapt(args) -> int:
    model, slices, names = _model_and_slices(args)
    tune = class_list(args.tune, names, "--tune") if args.tune else None
    if args.replay is not None and args.replay_data is None:
        raise UsageError(f"--replay {args.replay} needs --replay-data (the original training data)")
    data, orig, new_test, old = (load_data_of(args, s, names, model) for s in
                                 (args.data, args.test_data, args.new_test_data, args.replay_data))
    with train_bar(args, data, "readapt") as train:   # new samples are scored on --data by default: a bar of its own
        new, rep = readapt(model, slices, train, classes=tune, epochs=args.epochs, lr=args.lr,
                           optimizer=args.optimizer, eval_data=_bar_or_none(args, orig, "eval original"),
                           new_eval_data=bar(args, new_test or data, "eval new"), replay=args.replay,
                           replay_data=_bar_or_none(args, old, "replay"))
    return _save_result(args, model, new, "readapt", rep.as_dict())


def cmd_incremental(args) -> int:
    model, slices, names = _model_and_slices(args)
    try:                                 # before the data: a class-count mismatch is the usual first mistake
        head_module("neuslice incremental", discover(model, slices.layer_names), model, len(names))
    except ValueError as e:
        raise UsageError(str(e)) from None
    new_classes = class_list(args.new_classes, names, "--new-classes")
    data, replay, test_a, test_b = (load_data_of(args, s, names, model) for s in
                                    (args.data, args.replay_data, args.test_a, args.test_b))
    if (args.replay is None) != (replay is None):
        raise UsageError("--replay and --replay-data go together")
    with train_bar(args, data, "incremental") as train:
        out, rep = incremental(model, slices, train, new_classes=new_classes, replay=args.replay,
                               replay_data=_bar_or_none(args, replay, "replay"), objective=args.objective,
                               epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                               eval_data=_bar_or_none(args, test_a, "eval task A"),
                               new_eval_data=_bar_or_none(args, test_b, "eval task B"))
    return _save_result(args, model, out, "incremental", rep.as_dict())


def _task_predict(model, task):
    return lambda x: model.predict(x, task=task)


def _scored(ds, classes) -> int:
    """How many samples of ``ds`` an accuracy over ``classes`` counts (None: all)."""
    return len(ds.y) if classes is None else int(torch.isin(ds.y, torch.as_tensor(classes)).sum())


def cmd_predict(args) -> int:
    model = load_model_of(args)
    ds = load_data_of(args, args.data, model=model)
    tasks = model.tasks if isinstance(model, TaskAwareModel) else None
    if args.task is not None and (tasks is None or args.task not in tasks):
        valid = f"the model's tasks are {list(tasks)}" if tasks else \
            "this model has no tasks (only models written by incremental do)"
        raise UsageError(f"--task {args.task!r}: {valid}")
    if tasks is not None:
        # without --task: every neuron, argmax over all classes' logits, i.e. the task is inferred
        predict, classes = _task_predict(model, args.task), tasks.get(args.task, sorted(sum(tasks.values(), [])))
        how = f"task {args.task}" if args.task else "task-inferred: every neuron, argmax over every class"
    elif isinstance(model, RestructuredModel):
        predict, classes, how = model.predict, model.class_map.tolist(), "the restructured model's classes"
    else:
        predict, classes, how = (lambda x: call_model(model, x).argmax(-1)), None, "every class"
    preds = torch.cat([predict(x) for x, _ in bar(args, ds, "predict")])
    scored = _scored(ds, classes)
    result = {"data": ds.source, "samples": int(preds.numel()), "accuracy": acc(predict, ds, args, classes),
              "accuracy_samples": scored, "accuracy_of": how, "classes": classes}
    if scored != len(ds.y):
        result["note"] = (f"predictions cover all {len(ds.y)} samples; the accuracy counts the {scored} labelled "
                          f"in {classes}")
    if tasks is not None and args.task is None:
        result["accuracy_by_task"] = {t: acc(_task_predict(model, t), ds, args, c, f"evaluate task {t}")
                                      if _scored(ds, c) else None for t, c in tasks.items()}
    if args.out:
        lines = ["index,label,prediction"] + [f"{i},{int(y)},{int(p)}" for i, (y, p) in enumerate(zip(ds.y, preds))]
        container.write_atomic("neuslice predict", args.out, ("\n".join(lines) + "\n").encode())
        result["predictions"] = str(args.out)
    return emit(args, result, kv)


def cmd_report(args) -> int:
    if not args.profile and not args.slices:
        raise UsageError("report needs --profile or --slices")
    prof = Profile.load(args.profile) if args.profile else None
    slices = Slices.load(args.slices) if args.slices else make_slices(prof, "semantic", args.metric, args.theta)
    curves = None
    if args.test_data:
        if prof is None or not (args.model or args.weights):
            raise UsageError("accuracy curves (--test-data) need --profile and --model/--weights")
        model = load_model_of(args)
        test = load_data_of(args, args.test_data, slices.class_names, model)
        curves = report.accuracy_curves(model, prof, bar(args, test, "read test data"), slices.metric,
                                        report.default_subsets(slices), progress=not args.quiet)
    maint = report.load_results(args.results or [])
    summary = {"profile": args.profile, "slices": args.slices, **slices_summary(slices)}
    index = report.write_report(Path(args.out), slices=slices, curves=curves, maintenance=maint, summary=summary)
    return emit(args, {"report": str(index), "figures": report.figures_of(index)}, kv)


def cmd_demo(args) -> int:
    config = DemoConfig(seed=args.seed, epochs=args.epochs, theta=args.theta, metric=args.metric,
                        maintenance=not args.no_maintenance, device=str(resolve_device(args.device)))
    summary = run_demo(Path(args.out), config, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
        print(f"report written to {args.out}/index.html")
    return 0


def cmd_info(args) -> int:
    info = neuslice.backend_info()
    print(json.dumps(info, indent=None if args.json else 1, default=str))
    return 0
