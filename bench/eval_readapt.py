"""Re-adapt quality on digits: does critical-neuron tuning keep clean accuracy when the new samples cover two
classes, and what does replay buy?

Base model: digits_cnn trained as ``neuslice demo`` trains it (15 epochs, SGD lr 0.05, batch 64), profiled on the
training split, sliced semantically (Taylor) at Θ = 0.5 / 0.7 / 0.9. Two shifts, both confined to classes 3 and 8
(the new samples are all the training 3s and 8s, shifted; the shifted test set is the test 3s and 8s, shifted):

- ``demo``: the demo's ``_corrupt`` (neuslice/cli/demo.py): rolled one pixel right and down plus N(0, 0.1²) noise;
- ``rot90``: rotated 90° counter-clockwise (the base model calls every rotated 3 and 8 a 4: 0% accuracy).

For each shift and training recipe (epochs, lr; AdamW, batch 64): ``neuslice.readapt`` at each Θ with replay 0,
0.1 and 0.5 (old samples of any class per new sample, from the training split), against full fine-tuning (every
parameter, BatchNorm statistics included) on the very same batches. Clean accuracy is on the whole (unshifted) test
split, shifted accuracy on the shifted test 3s and 8s.

``python bench/eval_readapt.py [--seed 0]`` writes ``bench/results/eval_readapt.csv`` and ``.md`` (about a minute on
one thread, quiet machine; two or three minutes on a busy shared one).
"""
from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

import neuslice
import neuslice.models as M
from neuslice.io.digits import load_digits
from neuslice.maintain import evaluate, readapt
from neuslice.maintain import _common as C

RESULTS = Path(__file__).resolve().parent / "results"
KEEP = (3, 8)
THETAS = (0.5, 0.7, 0.9)
REPLAYS = (0.0, 0.1, 0.5)
RECIPES = ((10, 3e-3), (5, 1e-3))    # (epochs, lr): readapt's defaults, and the demo's
BATCH = 64


def demo_shift(x: torch.Tensor, seed: int) -> torch.Tensor:
    """neuslice/cli/demo.py ``_corrupt``: roll (1, 1) pixels, add N(0, 0.1²) noise from a generator seeded seed + 1."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.roll(x, shifts=(1, 1), dims=(2, 3)) + 0.1 * torch.randn(x.shape, generator=g)


def rot90_shift(x: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.rot90(x, 1, dims=(2, 3)).contiguous()


SHIFTS: Dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {"demo": demo_shift, "rot90": rot90_shift}


def loader(x, y, shuffle: bool = False, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=shuffle, generator=gen)


def shifted(split: str, shift: str, seed: int, shuffle: bool = False) -> DataLoader:
    """The split's 3s and 8s, shifted (the demo corrupts the whole split first, then takes the classes)."""
    x, y = load_digits(split)
    x = SHIFTS[shift](x, seed)
    sel = torch.isin(y, torch.tensor(KEEP))
    return loader(x[sel], y[sel], shuffle=shuffle, seed=seed)


def full_finetune(model, data, replay: float, replay_data, epochs: int, lr: float, seed: int):
    """Every parameter trains (BatchNorm in train mode), on the batches readapt would use with this replay."""
    net = copy.deepcopy(model)
    if replay > 0:
        data, _ = C.with_replay("full fine-tuning", data, replay_data, lambda n, _: max(1, round(replay * n)), seed)
    C.fit_masked(net, data, {n: None for n, _ in net.named_parameters()}, epochs=epochs, lr=lr, optimizer="adamw",
                 seed=seed)
    return net


