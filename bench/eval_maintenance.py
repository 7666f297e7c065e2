"""The paper's three maintenance experiments in miniature, on scikit-learn digits (CPU, one thread).

1. Restructure: for every pair of classes and a 5-class subset, the physical model's parameters and CPU
   inference time against the original, accuracy on the kept classes before and after a 1-epoch
   fine-tune; then magnitude compression to 90% with and without slicing first (iterations, accuracy).
2. Re-adapt: new samples = digits shifted by one pixel right and down plus Gaussian noise (σ = 0.1);
   critical-neuron tuning against full fine-tuning and against training the head only.
3. Incremental: classes 0–4 are task A, 5–9 task B; naive fine-tuning, replay 5/10/100%, a layer-level
   scheme (last conv block + head), ours, ours + replay 10%; and ours across Θ.

Writes ``bench/results/maintenance_*.csv`` and ``bench/results/maintenance.png`` and prints markdown
tables. ``python bench/eval_maintenance.py`` (about 2–4 minutes on a shared 2-core box);
``--quick`` runs 6 pairs instead of 45.
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import statistics
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

import neuslice
import neuslice.models as M
from neuslice.io.digits import load_digits, subset_classes
from neuslice.maintain import compress, evaluate, finetune, incremental, readapt, restructure
from neuslice.maintain import _common as C
from neuslice.maintain.incremental import task_loss

RESULTS = Path(__file__).resolve().parent / "results"
A, B = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
FIVE = (0, 2, 4, 6, 8)


# ---------------------------------------------------------------------------------------------
# data and the base models

def loader(x, y, batch_size=64, shuffle=False, seed=0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def split(name: str, classes: Sequence[int] = tuple(range(10)), **kw) -> DataLoader:
    return loader(*subset_classes(*load_digits(name), classes), shuffle=name == "train", **kw)


def corrupt(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The fixed corruption: shift one pixel right and down (wrapping), add N(0, 0.1²) noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.roll(x, shifts=(1, 1), dims=(2, 3)) + 0.1 * torch.randn(x.shape, generator=g)


SEED = 0   # the base models' initialisation and batch order (--seed)


def base_model(classes: Sequence[int], epochs: int = 10) -> torch.nn.Module:
    """digits_cnn (Conv16-BN-ReLU-pool, Conv32-BN-ReLU, 2×2 pool, Linear 128→10) trained on ``classes``."""
    return M.fit(M.build("digits_cnn", seed=SEED), split("train", classes), epochs=epochs, lr=0.05, seed=SEED)


def sliced(model, classes: Sequence[int], theta: float, metric: str = "taylor"):
    prof = neuslice.profile(model, split("train", classes), 10, progress=False)
    return neuslice.semantic_slice(prof, metric, theta, classes=list(classes))


def acc_restricted(model, data, classes) -> float:
    return evaluate(C.restricted_predict(model, classes), data, classes)


def cpu_ms(model, x, reps: int = 30) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def write_csv(name: str, rows: List[Dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"maintenance_{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def md_table(rows: List[Dict], cols: Sequence[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 1. restructure

FT = dict(batch_size=16, lr=1e-3)    # the one-epoch fine-tune after restructuring (AdamW)


def restructure_one(model, s, keep: Sequence[int], x_time) -> Dict:
    te, tr = split("test", keep), split("train", keep, batch_size=FT["batch_size"])
    phys, _ = restructure(model, s, keep, example_inputs=x_time[:2])
    tuned, _ = finetune(phys, tr, epochs=1, lr=FT["lr"])
    total = C.param_count(model)
    return {"classes": "-".join(map(str, keep)), "params": total, "params_sliced": phys.num_params,
            "removed": 1 - phys.num_params / total, "ms_original": cpu_ms(model, x_time),
            "ms_sliced": cpu_ms(phys, x_time), "acc_original": acc_restricted(model, te, keep),
            "acc_original_10way": evaluate(lambda v: model(v).argmax(1), te, keep),
            "acc_sliced": evaluate(phys.predict, te), "acc_sliced_ft1": evaluate(tuned.predict, te)}


def exp_restructure(theta: float, quick: bool, metric: str = "taylor") -> List[Dict]:
    model = base_model(range(10))
    s = sliced(model, range(10), theta, metric)
    x_time = load_digits("test")[0][:256]
    pairs = list(itertools.combinations(range(10), 2))
    pairs = pairs[::8] if quick else pairs
    rows = [restructure_one(model, s, list(p), x_time) for p in pairs + [FIVE]]
    for r in rows:
        r["theta"] = theta
    return rows


def exp_compress(theta: float, keeps: Sequence[Sequence[int]]) -> List[Dict]:
    model = base_model(range(10))
    s = sliced(model, range(10), theta)
    x = load_digits("test")[0][:2]
    rows = []
    for keep, method in itertools.product(keeps, ("global", "uniform+", "erk", "lamp")):
        tr, te = split("train", keep), split("test", keep)
        phys, _ = finetune(restructure(model, s, keep, example_inputs=x)[0],
                           split("train", keep, batch_size=FT["batch_size"]), epochs=1, lr=FT["lr"])
        for name, start in (("compress only", model), ("slice + compress", phys)):
            _, rep = compress(start, tr, 0.9, method=method, step=0.2, epochs=1, lr=0.01, eval_data=te)
            rows.append({"classes": "-".join(map(str, keep)), "method": method, "pipeline": name,
                         "iterations": rep.iterations, "compression": rep.compression_rate,
                         "acc_before": rep.accuracy_before, "acc_after": rep.accuracy_after})
    return rows


# ---------------------------------------------------------------------------------------------
# 2. re-adapt

def _baseline(model, data, masks, norms, epochs, lr) -> torch.nn.Module:
    net = copy.deepcopy(model)
    masks = {n: None for n, _ in net.named_parameters()} if masks is None else masks
    C.fit_masked(net, data, masks, epochs=epochs, lr=lr, optimizer="adamw", frozen_norms=norms)
    return net


def exp_readapt(thetas: Sequence[float], epochs: int = 5, lr: float = 1e-3) -> List[Dict]:
    model = base_model(range(10))
    prof = neuslice.profile(model, split("train"), 10, progress=False)
    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")
    new_tr = loader(corrupt(x_tr[:400], seed=1), y_tr[:400], shuffle=True)
    new_te, clean_te = loader(corrupt(x_te, seed=2), y_te), loader(x_te, y_te)
    rows = []
    for theta in thetas:
        s = neuslice.semantic_slice(prof, "taylor", theta)
        _, rep = readapt(model, s, new_tr, epochs=epochs, lr=lr, eval_data=clean_te, new_eval_data=new_te)
        rows.append({"method": "critical-neuron tuning (ours)", "theta": theta, "trainable": rep.trainable_fraction,
                     "corrupted_before": rep.new_acc_before, "corrupted_after": rep.new_acc_after,
                     "clean_before": rep.orig_acc_before, "clean_after": rep.orig_acc_after})
    head = C.param_count(model.head) / C.param_count(model)
    for name, masks, norms, frac in (("full fine-tuning", None, None, 1.0),
                                     ("last layer only", {"head.weight": None, "head.bias": None}, {}, head)):
        net = _baseline(model, new_tr, masks, norms, epochs, lr)
        rows.append({"method": name, "theta": "", "trainable": frac, "corrupted_before": rep.new_acc_before,
                     "corrupted_after": evaluate(lambda v: net(v).argmax(1), new_te),
                     "clean_before": rep.orig_acc_before, "clean_after": evaluate(lambda v: net(v).argmax(1), clean_te)})
    return rows


# ---------------------------------------------------------------------------------------------
# 3. incremental

OPT_INC = "sgd"   # the incremental runs use the base model's own recipe: SGD, momentum 0.9


def _replay_loader(frac: float, seed: int = 0) -> DataLoader:
    xb, yb = subset_classes(*load_digits("train"), B)
    xa, ya = subset_classes(*load_digits("train"), A)
    pick = torch.randperm(len(ya), generator=torch.Generator().manual_seed(seed))[:max(1, round(frac * len(ya)))]
    return loader(torch.cat([xb, xa[pick]]), torch.cat([yb, ya[pick]]), shuffle=True, seed=seed)


def _fit_tasks(model, data, masks, epochs, lr, objective):
    net = copy.deepcopy(model)
    masks = {n: None for n, _ in net.named_parameters()} if masks is None else masks
    C.fit_masked(net, data, masks, epochs=epochs, lr=lr, optimizer=OPT_INC, momentum=0.9,
                 loss_fn=task_loss(10, [A, B], objective))
    return net, sum(p.numel() for n, p in net.named_parameters() if n in masks)


def exp_incremental(theta: float, epochs: int, lr: float, objective: str) -> List[Dict]:
    """Every method trains with the same ``objective`` (``"joint"``: cross-entropy over the logits of all ten
    classes; ``"task"``: over the sample's own task's logits); accuracies are task-aware (A or B logits)."""
    model = base_model(A)
    te_a, te_b = split("test", A), split("test", B)
    total = C.param_count(model)
    rows = [{"objective": objective, "method": "original (task A only)", "theta": "", "trainable": 0.0,
             "task_a": acc_restricted(model, te_a, A), "task_b": acc_restricted(model, te_b, B)}]
    layer = {n: None for n, _ in model.named_parameters() if n.startswith(("features.4", "features.5", "head"))}
    for name, data, masks in (("naive fine-tuning", split("train", B), None), ("replay 5%", _replay_loader(0.05), None),
                              ("replay 10%", _replay_loader(0.10), None), ("replay 100%", _replay_loader(1.0), None),
                              ("layer-level (last conv block + head)", split("train", B), layer)):
        net, n = _fit_tasks(model, data, masks, epochs, lr, objective)
        rows.append({"objective": objective, "method": name, "theta": "", "trainable": n / total,
                     "task_a": acc_restricted(net, te_a, A), "task_b": acc_restricted(net, te_b, B)})
    s = sliced(model, A, theta)
    for name, replay in (("ours", None), ("ours + replay 10%", 0.10)):
        _, rep = incremental(model, s, split("train", B), new_classes=list(B), replay=replay, replay_data=split("train", A),
                             epochs=epochs, lr=lr, optimizer=OPT_INC, objective=objective, eval_data=te_a,
                             new_eval_data=te_b)
        rows.append({"objective": objective, "method": name, "theta": theta, "trainable": rep.trainable_params / total,
                     "task_a": rep.task_a_acc_after, "task_b": rep.task_b_acc_after})
    return rows


def theta_for_incremental(theta: float) -> float:
    """``theta`` lowered in steps of 0.1 (down to 0.5) until the layer feeding the head keeps a free neuron for
    task A: the configuration ``neuslice.incremental`` warns about collapses task B under the joint objective
    (seen with --seed 1 at 0.7). Decided from task A's model and slices alone, no task-B data."""
    model = base_model(A)
    while True:
        s = sliced(model, A, theta)
        plan = C.plan_of("eval", s, model)
        head_name, _ = C.head_module("eval", plan, model, s.num_classes)
        frozen = s.mask(list(A))
        if any(bool((~frozen[n]).any()) for n in C.head_inputs(plan, head_name)) or theta <= 0.5 + 1e-9:
            return theta
        theta = round(theta - 0.1, 10)


