"""The report of a slicing run: PNG figures (matplotlib, Agg backend), ``index.html`` and ``summary.json``.

Figures: critical neurons per layer and class; the class-similarity heatmap with the semantic groups
outlined; accuracy against compression rate for global, category-wise and semantic slicing (each point
the mean over class subsets of the masked model's accuracy on the subset, against the fraction of the
model's parameters its slice removes); the maintenance results. The folder is self-contained: the page
references only the PNG files beside it.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .progress import Progress

__all__ = ["THETAS", "RATIOS", "REPORT_FILES", "make_slices", "slices_summary", "default_subsets", "accuracy_curves",
           "load_results", "maintenance_bars", "write_report", "figures_of", "print_layers", "print_summary"]

THETAS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
MODES = ("global", "category", "semantic")
# figure files by name, and every file write_report writes into its folder
_FIGURES = {"critical": "critical_neurons.png", "similarity": "class_similarity.png",
            "curves": "accuracy_vs_compression.png", "maintenance": "maintenance.png"}
REPORT_FILES = ("index.html", "summary.json", *_FIGURES.values())


def make_slices(prof, mode: str, metric: Optional[str], value: float, *, share: float = 0.5, tau: float = 0.5,
                min_keep: int = 1):
    """Slices of ``prof`` in ``mode`` for every class with samples (``metric`` default: taylor if profiled)."""
    import neuslice
    metric = metric or ("taylor" if "taylor" in prof.metrics else prof.metrics[0])
    present = [k for k, c in enumerate(prof.counts.tolist()) if c > 0]
    if mode == "semantic":
        return neuslice.semantic_slice(prof, metric, value, share=share, tau=tau, min_keep=min_keep, classes=present)
    if mode == "category":
        return neuslice.category_slice(prof, metric, value, min_keep=min_keep, classes=present)
    if mode == "global":
        return neuslice.global_slice(prof, metric, value, min_keep=min_keep)
    raise ValueError(f"neuslice.report.make_slices: mode must be one of {MODES}, got {mode!r}")


def slices_summary(slices) -> Dict:
    """Per layer: neurons, mean critical-set size, neurons per category; the semantic groups by name."""
    cats = slices.categories()
    layers = [{"layer": n, "neurons": int(c.shape[1]),
               "critical_per_class_mean": round(float(c[slices.sliced].float().sum(1).mean()), 2),
               **{k: int(cats[k][n].sum()) for k in slices.CATEGORIES}} for n, c in slices.critical_sets.items()]
    groups = [[slices.class_names[k] for k in g] for g in slices.groups()] if slices.mode == "semantic" else []
    return {"mode": slices.mode, "metric": slices.metric, "value": slices.value, "layers": layers, "groups": groups}


def default_subsets(slices, n: int = 10) -> List[List[int]]:
    """Up to ``n`` class pairs ``(k, next sliced class)`` among the sliced classes (one class: itself)."""
    idx = [int(k) for k in torch.nonzero(slices.sliced).flatten()]
    if len(idx) < 2:
        return [idx]
    return [[idx[i], idx[(i + 1) % len(idx)]] for i in range(min(n, len(idx)))]


def _point(model, slices, subsets: Dict[tuple, list]) -> Dict:
    from ..engine.evaluate import accuracy
    rates, accs = [], []
    for t, batches in subsets.items():
        rates.append(slices.compression_rate(model, list(t)))
        with slices.apply(model, list(t)) as masked:
            accs.append(accuracy(masked, batches, classes=list(t)))
    return {"value": slices.value, "compression_rate": round(sum(rates) / len(rates), 4),
            "accuracy": round(sum(accs) / len(accs), 4)}


def _by_subset(test_data, subsets: Sequence[Sequence[int]]) -> Dict[tuple, list]:
    """Each subset's samples of ``test_data`` (tensor batches) as one batch: the masked passes only read those."""
    xs, ys = [], []
    for x, y in test_data:
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    out = {}
    for t in subsets:
        keep = torch.isin(y, torch.as_tensor(list(t), dtype=y.dtype))
        if not bool(keep.any()):
            raise ValueError(f"neuslice.report.accuracy_curves: the test data has no sample of the classes {list(t)}")
        out[tuple(int(c) for c in t)] = [(x[keep], y[keep])]
    return out


