"""``neuslice demo``: the whole job on the embedded digits data, as one pipeline.

Train a Conv-BN-ReLU CNN, profile it, slice it semantically, draw accuracy curves, then the three
maintenance tasks: restructure to two classes, re-adapt to shifted noisy samples of them, and learn
five classes incrementally on a model trained on the other five. Every hyperparameter is a field of
:class:`DemoConfig`, so the pipeline reads top to bottom and a caller can change any of them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

import neuslice

from ..io.data import Dataset, load_data
from ..io.modelfile import save_model
from ..maintain import incremental, readapt
from ..models import build, fit
from . import report
from .common import RestructureOptions, RunOptions, acc, bar, run_restructure, train_bar
from .report import make_slices, slices_summary

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """The demo's settings (the defaults are what ``neuslice demo`` runs)."""
    seed: int = 0
    epochs: int = 15                 # training epochs of the base models
    theta: float = 0.9               # Θ of the semantic slices
    metric: str = "taylor"
    maintenance: bool = True         # run the three maintenance tasks
    model: str = "digits_cnn"
    device: str = "cpu"              # where the models train and run (the data stays on the CPU)
    batch_size: int = 64
    keep: Tuple[int, ...] = (3, 8)   # restructure and re-adapt to these classes
    restructure: RestructureOptions = None   # default: physical, one fine-tune epoch at lr 0.01
    readapt_epochs: int = 10         # readapt's defaults (README, "Re-adapt quality"); at most `epochs`
    readapt_lr: float = 3e-3
    readapt_replay: float = 0.5      # old (clean, all-class) training samples per new sample
    task_a: Tuple[int, ...] = (0, 1, 2, 3, 4)
    task_b: Tuple[int, ...] = (5, 6, 7, 8, 9)
    incremental_theta: float = 0.7   # Θ of task A's slices: lower than `theta` leaves free neurons for task B
    incremental_epochs: int = 10     # at most this many (and at most `epochs`)
    incremental_lr: float = 3e-3

    def __post_init__(self):
        if self.restructure is None:
            self.restructure = RestructureOptions(mode="physical", finetune_epochs=1, lr=0.01)


def _corrupt(x: torch.Tensor, seed: int) -> torch.Tensor:
    """New samples for re-adaptation: shifted one pixel right and down (wrapping) plus N(0, 0.1²) noise."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.roll(x, shifts=(1, 1), dims=(2, 3)) + 0.1 * torch.randn(x.shape, generator=g)


def _maintenance(cfg: DemoConfig, run: RunOptions, model, slices, train: Dataset, test: Dataset) -> Dict:
    keep = list(cfg.keep)
    _, res = run_restructure(run, cfg.restructure, model, slices, keep, train, test)
    out = {"restructure": res}
    new_tr, new_te = (Dataset(_corrupt(d.x, cfg.seed), d.y, d.class_names, f"{d.source} shifted, noisy")
                      .subset(keep) for d in (train, test))
    with train_bar(run, new_tr, "readapt") as data:
        _, rep = readapt(model, slices, data, epochs=min(cfg.readapt_epochs, cfg.epochs), lr=cfg.readapt_lr,
                         replay=cfg.readapt_replay, replay_data=bar(run, train, "replay"),
                         eval_data=bar(run, test, "eval clean"), new_eval_data=bar(run, new_te, "eval new"))
    out["readapt"] = {**rep.as_dict(), "new_samples": f"digits {keep} shifted by (1, 1) pixels plus N(0, 0.1^2) noise"}
    a, b = list(cfg.task_a), list(cfg.task_b)
    model_a = fit(build(cfg.model, seed=cfg.seed).to(cfg.device), bar(run, train.subset(a), "train task A", shuffle=True),
                  epochs=cfg.epochs, seed=cfg.seed)
    prof_a = neuslice.profile(model_a, bar(run, train.subset(a), "profile task A"), train.num_classes,
                              class_names=train.class_names, progress=False)
    slices_a = neuslice.semantic_slice(prof_a, slices.metric, cfg.incremental_theta, classes=a)
    with train_bar(run, train.subset(b), "incremental") as data:
        _, rep = incremental(model_a, slices_a, data, new_classes=b, epochs=min(cfg.incremental_epochs, cfg.epochs),
                             lr=cfg.incremental_lr, eval_data=bar(run, test.subset(a), "eval task A"),
                             new_eval_data=bar(run, test.subset(b), "eval task B"))
    out["incremental"] = rep.as_dict()
    return out


def _pipeline(out: Path, cfg: DemoConfig, run: RunOptions, t0: float) -> Dict:
    train, test = load_data("digits:train"), load_data("digits:test")
    model = fit(build(cfg.model, seed=cfg.seed).to(cfg.device), bar(run, train, "train", shuffle=True), epochs=cfg.epochs,
                seed=cfg.seed)
    base = acc(model, test, run)   # (a module: accuracy moves each batch to the model's device)
    prof = neuslice.profile(model, bar(run, train, "profile"), train.num_classes, class_names=train.class_names,
                            progress=False)
    slices = make_slices(prof, "semantic", cfg.metric, cfg.theta)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / "model.safetensors", model, spec=cfg.model)
    prof.to("cpu").save(out / "profile.safetensors")
    slices.save(out / "slices.safetensors")
    curves = report.accuracy_curves(model, prof, test.loader(cfg.batch_size), cfg.metric,
                                    report.default_subsets(slices), progress=not run.quiet)
    maint = _maintenance(cfg, run, model, slices, train, test) if cfg.maintenance else {}
    summary = {"data": "scikit-learn digits (embedded)", "train_samples": len(train.y), "test_samples": len(test.y),
               "model": cfg.model, "params": sum(p.numel() for p in model.parameters()), "seed": cfg.seed,
               "epochs": cfg.epochs, "test_accuracy": base, **slices_summary(slices)}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    report.write_report(out, slices=slices, curves=curves, maintenance=maint, summary=summary)
    return json.loads((out / "summary.json").read_text())


def run_demo(out: Path, config: Optional[DemoConfig] = None, *, quiet: bool = False) -> Dict:
    """Run the demo pipeline with ``config`` (default: :class:`DemoConfig`) and write the report folder
    ``out`` (``index.html``, figures, ``summary.json``, the model, profile and slices files); returns the
    summary."""
    cfg = config or DemoConfig()
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # one thread: on this 2-core box the demo took 95 s with torch's default threads under load, 8.5 s with one
    # (its batches are tiny, so threads only add synchronisation)
    torch.set_num_threads(1)
    try:
        return _pipeline(Path(out), cfg, RunOptions(batch_size=cfg.batch_size, quiet=quiet, seed=cfg.seed), t0)
    finally:
        torch.set_num_threads(threads)