def run(seed: int, recipes: Sequence, thetas: Sequence[float], replays: Sequence[float]) -> List[Dict]:
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    train, clean_te, old = loader(x, y, shuffle=True, seed=seed), loader(xt, yt), loader(x, y)
    model = M.fit(M.build("digits_cnn", seed=seed), train, epochs=15, seed=seed)
    prof = neuslice.profile(model, loader(x, y), 10, progress=False)
    slices = {t: neuslice.semantic_slice(prof, "taylor", t) for t in thetas}

    def acc(net, data):
        return evaluate(lambda v: net(v).argmax(1), data)
    rows = []
    for shift in SHIFTS:
        # a fresh shuffling loader per run: a DataLoader's generator advances on every pass (readapt passes over
        # data to check labels and to mix replay), so a shared one would give each run other batches
        def new_tr():
            return shifted("train", shift, seed, shuffle=True)
        new_te = shifted("test", shift, seed)
        base = {"clean_before": acc(model, clean_te), "shifted_before": acc(model, new_te)}
        for epochs, lr in recipes:
            for replay in replays:
                common = {"shift": shift, "epochs": epochs, "lr": lr, "replay": replay}
                for t in thetas:
                    net, rep = readapt(model, slices[t], new_tr(), replay=replay, replay_data=old, epochs=epochs,
                                       lr=lr, seed=seed)
                    rows.append({**common, "method": "readapt", "theta": t, "trainable": rep.trainable_fraction,
                                 **base, "clean_after": acc(net, clean_te), "shifted_after": acc(net, new_te)})
                net = full_finetune(model, new_tr(), replay, old, epochs, lr, seed)
                rows.append({**common, "method": "full fine-tuning", "theta": "", "trainable": 1.0, **base,
                             "clean_after": acc(net, clean_te), "shifted_after": acc(net, new_te)})
    return rows


def verdicts(rows: List[Dict]) -> List[str]:
    """Per (shift, recipe, replay): does readapt at every Θ keep more clean accuracy than full fine-tuning, with
    shifted accuracy within 1 point of it (the shifted test set has 89 samples: one sample is 1.1 points)? Against
    full fine-tuning with the same replay, and against full fine-tuning without replay where it was run."""
    out = []
    for key in sorted({(r["shift"], r["epochs"], r["lr"], r["replay"]) for r in rows}):
        shift, epochs, lr, replay = key
        ours = [r for r in rows if (r["shift"], r["epochs"], r["lr"], r["replay"]) == key and r["method"] == "readapt"]
        fts = [r for r in rows if (r["shift"], r["epochs"], r["lr"]) == (shift, epochs, lr)
               and r["method"] == "full fine-tuning" and r["replay"] in (replay, 0.0)]
        for ft in sorted(fts, key=lambda r: -r["replay"]):
            ok = [r["clean_after"] > ft["clean_after"] and r["shifted_after"] >= ft["shifted_after"] - 0.01 for r in ours]
            detail = ", ".join(f"Θ {r['theta']}: {r['clean_after']:.3f} / {r['shifted_after']:.3f}" for r in ours)
            out.append(f"{shift}, {epochs} epochs, lr {lr:g}, readapt replay {replay:g} vs full fine-tuning replay "
                       f"{ft['replay']:g} ({ft['clean_after']:.3f} / {ft['shifted_after']:.3f}): "
                       f"{'PASS' if all(ok) else 'FAIL'} ({sum(ok)}/{len(ok)} Θ; clean / shifted: {detail})")
    return out


def md_table(rows: List[Dict]) -> str:
    cols = ["shift", "epochs", "lr", "replay", "method", "theta", "trainable", "clean_before", "clean_after",
            "shifted_before", "shifted_after"]

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) and not isinstance(v, bool) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="base model, batch order, shift noise and replay draw")
    ap.add_argument("--epochs", type=int, nargs="*", help="recipes' epochs (default: 10 at lr 3e-3 and 5 at lr 1e-3)")
    ap.add_argument("--lr", type=float, nargs="*", help="recipes' learning rates (default 1e-3)")
    ap.add_argument("--replays", type=float, nargs="*", default=list(REPLAYS), help="replay fractions to run")
    ap.add_argument("--out", default=str(RESULTS / "eval_readapt"), help="path stem of the .csv and .md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    recipes = RECIPES if not (args.epochs or args.lr) else \
        [(e, lr) for e in (args.epochs or [5]) for lr in (args.lr or [1e-3])]
    t0 = time.time()
    rows = run(args.seed, recipes, THETAS, args.replays)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = (f"# Re-adapt quality on digits (seed {args.seed})\n\n`python bench/eval_readapt.py --seed {args.seed}`; "
            f"AdamW, batch {BATCH}; new samples: the training 3s and 8s, shifted.\n\n{md_table(rows)}\n\n"
            "## Readapt vs full fine-tuning: more clean accuracy, shifted within 1 point?\n\n"
            + "\n".join(f"- {v}" for v in verdicts(rows)) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out}.csv and .md in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