def accuracy_curves(model, prof, test_data, metric: Optional[str], subsets: Sequence[Sequence[int]], *,
                    thetas: Sequence[float] = THETAS, ratios: Sequence[float] = RATIOS,
                    progress: bool = False) -> Dict[str, List[Dict]]:
    """``{mode: [{value, compression_rate, accuracy}]}`` for global and category (``ratios``) and semantic
    (``thetas``) slicing of ``prof``: means over ``subsets`` of the masked model on ``test_data``
    (``(inputs, labels)`` tensor batches)."""
    batches = _by_subset(test_data, subsets)
    settings = [(m, v) for m in MODES for v in (thetas if m == "semantic" else ratios)]
    curves: Dict[str, List[Dict]] = {m: [] for m in MODES}
    was = model.training
    model.eval()
    try:
        for mode, v in Progress(settings, "curves", enabled=progress):
            curves[mode].append(_point(model, make_slices(prof, mode, metric, v), batches))
    finally:
        model.train(was)
    return curves


_KEYS = {"restructure": "original_params", "readapt": "new_acc_after", "incremental": "task_a_acc_after"}


def load_results(paths: Sequence) -> Dict[str, Dict]:
    """Maintenance results from model files written by ``neuslice restructure|readapt|incremental`` (their
    metadata) or from their ``--json`` output; ``{task: result}``."""
    from ..io.modelfile import read_weights
    out: Dict[str, Dict] = {}
    for p in paths:
        p = Path(p)
        if p.suffix == ".json":
            try:
                doc = json.loads(p.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{p}: not a JSON file ({e})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{p}: holds a JSON {type(doc).__name__}, not the object that restructure, "
                                 "readapt or incremental print with --json")
        else:
            meta = read_weights(p)[1]
            doc = (meta or {}).get("report")
            if not isinstance(doc, dict) or not doc:
                raise ValueError(f"{p}: not a model file written by neuslice restructure, readapt or incremental")
        tasks = {k: v for k, v in doc.items() if k in _KEYS and isinstance(v, dict)}
        tasks = tasks or {k: doc for k, key in _KEYS.items() if key in doc}
        if not tasks:
            raise ValueError(f"{p}: holds no restructure, readapt or incremental result")
        out.update(tasks)
    return out


# ---------------------------------------------------------------------------------------------
# text

def print_layers(s: Dict) -> None:
    """Text table of :func:`slices_summary`."""
    print(f"{s['mode']} slices ({s['metric']}, {s['value']}); semantic groups: {s['groups']}")
    print(f"{'layer':<20}{'neurons':>8}{'crit/class':>11}{'shared':>8}{'group':>7}{'specific':>9}{'free':>6}")
    for r in s["layers"]:
        print(f"{r['layer']:<20}{r['neurons']:>8}{r['critical_per_class_mean']:>11}{r['shared']:>8}"
              f"{r['group']:>7}{r['specific']:>9}{r['free']:>6}")


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def print_summary(s: Dict) -> None:
    """The demo's summary table."""
    print(f"{s['model']} ({s['params']} parameters) on {s['data']}, {s['train_samples']} train / "
          f"{s['test_samples']} test samples, seed {s['seed']}: test accuracy {s['test_accuracy']:.4f}")
    print_layers(s)
    curves = s.get("curves") or {}
    for mode, pts in curves.items():
        row = ", ".join(f"{p['compression_rate']:.0%}→{p['accuracy']:.3f}" for p in pts[::2])
        print(f"{mode:<9} compression→accuracy: {row}")
    m = s.get("maintenance") or {}
    if m:
        print(f"{'task':<13}{'result'}")
    if "restructure" in m:
        r = m["restructure"]
        print(f"{'restructure':<13}keep {r['classes']}: {r['params']} of {r['original_params']} params "
              f"({r['compression_rate']:.1%} removed); accuracy {_num(r['accuracy_original'])} original, "
              f"{_num(r['accuracy_restructured'])} restructured, {_num(r['accuracy_finetuned'])} fine-tuned")
    if "readapt" in m:
        r = m["readapt"]
        print(f"{'readapt':<13}classes {r['classes']}: {r['trainable_fraction']:.1%} of params trained; new samples "
              f"{r['new_acc_before']:.4f} → {r['new_acc_after']:.4f}; original test "
              f"{r['orig_acc_before']:.4f} → {r['orig_acc_after']:.4f}")
    if "incremental" in m:
        r = m["incremental"]
        sliced = f", task-A slice {_num(r.get('task_a_acc_slice'))}" if "task_a_acc_slice" in r else ""
        print(f"{'incremental':<13}task A {r['old_classes']}: original model {_num(r['task_a_acc_before'])}"
              f"{sliced}, after learning B {_num(r['task_a_acc_after'])}; task B {r['new_classes']}: original model "
              f"{_num(r['task_b_acc_before'])}, after learning B {_num(r['task_b_acc_after'])} "
              f"({r['free_fraction']:.1%} neurons free at theta {r['theta']})")
    print(f"({s['seconds']} s)")


