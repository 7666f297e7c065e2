"""Benchmarks of the slicing engine (CPU; ratios measured in one run, variants interleaved).

1. Profiler overhead: one training step (forward, cross-entropy, backward, SGD) of a Conv-BN-ReLU net
   (batch 128, 1×28×28 inputs, 4 conv layers of 64–128 channels) with ``neuslice.Profiler`` attached for
   taylor + avg + var, against the bare step and against hand-written forward/tensor hooks with
   ``index_add_``. Target: Profiler ≤ 1.15× the bare step.
2. ``neuslice.profile`` (per-class taylor for all 4 layers) against Captum's
   ``LayerGradientXActivation`` + a per-class aggregation (one Captum call per layer, as its docs show;
   also with Captum's layer list, one call for all layers). Target: ≥ 5× faster than per-layer Captum.
3. ``neuslice.profile`` against the class count K: the same MLP (4096 hidden neurons, a K-output head) on the
   same 256 samples whose labels are drawn from the first 6 classes, K = 6, 100, 1000, with the per-batch
   buffers holding the classes present (``present``) and, for comparison, all K classes (``all K``, the path
   before). Each case runs in a fresh subprocess (Linux): peak memory = the peak resident set (``VmHWM``, reset
   through /proc/self/clear_refs just before) over the first ``profile`` call less the resident set before it,
   less the float64 totals ([K, N] × 5 stats, which do grow with K); time = the
   median of the following calls. Results: bench/results/profile_classes.md (NEUSLICE_BENCH_NAME).

Run:  python -m pytest bench/bench_profiler.py --benchmark-enable -s -q
(or   python bench/bench_profiler.py   for the table alone).
Absolute times only mean something on a quiet machine; the ratios are what the targets are about.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import neuslice
import neuslice.models as M
from neuslice.io.digits import load_digits

BATCH, K = 128, 10
ROUNDS = int(os.environ.get("NEUSLICE_BENCH_ROUNDS", "7"))


def _data(n: int = BATCH, seed: int = 0):
    """Digits upscaled to 28×28 (the real images, resized), float32 [n, 1, 28, 28], labels [n]."""
    x, y = load_digits("train")
    x = F.interpolate(x[:n], size=(28, 28), mode="bilinear", align_corners=False)
    return x.contiguous(), y[:n].clone()


def _net():
    return M.build("bench_cnn", seed=0)


def interleaved(fns: Dict[str, Callable[[], None]], rounds: int = ROUNDS, warmup: int = 1) -> Dict[str, float]:
    """Median seconds per call of each function, the functions taking turns every round (load drifts
    hit all of them alike)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# 1. Profiler overhead on a training step

class HandHooks:
    """What a user would write: forward hooks on the ReLUs, tensor hooks, per-class index_add_."""

    def __init__(self, model, taps):
        self.sums = {}
        self.labels = None
        self.handles = [dict(model.named_modules())[t].register_forward_hook(self._fwd(t)) for t in taps]

    def _fwd(self, name):
        def hook(m, a, out):
            x = out.detach()
            y = self.labels
            st = self.sums.setdefault(name, {s: torch.zeros(K, x.shape[1]) for s in ("n", "a", "a2", "t")})
            xbar = x.mean((2, 3))
            st["n"].index_add_(0, y, torch.ones(len(y), 1).expand(-1, x.shape[1]))
            st["a"].index_add_(0, y, xbar)
            st["a2"].index_add_(0, y, xbar * xbar)

            def on_grad(g):
                st["t"].index_add_(0, y, (x * g).sum((2, 3)).abs())
            out.register_hook(on_grad)
        return hook


def _step_fns():
    x, y = _data()
    fns = {}
    models = {k: _net().train() for k in ("bare", "profiler", "hand")}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    prof = neuslice.Profiler(models["profiler"], K, metrics=("taylor", "avg", "var"))
    taps = [e["tap"] for e in prof.profile().layers]
    hand = HandHooks(models["hand"], taps)

    def step(k, ctx=None):
        m, o = models[k], opts[k]
        o.zero_grad(set_to_none=True)
        if ctx is None:
            F.cross_entropy(m(x), y).backward()
        else:
            with ctx:
                F.cross_entropy(m(x), y).backward()
        o.step()

    def hand_step():
        hand.labels = y
        step("hand")

    fns["bare"] = lambda: step("bare")
    fns["profiler"] = lambda: step("profiler", prof.batch(y))
    fns["hand hooks + index_add_"] = hand_step
    return fns, prof


def test_profiler_overhead(benchmark):
    fns, prof = _step_fns()
    t = interleaved(fns)
    ratios = {k: v / t["bare"] for k, v in t.items()}
    benchmark.extra_info.update({f"{k} s": v for k, v in t.items()})
    benchmark.extra_info.update({f"{k} ratio": v for k, v in ratios.items()})
    benchmark.pedantic(fns["profiler"], rounds=3, iterations=1)
    _print("training step, batch 128, 28x28, 4 conv layers (64-128 ch)", t, "bare")
    assert prof.profile().num_batches > 0
    assert ratios["profiler"] <= 1.15, f"Profiler costs {ratios['profiler']:.3f}x the bare step (target 1.15x)"


# ---------------------------------------------------------------------------------------------
# 2. neuslice.profile vs Captum LayerGradientXActivation + per-class aggregation