def exp_theta(thetas: Sequence[float], epochs: int, lr: float, objective: str) -> List[Dict]:
    model = base_model(A)
    te_a, te_b = split("test", A), split("test", B)
    rows = []
    for theta in thetas:
        _, rep = incremental(model, sliced(model, A, theta), split("train", B), new_classes=list(B), epochs=epochs, lr=lr,
                             optimizer=OPT_INC, objective=objective, eval_data=te_a, new_eval_data=te_b)
        rows.append({"theta": theta, "free_neurons": rep.free_fraction,
                     "trainable": rep.trainable_params / rep.total_params, "task_a_original": rep.task_a_acc_before,
                     "task_a": rep.task_a_acc_after, "task_b": rep.task_b_acc_after})
    return rows


# ---------------------------------------------------------------------------------------------
# plot, tables, verdicts

def plot(pairs, comp, rea, inc) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    a = ax[0, 0]
    a.scatter([r["removed"] for r in pairs], [100 * (r["acc_sliced_ft1"] - r["acc_original"]) for r in pairs], s=14)
    a.axhline(-1, color="r", lw=0.8, ls="--")
    a.axvline(0.5, color="r", lw=0.8, ls="--")
    a.set(xlabel="fraction of parameters removed",
          ylabel="acc. after 1-epoch FT minus original restricted to kept classes (points)",
          title="restructure: kept classes vs original")
    a = ax[0, 1]
    labels = sorted({(r["classes"], r["method"]) for r in comp})
    for k, pipe in enumerate(("compress only", "slice + compress")):
        its = [next(r["iterations"] for r in comp if (r["classes"], r["method"]) == lab and r["pipeline"] == pipe)
               for lab in labels]
        a.bar([i + 0.4 * k for i in range(len(labels))], its, width=0.4, label=pipe)
    a.set_xticks([i + 0.2 for i in range(len(labels))], [f"{c}\n{m}" for c, m in labels], fontsize=7)
    a.set(ylabel="prune/fine-tune iterations to 90%", title="compression with and without slicing first")
    a.legend()
    _bars(ax[1, 0], [{**r, "method": f"{r['method']} {r['theta']}"} for r in rea], ("corrupted_after", "clean_after"),
          "re-adapt to shifted+noisy digits")
    _bars(ax[1, 1], [r for r in inc if r["objective"] == "joint"], ("task_a", "task_b"),
          "incremental (joint objective): task A (0-4) / task B (5-9)")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "maintenance.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bars(a, rows, keys, title):
    for k, key in enumerate(keys):
        a.bar([i + 0.4 * k for i in range(len(rows))], [r[key] for r in rows], width=0.4, label=key)
    a.set_xticks([i + 0.2 for i in range(len(rows))], [r["method"] for r in rows], rotation=25, ha="right",
                 fontsize=7)
    a.set(ylabel="accuracy", ylim=(0, 1.05), title=title)
    a.legend(fontsize=8)


