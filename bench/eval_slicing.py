"""Slicing precision (the paper's RQ1) on scikit-learn digits: accuracy of the masked model against the
whole-model compression rate, per metric and slicing mode.

For a small Conv-BN-ReLU CNN and an MLP trained on digits, profile the training split once (all five
metrics), then for each metric sweep semantic slicing over Θ = 0.90 … 0.99 and category/global slicing
over ratios 10 % … 100 %. Each point reports the compression rate (fraction of parameters removed) and
the test accuracy of the masked model serving all ten classes, and serving class pairs (mean over
pairs; logits restricted to the pair, head rows of other classes counted as removed).

Writes bench/results/eval_slicing.csv and bench/results/eval_slicing.png.

    python bench/eval_slicing.py                 # all 45 class pairs; ~30 s on 2 idle cores
    python bench/eval_slicing.py --pairs 12      # a fixed sample of 12 pairs
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import random
import time

import torch

import neuslice
import neuslice.models as M
from neuslice.io.digits import digits_loaders, load_digits

THETAS = [round(0.90 + 0.01 * i, 2) for i in range(10)]
RATIOS = [round(0.1 * i, 1) for i in range(1, 11)]
MODES = ("semantic", "category", "global")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _slices(prof, metric, mode, value):
    if mode == "semantic":
        return neuslice.semantic_slice(prof, metric, value)
    if mode == "category":
        return neuslice.category_slice(prof, metric, value)
    return neuslice.global_slice(prof, metric, value)


@torch.no_grad()
def _accuracy(model, x, y, classes=None):
    logits = model(x)
    if classes is None:
        return float((logits.argmax(1) == y).float().mean())
    cls = torch.tensor(classes)
    return float((cls[logits[:, cls].argmax(1)] == y).float().mean())


def _points(name, model, prof, x, y, pairs):
    rows = []
    base_all = _accuracy(model, x, y)
    by_pair = {p: (x[torch.isin(y, torch.tensor(p))], y[torch.isin(y, torch.tensor(p))]) for p in pairs}
    base_pair = sum(_accuracy(model, *by_pair[p], list(p)) for p in pairs) / len(pairs)
    for metric in neuslice.METRICS:
        for mode in MODES:
            for value in (THETAS if mode == "semantic" else RATIOS):
                s = _slices(prof, metric, mode, value)
                with s.apply(model, range(10)):
                    acc = _accuracy(model, x, y)
                rows.append(dict(model=name, metric=metric, mode=mode, value=value, serving="all",
                                 compression=s.compression_rate(model, range(10)), accuracy=acc,
                                 unsliced_accuracy=base_all))
                accs, comps = [], []
                for p in pairs:
                    with s.apply(model, list(p)):
                        accs.append(_accuracy(model, *by_pair[p], list(p)))
                    comps.append(s.compression_rate(model, list(p)))
                rows.append(dict(model=name, metric=metric, mode=mode, value=value, serving="pairs",
                                 compression=sum(comps) / len(comps), accuracy=sum(accs) / len(accs),
                                 unsliced_accuracy=base_pair))
    return rows


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    panels = [(m, s) for m in models for s in ("all", "pairs")]
    fig, axes = plt.subplots(len(panels), len(neuslice.METRICS), figsize=(4 * len(neuslice.METRICS),
                                                                        3.2 * len(panels)), squeeze=False)
    for i, (m, serving) in enumerate(panels):
        for j, metric in enumerate(neuslice.METRICS):
            ax = axes[i][j]
            for mode, style in zip(MODES, ("o-", "s--", "^:")):
                pts = sorted((r["compression"], r["accuracy"]) for r in rows if (r["model"], r["serving"],
                             r["metric"], r["mode"]) == (m, serving, metric, mode))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=mode, markersize=3)
            base = next(r["unsliced_accuracy"] for r in rows if (r["model"], r["serving"]) == (m, serving))
            ax.axhline(base, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{m}, {serving} classes, {metric}", fontsize=9)
            ax.set_xlabel("compression rate")
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _summary(rows):
    """Per model, serving and mode: the highest compression whose accuracy stays within 1 point of the
    unsliced model (the best metric), and the accuracy at the paper's Θ = 0.95 / ratio 0.5."""
    lines = []
    for (m, serving, mode) in sorted({(r["model"], r["serving"], r["mode"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["serving"], r["mode"]) == (m, serving, mode)]
        ok = [r for r in sel if r["accuracy"] >= r["unsliced_accuracy"] - 0.01]
        best = max(ok, key=lambda r: r["compression"]) if ok else None
        mid = [r for r in sel if r["value"] == (0.95 if mode == "semantic" else 0.5)]
        top = max(mid, key=lambda r: r["accuracy"])
        lines.append(f"{m:4s} {serving:5s} {mode:8s} | within 1 pt: "
                     + (f"{best['compression']:.3f} ({best['metric']}, {best['value']})" if best else "none")
                     + f" | at {'Θ' if mode == 'semantic' else 'p'}={top['value']}: best {top['metric']} "
                       f"acc {top['accuracy']:.3f} comp {top['compression']:.3f}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=45, help="class pairs to serve (a fixed-seed sample; 45 = all)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    # Tiny models, small batches: one thread is ~6x faster than two on a shared 2-core box (measured
    # 3.0 s vs 17.8 s for one metric's CNN sweep over 45 pairs), where OpenMP threads wait on each other.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    torch.manual_seed(args.seed)
    pairs = list(itertools.combinations(range(10), 2))
    pairs = sorted(random.Random(args.seed).sample(pairs, min(args.pairs, len(pairs))))
    train, _ = digits_loaders(64, seed=args.seed)
    x, y = load_digits("test", seed=args.seed)
    rows = []
    for name in ("digits_cnn", "digits_mlp"):
        model = M.fit(M.build(name, seed=args.seed), train, epochs=args.epochs, seed=args.seed)
        prof = neuslice.profile(model, digits_loaders(128, seed=args.seed)[0], 10, metrics=("ens",), progress=False)
        rows += _points(name.replace("digits_", ""), model, prof, x, y, pairs)
        print(f"{name}: test accuracy {rows[-1]['unsliced_accuracy']:.3f} (pairs), done at {time.time() - t0:.0f} s")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "eval_slicing.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, os.path.join(OUT, "eval_slicing.png"))
    print("\n".join(_summary(rows)))
    print(f"{len(rows)} points, {len(pairs)} pairs, {time.time() - t0:.0f} s; wrote {OUT}/eval_slicing.csv, .png")


if __name__ == "__main__":
    main()