# ---------------------------------------------------------------------------------------------
# figures

def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("neuslice.report: the report's figures need matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    _plt().close(fig)
    return path.name


def fig_critical(slices, path: Path) -> str:
    """Heatmap: fraction of each layer's neurons critical for each class."""
    plt = _plt()
    names = list(slices.critical_sets)
    frac = torch.stack([c.float().mean(1) for c in slices.critical_sets.values()], 1).numpy()   # [K, L]
    k, n_layers = frac.shape
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * n_layers, 1.2 + 0.35 * k))
    im = ax.imshow(frac, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(k):
        for j in range(n_layers):
            n = int(slices.critical_sets[names[j]][i].sum())
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="w" if frac[i, j] < 0.6 else "k")
    ax.set_xticks(range(n_layers), [f"{m}\n({slices.critical_sets[m].shape[1]})" for m in names], fontsize=7)
    ax.set_yticks(range(k), slices.class_names, fontsize=7)
    ax.set_xlabel("layer (neurons)")
    ax.set_ylabel("class")
    ax.set_title("critical neurons per layer and class", fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of the layer")
    return _save(fig, path)


def fig_similarity(slices, path: Path) -> str:
    """Class-similarity heatmap, classes ordered by semantic group, each group outlined."""
    plt = _plt()
    from matplotlib.patches import Rectangle
    groups = slices.groups() if slices.mode == "semantic" else [[int(k) for k in torch.nonzero(slices.sliced)]]
    order = [k for g in groups for k in g]
    sim = slices.similarity()[order][:, order].numpy()
    fig, ax = plt.subplots(figsize=(1.5 + 0.4 * len(order), 1.2 + 0.4 * len(order)))
    im = ax.imshow(sim, cmap="magma", vmin=0.0, vmax=1.0)
    start = 0
    for g in groups:
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), len(g), len(g), fill=False, edgecolor="c", lw=2))
        start += len(g)
    labels = [slices.class_names[k] for k in order]
    ax.set_xticks(range(len(order)), labels, fontsize=7, rotation=90)
    ax.set_yticks(range(len(order)), labels, fontsize=7)
    ax.set_title(f"class similarity; {len(groups)} semantic groups outlined", fontsize=9)
    fig.colorbar(im, ax=ax, label="neuron-weighted Jaccard")
    return _save(fig, path)


