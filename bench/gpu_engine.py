"""The slicing engine on a GPU at the size users slice (run on a CUDA machine; needs ``transformers``).

    python bench/gpu_engine.py [--out DIR] [--rounds N]
    python bench/gpu_engine.py --dry-run    # CPU, tiny models, one round: every code path, no results written
    python bench/gpu_engine.py --host [--rounds N]   # CPU: the engine's host time (below)

Models (random weights, dropout 0, transformers' ``GELUActivation`` replaced by ``nn.GELU`` as in
bench_profiler.py so DeepLIFT's Rescale rule applies):
  - BERT-base encoder (hidden 768, 12 layers, 12 heads, FFN 3072), 6 classes; batches of 32 x 128 tokens with
    lengths drawn from 32-128, right-padded (the attention mask drops the padding from every statistic);
  - ViT-B/16 (hidden 768, 12 layers, 224x224 RGB, 197 tokens), 10 classes; batches of 32.
Per model, every variant timed interleaved (CUDA-synchronised wall time, median of ``--rounds``):
  - ``neuslice.profile`` (taylor; ens with Rescale DeepLIFT) over 3 batches against a plain forward+backward
    over the same batches (the CPU targets: taylor <= 1.0x, ens <= 1.3x);
  - ``neuslice.Profiler`` (default metrics) around an AdamW training step against the bare step, float32 and
    under bf16 autocast, with the accumulate backend left to the dispatcher and forced to ``triton`` and to
    ``cuda`` (the CPU target: <= 1.05x);
  - device synchronisations per step (``torch.cuda.set_sync_debug_mode``: torch operations that wait for
    the GPU), bare and with the Profiler.
Results: DIR/gpu_engine_<device>_<date>.{md,json} (default bench/results).

``--host`` runs the same variants on the CPU, one thread, on the same architectures at 12 layers but hidden 32
(4 heads, FFN 48; ViT on 32x32 images, patch 16) and 16 tokens, batches of 32: the tensor work is then a small
part of each step, so the ratios show the Python and dispatch time that the engine adds per tap and batch,
which a GPU cannot hide when the host is the bottleneck (the CPU stand-in for this script's ratios between GPU
sessions). Results: DIR/engine_host_<date><--suffix>.{md,json}; the header names neuslice's commit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_profiler import _Logits, _gelu_modules, profile_vs_plain_fns  # noqa: E402  (bench/ helpers)

import neuslice  # noqa: E402

BATCH, TOKENS, NBATCH = 32, 128, 3
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
HOST = dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=48)
SIZE = dict(BASE)   # TINY under --dry-run


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bert(dev):
    import transformers as tf
    cfg = tf.BertConfig(**SIZE, num_labels=6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(NBATCH):
        n = torch.randint(TOKENS // 4, TOKENS + 1, (BATCH, 1), generator=g)
        am = (torch.arange(TOKENS) < n).long()
        ids = torch.randint(1000, 30000, (BATCH, TOKENS), generator=g) * am
        batches.append(({"input_ids": ids.to(dev), "attention_mask": am.to(dev)},
                        torch.randint(0, 6, (BATCH,), generator=g).to(dev)))
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(cfg), batches, 6


def _vit(dev):
    import transformers as tf
    side = 224 if SIZE == BASE else 32
    cfg = tf.ViTConfig(image_size=side, patch_size=16, **SIZE, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(BATCH, 3, side, side, generator=g).to(dev),
                torch.randint(0, 10, (BATCH,), generator=g).to(dev)) for _ in range(NBATCH)]
    torch.manual_seed(0)
    return tf.ViTForImageClassification(cfg), batches, 10


def _models():
    if SIZE == BASE:
        return {f"BERT-base, {BATCH}x{TOKENS} tokens, lengths {TOKENS // 4}-{TOKENS} right-padded": _bert,
                f"ViT-B/16, batch {BATCH}, 224x224": _vit}
    size = f"{SIZE['num_hidden_layers']} layers, hidden {SIZE['hidden_size']}"
    return {f"BERT ({size}), {BATCH}x{TOKENS} tokens, lengths {TOKENS // 4}-{TOKENS} right-padded": _bert,
            f"ViT ({size}, patch 16), batch {BATCH}, 32x32": _vit}


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def _mask(x):
    return x["attention_mask"].bool() if isinstance(x, dict) else None


def timed(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> Dict[str, float]:
    """Median CUDA-synchronised seconds per call, the functions taking turns every round."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    _sync()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            _sync()
            t0 = time.perf_counter()
            f()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def syncs(fn: Callable[[], None]) -> int:
    """Synchronising torch operations during one call of ``fn`` (torch.cuda's sync debug mode); None on a CPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def forced(backend, fn):
    def run():
        old = os.environ.get("NEUSLICE_BACKEND")
        if backend:
            os.environ["NEUSLICE_BACKEND"] = backend
        try:
            fn()
        finally:
            if old is None:
                os.environ.pop("NEUSLICE_BACKEND", None)
            else:
                os.environ["NEUSLICE_BACKEND"] = old
    return run


def one_model(name, build, dev, rounds, rows):
    model, batches, k = build(dev)
    model = _Logits(_gelu_modules(model)).to(dev).eval()

    t = timed(profile_vs_plain_fns(model, batches, k), rounds)
    for v, s in t.items():
        rows.append(dict(model=name, group=f"profile over {NBATCH} batches", variant=v, ms=s * 1e3,
                         ratio=s / t["plain fwd+bwd"]))
        print(f"{name} | {v}: {s * 1e3:.2f} ms ({s / t['plain fwd+bwd']:.3f}x)", flush=True)
    for autocast in (False, True):
        mb, _, _ = build(dev)
        mp, _, _ = build(dev)
        mb, mp = (_Logits(_gelu_modules(m)).to(dev).train() for m in (mb, mp))
        ob, op = (torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (mb, mp))
        profiler = neuslice.Profiler(mp, k)
        x, y = batches[0]

        def loss(m):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                return F.cross_entropy(_call(m, x).float(), y)

        def bare():
            ob.zero_grad(set_to_none=True)
            loss(mb).backward()
            ob.step()

        def with_profiler():
            op.zero_grad(set_to_none=True)
            with profiler.batch(y, mask=_mask(x)):
                loss(mp).backward()
            op.step()
        fns = {"bare step": bare, "Profiler step": with_profiler,
               **({} if dev.type != "cuda" else {"Profiler step, triton forced": forced("triton", with_profiler),
                                                 "Profiler step, cuda forced": forced("cuda", with_profiler)})}
        t = timed(fns, rounds)
        group = "training step (AdamW)" + (", bf16 autocast" if autocast else ", float32")
        for v, s in t.items():
            n = syncs(fns[v])
            rows.append(dict(model=name, group=group, variant=v, ms=s * 1e3, ratio=s / t["bare step"], syncs=n))
            print(f"{name} | {group} | {v}: {s * 1e3:.2f} ms ({s / t['bare step']:.3f}x), {n} syncs", flush=True)
        layers = len(profiler.profile().layers)
        rows.append(dict(model=name, group=group, variant=f"layers profiled: {layers}", ms=None, ratio=None))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, one round; nothing written")
    p.add_argument("--host", action="store_true", help="CPU, one thread, 12-layer models of hidden 32: host time")
    p.add_argument("--suffix", default="", help="appended to the results' file name (--host: engine_host_<date><suffix>)")
    args = p.parse_args()
    global TOKENS
    if args.host:
        SIZE.clear()
        SIZE.update(HOST)
        TOKENS = 16
        torch.set_num_threads(1)
        dev, name = torch.device("cpu"), "cpu"
    elif args.dry_run:
        SIZE.clear()
        SIZE.update(TINY)
        args.rounds = 1
        dev, name = torch.device("cpu"), "cpu"
    elif not torch.cuda.is_available():
        print("gpu_engine: no CUDA device (--dry-run runs the code paths on the CPU)", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda")
        name = torch.cuda.get_device_name(dev)
    info = neuslice.backend_info() if hasattr(neuslice, "backend_info") else {}
    import transformers
    rows = []
    for mname, build in _models().items():
        one_model(mname, build, dev, args.rounds, rows)
    if args.dry_run:
        print(f"dry run: {len(rows)} rows")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.host:
        import subprocess
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,   # (neuslice's)
                                cwd=Path(neuslice.__file__).resolve().parent).stdout.strip() or "unknown"
        stem = f"engine_host_{time.strftime('%Y-%m-%d')}{args.suffix}"
        head = (f"# The slicing engine's host time on the CPU ({time.strftime('%Y-%m-%d %H:%M')}, commit {commit})\n\n"
                f"Command: `python bench/gpu_engine.py --host --rounds {args.rounds}`; torch {torch.__version__}, "
                f"transformers {transformers.__version__}, one thread. Models of 12 layers and hidden 32: the tensor "
                "work is small, so the ratios are mostly the Python and dispatch time the engine adds (what a GPU "
                "cannot hide when the host is the bottleneck). Wall time, variants interleaved, median of "
                f"{args.rounds}; ratio against the group's first row.\n\n")
    else:
        stem = f"gpu_engine_{name.replace(' ', '-')}_{time.strftime('%Y-%m-%d')}"
        head = (f"# The slicing engine on {name} ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
                f"Command: `python bench/gpu_engine.py --rounds {args.rounds}`; torch {torch.__version__}, transformers "
                f"{transformers.__version__}. CUDA-synchronised wall time, variants interleaved, median of {args.rounds}; "
                "ratio against the group's first row; syncs = synchronising torch operations in one call "
                "(torch.cuda.set_sync_debug_mode).\n\n")
    lines = ["| model | group | variant | ms | ratio | syncs |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms = "" if r["ms"] is None else f"{r['ms']:.2f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['model']} | {r['group']} | {r['variant']} | {ms} | {ratio} | {r.get('syncs', '')} |")
    (args.out / f"{stem}.md").write_text(head + "\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(dict(device=name, torch=torch.__version__,
                                                           backends=str(info), rows=rows), indent=1))
    print("\n".join(lines))
    print("wrote", args.out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