def _captum_per_class(model, batches, taps, as_list: bool):
    from captum.attr import LayerGradientXActivation
    mods = dict(model.named_modules())
    layers = [mods[t] for t in taps]
    sums = [None] * len(layers)
    count = torch.zeros(K)
    attributors = ([LayerGradientXActivation(model, layers)] if as_list else
                   [LayerGradientXActivation(model, m) for m in layers])
    for x, y in batches:
        outs = []
        for a in attributors:
            r = a.attribute(x, target=y)
            outs += list(r) if as_list else [r]
        for i, r in enumerate(outs):
            per = r.sum((2, 3)).abs()
            sums[i] = torch.zeros(K, per.shape[1]) if sums[i] is None else sums[i]
            sums[i].index_add_(0, y, per)
        count.index_add_(0, y, torch.ones(len(y)))
    return [s / count.clamp_min(1).unsqueeze(1) for s in sums]


def _profile_fns():
    x, y = _data(4 * BATCH)
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]
    model = _net().eval()
    taps = [e["tap"] for e in neuslice.profile(model, batches[:1], K, metrics=("avg",), progress=False).layers]
    out = {}
    fns = {
        "neuslice.profile": lambda: out.__setitem__("ns", neuslice.profile(model, batches, K, metrics=("taylor",),
                                                                          progress=False)),
        "captum, one call per layer": lambda: out.__setitem__("cp", _captum_per_class(model, batches, taps, False)),
        "captum, layer list": lambda: out.__setitem__("cl", _captum_per_class(model, batches, taps, True)),
    }
    return fns, out


def test_profile_vs_captum(benchmark):
    fns, out = _profile_fns()
    t = interleaved(fns, rounds=max(3, ROUNDS // 2))
    ns = out["ns"].score("taylor")
    for got, want in zip(ns.values(), out["cp"]):                 # the same numbers, not just the same work
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-6)
    speedup = {k: v / t["neuslice.profile"] for k, v in t.items()}
    benchmark.extra_info.update({f"{k} s": v for k, v in t.items()})
    benchmark.pedantic(fns["neuslice.profile"], rounds=2, iterations=1)
    _print("per-class taylor, 512 samples 28x28, 4 layers (time / neuslice.profile)", t, "neuslice.profile")
    assert speedup["captum, one call per layer"] >= 5.0, f"only {speedup['captum, one call per layer']:.2f}x"


# ---------------------------------------------------------------------------------------------
# 3. neuslice.profile memory and time against the class count K

CLASSES, HIDDEN = (6, 100, 1000), 2048


def _classes_case(k: int, impl: str) -> str:
    """One case, run in a fresh process: ``"<peak bytes beyond the totals> <median seconds> <totals bytes>"``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                                torch.nn.ReLU(), torch.nn.Linear(HIDDEN, k)).eval()
    x, y = torch.randn(256, 256), torch.randint(0, 6, (256,))
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    if impl == "all K":
        from neuslice.engine import profile as offline
        offline.present_classes = lambda y, ignore_index=-100: (torch.arange(k), y)
    model(x[:64])                                                   # allocator and kernels warm
    run = lambda: neuslice.profile(model, batches, k, metrics=("avg", "var", "taylor"), progress=False)
    before = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:                 # reset the high-water mark VmHWM to now
        f.write("5")
    run()
    peak = _rss("VmHWM") - before
    totals = 2 * k * (4 * HIDDEN + 1) * 8                     # 2 layers: 4 [K, N] + count [K], float64
    secs = statistics.median(_timed(run) for _ in range(3))
    return f"{peak - totals} {secs} {totals}"


def _rss(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak since the last reset) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_profile_memory_and_time_against_class_count():
    from harness import TABLE
    res = {}
    for k in CLASSES:
        for impl in ("present", "all K"):
            out = subprocess.run([sys.executable, __file__, "--classes", str(k), impl], check=True,
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
            peak, secs, totals = out.split()[-3:]
            res[k, impl] = float(peak), float(secs)
            TABLE.add("profile, 256 samples of 6 classes", f"K={k}", impl, 1, float(secs),
                      peak_mb_beyond_totals=float(peak) / 2**20, totals_mb=float(totals) / 2**20)
            print(f"K={k:5d} {impl:8s} {float(secs) * 1e3:8.1f} ms   peak beyond totals "
                  f"{float(peak) / 2**20:8.1f} MiB   totals {float(totals) / 2**20:7.1f} MiB")
    # the batch buffers of K=1000 ([1000, 4096] float32 × 5) are 78 MiB: the present path stays far below
    assert res[1000, "present"][0] < res[1000, "all K"][0] - 40 * 2**20


def _print(title, t, base):
    print(f"\n{title}\n" + "\n".join(f"  {k:32s} {v * 1e3:9.1f} ms   {v / t[base]:6.3f}x" for k, v in t.items()))


if __name__ == "__main__" and sys.argv[1:2] == ["--classes"]:
    print(_classes_case(int(sys.argv[2]), sys.argv[3]))
elif __name__ == "__main__":
    for title, (fns, _), base in (("step", _step_fns(), "bare"), ("profile", _profile_fns(), "neuslice.profile")):
        _print(title, interleaved(fns), base)