def verdicts(pairs, inc) -> List[str]:
    two = [r for r in pairs if r["classes"].count("-") == 1]
    worst = min(two, key=lambda r: r["removed"])

    def within(r, base):
        return r[base] - r["acc_sliced_ft1"] <= 0.01 + 1e-9

    def drop(base):
        d = max(two, key=lambda r: r[base] - r["acc_sliced_ft1"])
        return f"largest drop {100 * (d[base] - d['acc_sliced_ft1']):.2f} points, pair {d['classes']}"

    by = {r["method"]: r for r in inc if r["objective"] == "joint"}
    ours, naive, orig = by["ours"], by["naive fine-tuning"], by["original (task A only)"]
    return [
        f"any 2 of 10 classes removes >= half of the parameters: {worst['removed'] >= 0.5} "
        f"(minimum {worst['removed']:.3f}, pair {worst['classes']}, over {len(two)} pairs)",
        f"after a 1-epoch fine-tune, accuracy on the kept classes within 1 point of the original "
        f"model's (its 10-class predictions on those classes' test samples) on every pair: "
        f"{all(within(r, 'acc_original_10way') for r in two)} "
        f"({sum(within(r, 'acc_original_10way') for r in two)}/{len(two)}; {drop('acc_original_10way')})",
        f"  against the stricter baseline, the original restricted to the kept classes' logits: "
        f"{sum(within(r, 'acc_original') for r in two)}/{len(two)} within 1 point ({drop('acc_original')})",
        f"incremental, ours keeps task A within 2 points of the original: {orig['task_a'] - ours['task_a'] <= 0.02} "
        f"({100 * orig['task_a']:.1f} -> {100 * ours['task_a']:.1f})",
        f"ours reaches >= 90% of naive fine-tuning's task-B accuracy: {ours['task_b'] >= 0.9 * naive['task_b']} "
        f"({100 * ours['task_b']:.1f} vs {100 * naive['task_b']:.1f})",
        f"naive fine-tuning loses > 30 points on task A: {orig['task_a'] - naive['task_a'] > 0.30} "
        f"({100 * orig['task_a']:.1f} -> {100 * naive['task_a']:.1f})",
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 class pairs instead of all 45")
    ap.add_argument("--theta", type=float, default=0.7, help="Θ of the restructure / re-adapt slices")
    ap.add_argument("--theta-inc", type=float, default=0.7,
                    help="Θ of the incremental slices (lowered if no neuron feeding the head is free: see "
                         "theta_for_incremental)")
    ap.add_argument("--epochs-inc", type=int, default=10)
    ap.add_argument("--lr-inc", type=float, default=0.05)
    ap.add_argument("--opt-inc", choices=("sgd", "adamw"), default="sgd")
    ap.add_argument("--keep-theta-inc", action="store_true", help="use --theta-inc as given, never lowered")
    ap.add_argument("--seed", type=int, default=0, help="seed of the base models (initialisation, batch order)")
    args = ap.parse_args(argv)
    global OPT_INC, SEED
    OPT_INC, SEED = args.opt_inc, args.seed
    torch.set_num_threads(1)     # tiny models: one thread is fastest and steadiest on a shared box
    t0 = time.time()
    pairs = exp_restructure(args.theta, args.quick)
    comp = exp_compress(args.theta, [[2, 7], list(FIVE)])
    rea = exp_readapt((0.3, 0.5, args.theta))
    if not args.keep_theta_inc:
        args.theta_inc = theta_for_incremental(args.theta_inc)
    inc = [r for obj in ("joint", "task") for r in exp_incremental(args.theta_inc, args.epochs_inc, args.lr_inc, obj)]
    th = exp_theta((0.5, 0.6, 0.7, 0.8, 0.9), args.epochs_inc, args.lr_inc, "joint")
    for name, rows in (("restructure", pairs), ("compress", comp), ("readapt", rea), ("incremental", inc),
                       ("incremental_theta", th)):
        write_csv(name, rows)
    png = plot(pairs, comp, rea, inc)
    _print(args, pairs, comp, rea, inc, th, png, time.time() - t0)


def _print(args, pairs, comp, rea, inc, th, png, seconds) -> None:
    two = [r for r in pairs if r["classes"].count("-") == 1]
    summary = {"classes": f"{len(two)} pairs (mean)", **{k: statistics.mean(r[k] for r in two) for k in
                                                          ("params_sliced", "removed", "ms_original", "ms_sliced",
                                                           "acc_original", "acc_original_10way", "acc_sliced",
                                                           "acc_sliced_ft1")}}
    summary["params"] = two[0]["params"]
    five = [r for r in pairs if r["classes"].count("-") == 4]
    cols = ["classes", "params", "params_sliced", "removed", "ms_original", "ms_sliced", "acc_original",
            "acc_original_10way", "acc_sliced", "acc_sliced_ft1"]
    print(f"### Restructure (Θ = {args.theta}, taylor)\n")
    print(md_table([summary, min(two, key=lambda r: r["removed"]), max(two, key=lambda r: r["removed"])] + five, cols))
    print("\n### Compression to 90% sparsity, with and without slicing first\n")
    print(md_table(comp, ["classes", "method", "pipeline", "iterations", "compression", "acc_before", "acc_after"]))
    print("\n### Re-adapt (5 epochs, AdamW lr 1e-3, 400 corrupted training samples)\n")
    print(md_table(rea, ["method", "theta", "trainable", "corrupted_before", "corrupted_after", "clean_before", "clean_after"]))
    print(f"\n### Incremental (Θ = {args.theta_inc}, {args.epochs_inc} epochs, {args.opt_inc} lr {args.lr_inc})\n")
    print(md_table(inc, ["objective", "method", "theta", "trainable", "task_a", "task_b"]))
    print("\n### Ours across Θ (joint objective)\n")
    print(md_table(th, ["theta", "free_neurons", "trainable", "task_a_original", "task_a", "task_b"]))
    print("\n### Done-when checks\n")
    for v in verdicts(pairs, inc):
        print(f"- {v}")
    print(f"\nwrote {RESULTS}/maintenance_*.csv and {png} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