def fig_curves(curves: Dict[str, List[Dict]], path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mode, marker in zip(MODES, "os^"):
        pts = sorted(curves.get(mode, []), key=lambda p: p["compression_rate"])
        if pts:
            ax.plot([p["compression_rate"] for p in pts], [p["accuracy"] for p in pts], marker=marker, label=mode)
    ax.set_xlabel("compression rate (fraction of parameters removed)")
    ax.set_ylabel("accuracy on the kept classes")
    ax.set_title("accuracy against compression rate (masked slices)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _bars(ax, title: str, labels: List[str], series: Dict[str, List]) -> None:
    """Grouped bars: one group per label, one bar per series ``{name: values}`` (None: "n/a")."""
    xs, width = range(len(labels)), 0.8 / len(series)
    for j, (name, vals) in enumerate(series.items()):
        off = (j - (len(series) - 1) / 2) * width
        ax.bar([x + off for x in xs], [0.0 if v is None else v for v in vals], width=width * 0.95, label=name)
        for x, v in zip(xs, vals):
            ax.text(x + off, 0.02 if v is None else v + 0.02, "n/a" if v is None else f"{v:.2f}", ha="center",
                    fontsize=6)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylim(0, 1.3)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, loc="upper center", ncol=len(series))


def maintenance_bars(t: str, r: Dict) -> tuple:
    """``(title, group labels, {series: values})`` of the maintenance figure's panel for task ``t``: each bar
    names the model it scores (restructured and fine-tuned apart; the original model, the task-A slice and
    the slice after learning B apart)."""
    if t == "restructure":
        kept = 1.0 - r["compression_rate"]
        series = {"original": [1.0, r["accuracy_original"]], "restructured": [kept, r["accuracy_restructured"]]}
        if r.get("accuracy_finetuned") is not None:
            series["fine-tuned"] = [kept, r["accuracy_finetuned"]]
        return f"restructure: keep {r['classes']}", ["params (share)", "accuracy"], series
    if t == "readapt":
        return (f"readapt: {r['trainable_fraction']:.0%} of params trained", ["new samples", "original data"],
                {"before": [r["new_acc_before"], r["orig_acc_before"]],
                 "after": [r["new_acc_after"], r["orig_acc_after"]]})
    series = {"original model": [r["task_a_acc_before"], r["task_b_acc_before"]]}
    if r.get("task_a_acc_slice") is not None:
        series["task-A slice"] = [r["task_a_acc_slice"], None]
    series["after learning B"] = [r["task_a_acc_after"], r["task_b_acc_after"]]
    return f"incremental: theta {r['theta']}", ["task A", "task B"], series


def fig_maintenance(m: Dict[str, Dict], path: Path) -> str:
    plt = _plt()
    tasks = [t for t in _KEYS if t in m]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        _bars(ax, *maintenance_bars(t, m[t]))
        ax.set_ylabel("fraction")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# the page

def _table(rows: List[Dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "" if v is None else str(v)


def _kv_table(d: Dict) -> str:
    return _table([{"quantity": k, "value": v} for k, v in d.items() if not isinstance(v, dict)])


_CAPTIONS = {
    "critical": "Critical neurons per layer and class: the number in each cell is the size of the class's critical "
                "set in that layer; the colour is its fraction of the layer.",
    "similarity": "Class similarity (neuron-weighted Jaccard of critical sets), classes ordered by semantic group; "
                  "each outlined block is one semantic group.",
    "curves": "Accuracy on the kept classes against the fraction of parameters the slice removes, for global, "
              "category-wise and semantic slicing (means over class pairs; masked models, no fine-tuning).",
    "maintenance": "Maintenance results: restructuring (the original model, the restructured model before any "
                   "fine-tuning, and fine-tuned when it was), re-adaptation, and incremental development (task A: "
                   "the original model, its task-A slice, and that slice after learning task B).",
}


def _page(summary: Dict, figs: Dict[str, str], curves, maintenance) -> str:
    scalars = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>neuslice report</title><style>",
             "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;"
             "font-size:13px;text-align:right}th{background:#f3f3f3}img{max-width:100%}figcaption{font-size:13px}",
             "</style></head><body><h1>neuslice report</h1>", _kv_table(scalars)]
    if summary.get("layers"):
        parts += ["<h2>Slices per layer</h2>", _table(summary["layers"])]
    if summary.get("groups"):
        parts += ["<h2>Semantic groups</h2><ul>"] + [f"<li>{html.escape(', '.join(map(str, g)))}</li>"
                                                      for g in summary["groups"]] + ["</ul>"]
    parts.append("<h2>Figures</h2>")
    for key, name in figs.items():
        parts.append(f"<figure><img src='{html.escape(name)}' alt='{key}'><figcaption>{_CAPTIONS[key]}"
                     "</figcaption></figure>")
    if curves:
        rows = [{"mode": m, **p} for m, pts in curves.items() for p in pts]
        parts += ["<h2>Accuracy against compression rate</h2>", _table(rows)]
    for task, res in (maintenance or {}).items():
        parts += [f"<h2>{html.escape(task)}</h2>", _kv_table(res)]
        if isinstance(res.get("compress"), dict):
            parts += ["<h3>compression</h3>", _kv_table(res["compress"])]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: Path, *, slices, curves: Optional[Dict] = None, maintenance: Optional[Dict] = None,
                 summary: Optional[Dict] = None) -> Path:
    """Write ``out/index.html``, its PNG figures and ``out/summary.json``; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = {"critical": fig_critical(slices, out / _FIGURES["critical"])}
    if int(slices.sliced.sum()) >= 2:
        figs["similarity"] = fig_similarity(slices, out / _FIGURES["similarity"])
    if curves:
        figs["curves"] = fig_curves(curves, out / _FIGURES["curves"])
    if maintenance:
        figs["maintenance"] = fig_maintenance(maintenance, out / _FIGURES["maintenance"])
    doc = {**(summary or {}), "curves": curves, "maintenance": maintenance or {}, "figures": list(figs.values())}
    text = json.dumps(doc, indent=1, default=str)
    (out / "summary.json").write_text(text)
    index = out / "index.html"
    index.write_text(_page(json.loads(text), figs, curves, maintenance))
    return index


def figures_of(index: Path) -> List[str]:
    """The image files ``index.html`` references."""
    return re.findall(r"<img src='([^']+)'", Path(index).read_text())
