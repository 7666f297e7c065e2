"""The ``neuslice`` command (also ``python -m neuslice``).

Exit codes: 0 ok, 1 failure, 2 usage error. ``--json`` prints the result as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["main", "run_demo"]


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _slicing_summary(slices, model, test_loader, pairs: Sequence[Sequence[int]]) -> Dict:
    from .models import accuracy

    cats = slices.categories()
    layers = []
    for name in slices.layer_names:
        crit = slices.critical_sets[name]
        layers.append({
            "layer": name, "neurons": int(crit.shape[1]),
            "critical_per_class_mean": round(float(crit.float().sum(1).mean()), 2),
            **{c: int(cats[c][name].sum()) for c in slices.CATEGORIES},
        })
    rows = []
    for pair in pairs:
        with slices.apply(model, pair) as masked:
            acc = accuracy(masked, test_loader, classes=pair)
        rows.append({"classes": list(pair), "compression_rate": round(slices.compression_rate(model, pair), 4),
                     "masked_accuracy": round(acc, 4),
                     "original_accuracy": round(accuracy(model, test_loader, classes=pair), 4)})
    return {"layers": layers, "groups": slices.groups(), "pairs": rows}


def run_demo(out: Path, *, seed: int = 0, epochs: int = 15, theta: float = 0.9, metric: str = "taylor",
             quiet: bool = False) -> Dict:
    """The main job on the embedded digits data: train, profile, slice, evaluate; writes ``out/summary.json``."""
    import neuslice
    from .data import DIGITS_CLASSES, digits_loaders
    from .models import accuracy, build, fit

    t0 = time.perf_counter()
    train, test = digits_loaders(batch_size=64, seed=seed)
    model = fit(build("digits_cnn", seed=seed), train, epochs=epochs, seed=seed)
    base_acc = accuracy(model, test)
    _log(quiet, f"trained digits_cnn for {epochs} epochs: test accuracy {base_acc:.4f}")
    prof = neuslice.profile(model, train, num_classes=10, class_names=DIGITS_CLASSES, progress=not quiet)
    slices = neuslice.semantic_slice(prof, metric, theta)
    pairs = [(0, 1), (3, 8), (4, 9), (0, 1, 2, 3, 4)]
    summary = {
        "data": "scikit-learn digits (embedded)", "model": "digits_cnn", "seed": seed,
        "test_accuracy": round(base_acc, 4), "metric": metric, "theta": theta,
        **_slicing_summary(slices, model, test, pairs),
    }
    out.mkdir(parents=True, exist_ok=True)
    prof.save(out / "profile.safetensors")
    slices.save(out / "slices.safetensors")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _print_demo(s: Dict) -> None:
    print(f"digits_cnn on {s['data']}: test accuracy {s['test_accuracy']:.4f}")
    print(f"semantic slices ({s['metric']}, theta={s['theta']}); semantic groups: {s['groups']}")
    print(f"{'layer':<16}{'neurons':>8}{'crit/class':>11}{'shared':>8}{'group':>7}{'specific':>9}{'free':>6}")
    for r in s["layers"]:
        print(f"{r['layer']:<16}{r['neurons']:>8}{r['critical_per_class_mean']:>11}{r['shared']:>8}"
              f"{r['group']:>7}{r['specific']:>9}{r['free']:>6}")
    print(f"{'classes kept':<18}{'params removed':>15}{'masked acc':>12}{'original acc':>14}")
    for r in s["pairs"]:
        print(f"{str(r['classes']):<18}{r['compression_rate']:>15.1%}{r['masked_accuracy']:>12.4f}"
              f"{r['original_accuracy']:>14.4f}")
    print(f"({s['seconds']} s)")


def _cmd_demo(args) -> int:
    summary = run_demo(Path(args.out), seed=args.seed, epochs=args.epochs, theta=args.theta, metric=args.metric,
                       quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_demo(summary)
        print(f"report written to {args.out}/")
    return 0


def _cmd_info(args) -> int:
    import neuslice
    info = neuslice.backend_info()
    print(json.dumps(info, indent=None if args.json else 1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuslice", description="Neuron-level semantic slicing of DNNs (NeuSemSlice).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="the main job on the embedded digits data: train, profile, slice, evaluate",
                       description="Trains a small CNN on scikit-learn's digits (offline, seeded), profiles it, "
                                   "slices it semantically and evaluates class-subset slices.")
    d.add_argument("--out", default="neuslice-report", help="report folder (default: ./neuslice-report)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=15)
    d.add_argument("--theta", type=float, default=0.9, help="cumulative threshold, in (0, 1]")
    d.add_argument("--metric", default="taylor", help="avg, var, taylor, deeplift or ens")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.add_argument("--json", action="store_true", help="print the result as one JSON object")
    d.set_defaults(fn=_cmd_demo)
    i = sub.add_parser("info", help="what this installation can run (backends, build, devices)")
    i.add_argument("--json", action="store_true", help="one line of JSON")
    i.set_defaults(fn=_cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"neuslice {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
