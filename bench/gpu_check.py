"""GPU check: every CUDA backend against `reference`, then timings, in one command (< 5 min on an H100).

    python bench/gpu_check.py --build      # pip install -e . first (builds _C, CUDA when nvcc is found)
    python bench/gpu_check.py              # check the installed build
    python bench/gpu_check.py --dry-run    # CPU, Triton interpreter, tiny shapes: every code path, ~1 min

Steps: (1) build / import, what ``neuslice.backend_info()`` reports; (2) the device's copy bandwidth,
STREAM convention ((read + write bytes) / median time of ``dst.copy_(src)``, 1 GiB); (3) per case,
for every CUDA backend (``triton``, ``cuda``; each forced through NEUSLICE_BACKEND -- one that
refuses is reported with its reason), correctness against `reference` (tests/tolerances.py; a sum
that misses the table may pass at <= 2x the error of the torch composite in the input dtype, both
measured against a float64 oracle, as docs/architecture.md (Tests) allows), then ``triton.testing.do_bench`` medians
(cold L2) of the backend, `reference` and the composite a user writes by hand; GB/s = bytes that must
be read once / median time. Results: bench/results/gpu_check_<device>_<date>.{json,md}; the short
table prints last. Exit status 1 when a correctness check fails.

Cases: the foundation benchmark shapes (float32) and the large-model shape (channels-last
B=16, S=2048, N=14336, bfloat16; per-sample and per-token labels); then accumulate_'s padding
arguments (issue 13): right-padded sequences (a ``valid`` mask, NaN in the padding, one sample all
padding) with labels ``ignore_index`` (-100), per sample and per token, taylor kept alone (the
other sums None), and a reference per sample (``ref`` of x's shape, NaN in its padding: DeepLIFT
on a padded encoder, each sample's baseline under its own mask). The dry run maps bfloat16 to
float16 (the interpreter has no bfloat16) and times with perf_counter instead of do_bench.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("triton", "cuda")
K = 10
IGNORE = -100  # accumulate_'s ignore_index in the padded cases
STATS = ("count", "act_sum", "act_sq", "taylor_sum", "deeplift_sum")
GPU_SHAPES = {
    "conv B=128 N=256 S=196": dict(b=128, n=256, s=196, cl=False),
    "linear B=1024 N=4096": dict(b=1024, n=4096, s=0, cl=False),
    "transformer CL B=8 S=512 N=3072": dict(b=8, n=3072, s=512, cl=True),
    "transformer CL B=8 S=512 N=3072 per-token": dict(b=8, n=3072, s=512, cl=True, tok=True),
    # avg only: act_sum kept, the other sums None (grad given but never read)
    "conv B=128 N=256 S=196 avg-only": dict(b=128, n=256, s=196, cl=False, keep=("count", "act_sum")),
    "large CL B=16 S=2048 N=14336 bf16": dict(b=16, n=14336, s=2048, cl=True, bf16=True),
    "large CL B=16 S=2048 N=14336 bf16 per-token": dict(b=16, n=14336, s=2048, cl=True, bf16=True, tok=True),
    "transformer CL B=8 S=512 N=3072 padded+ignore": dict(b=8, n=3072, s=512, cl=True, pad=True, ignore=True),
    "transformer CL B=8 S=512 N=3072 per-token padded+ignore": dict(b=8, n=3072, s=512, cl=True, tok=True, pad=True,
                                                                     ignore=True),
    "large CL B=16 S=2048 N=14336 bf16 padded, taylor only": dict(b=16, n=14336, s=2048, cl=True, bf16=True,
                                                                   pad=True, keep=("count", "taylor_sum")),
    "transformer CL B=8 S=512 N=3072 padded, per-sample ref": dict(b=8, n=3072, s=512, cl=True, pad=True,
                                                                    ref=True),
}
DRY_SHAPES = {
    "conv B=4 N=9 S=5": dict(b=4, n=9, s=5, cl=False),
    "linear B=6 N=11": dict(b=6, n=11, s=0, cl=False),
    "transformer CL B=3 S=4 N=10 per-token": dict(b=3, n=10, s=4, cl=True, tok=True),
    "conv B=4 N=9 S=5 avg-only": dict(b=4, n=9, s=5, cl=False, keep=("count", "act_sum")),
    "large CL B=2 S=6 N=13 bf16->f16": dict(b=2, n=13, s=6, cl=True, bf16=True),
    "transformer CL B=3 S=4 N=10 padded+ignore": dict(b=3, n=10, s=4, cl=True, pad=True, ignore=True),
    "transformer CL B=3 S=4 N=10 per-token padded+ignore": dict(b=3, n=10, s=4, cl=True, tok=True, pad=True,
                                                                 ignore=True),
    "large CL B=4 S=6 N=13 bf16->f16 padded, taylor only": dict(b=4, n=13, s=6, cl=True, bf16=True, pad=True,
                                                                 keep=("count", "taylor_sum")),
    "transformer CL B=3 S=4 N=10 padded, per-sample ref": dict(b=3, n=10, s=4, cl=True, pad=True, ref=True),
}


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    p.add_argument("--build", action="store_true", help="pip install --no-build-isolation -e . first")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results; dry run: a temp dir)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated CUDA backends to check")
    return p.parse_args()


def _build() -> dict:
    """pip install -e . without build isolation: builds _C through CMake (CUDA sources when nvcc is
    found, NEUSLICE_CUDA=auto) and installs the kernels/ -> neuslice._triton mapping."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return {"ok": r.returncode == 0, "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(cmd),
            "tail": (r.stdout + r.stderr)[-1500:] if r.returncode else ""}


def _adopt_install() -> None:
    """Make the editable install just made importable in this process: its finder is hooked in by a
    .pth file, which Python reads only at start-up (without this, the first run on a fresh machine
    built _C and then reported "neuslice is not installed")."""
    import site
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    for d in dirs:
        if os.path.isdir(d):
            site.addsitedir(d)
    importlib.invalidate_caches()


def _tolerances():
    spec = importlib.util.spec_from_file_location("neuslice_tolerances", ROOT / "tests" / "tolerances.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Timer:
    """Median milliseconds: do_bench (cold L2) on a GPU, perf_counter over a few calls in the dry run."""

    def __init__(self, dry: bool, device: str):
        self.dry, self.device = dry, device

    def __call__(self, fn) -> float:
        if self.dry:
            fn()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return sorted(times)[1] * 1e3
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))

    def copy_gbs(self, torch) -> float:
        numel = (2**18 if self.dry else 2**28)
        src = torch.ones(numel, dtype=torch.float32, device=self.device)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / (self(lambda: dst.copy_(src)) * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# cases: inputs, the composite a user writes, bytes that must be read once

def _accumulate_case(torch, shape: dict, dev: str, dry: bool):
    half = torch.float16 if dry else torch.bfloat16
    dtype = half if shape.get("bf16") else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    b, n, s, cl = shape["b"], shape["n"], shape["s"], shape["cl"]
    dims = (b, n) if s == 0 else ((b, s, n) if cl else (b, n, s))
    x = torch.randn(dims, generator=g, device=dev, dtype=dtype)
    grad = torch.randn(dims, generator=g, device=dev, dtype=dtype)
    ref = torch.randn(dims, generator=g, device=dev, dtype=dtype) if shape.get("ref") else None  # per sample
    tok = shape.get("tok", False)
    labels = torch.randint(0, K, (b, s) if tok else (b,), generator=g, device=dev)
    if shape.get("ignore"):  # about 1 label in 8 is ignore_index
        labels[torch.rand(labels.shape, generator=g, device=dev) < 0.125] = IGNORE
    keep = shape.get("keep", STATS)
    stats = [torch.zeros(K, device=dev)] + [torch.zeros(K, n, device=dev) for _ in range(4)]
    stats = [t if name in keep else None for t, name in zip(stats, STATS)]
    valid = None
    if shape.get("pad"):  # right-padded sequences of random lengths, the first all padding; NaN there
        lengths = torch.randint(1, s + 1, (b,), generator=g, device=dev)
        lengths[0] = 0
        valid = torch.arange(s, device=dev)[None, :] < lengths[:, None]
        for t in (x, ref):
            if t is not None:
                (t if cl else t.transpose(1, 2))[~valid] = float("nan")
    extra = (valid, IGNORE) if (valid is not None or shape.get("ignore")) else ()
    args = (x, grad, ref, labels, cl, *stats, *extra)
    red = None if s == 0 else (1 if cl else 2)

    def composite(st):  # the statistics as a user writes them in torch (deeplift: (x - ref) * grad)
        xs, gs, lab = (x.reshape(-1, n), grad.reshape(-1, n), labels.reshape(-1)) if tok else (x, grad, labels)
        ds = xs if ref is None else xs - (ref.reshape(-1, n) if tok else ref)
        if tok or red is None:
            xbar, prod, dprod = xs, xs * gs, ds * gs
            if extra:
                kept = (lab != IGNORE) if valid is None else (lab != IGNORE) & valid.reshape(-1)
                xbar, prod, dprod, lab = xbar[kept], prod[kept], dprod[kept], lab[kept]
        elif not extra:
            xbar, prod, dprod = xs.mean(red), (xs * gs).sum(red), (ds * gs).sum(red)
        else:  # padding out of every sum (a where, since it may hold NaN), ignored / empty samples dropped
            w = torch.ones(b, s, dtype=torch.bool, device=dev) if valid is None else valid
            wm = w.unsqueeze(2 if cl else 1)
            xm, gm, dm = torch.where(wm, xs, 0.0), torch.where(wm, gs, 0.0), torch.where(wm, ds, 0.0)
            xbar, prod = xm.sum(red) / w.sum(1, keepdim=True).clamp_min(1), (xm * gm).sum(red)
            dprod = (dm * gm).sum(red)
            kept = (lab != IGNORE) & w.any(1)
            xbar, prod, dprod, lab = xbar[kept], prod[kept], dprod[kept], lab[kept]
        st[0].index_add_(0, lab, torch.ones(lab.shape[0], device=dev))
        for i, v in ((1, xbar), (2, xbar * xbar), (3, prod.abs()), (4, dprod.abs())):
            if st[i] is not None:
                st[i].index_add_(0, lab, v.float())

    nbytes = ((2 if ref is None else 3) * x.numel() * x.element_size() + labels.numel() * 8
              + (0 if valid is None else valid.numel()))
    return dict(op="accumulate_", args=args, mutated=tuple(5 + i for i, t in enumerate(stats) if t is not None),
                composite=composite, nbytes=nbytes, dtype=dtype)


def _select_case(torch, op: str, dev: str, r: int, n: int):
    scores = torch.rand(r, n, generator=torch.Generator(device=dev).manual_seed(0), device=dev) ** 4
    value = 0.9 if op == "select" else 0.3
    from neuslice.ops.reference import topk_count

    def composite(_):
        vals, idx = torch.sort(scores, dim=1, descending=True)
        if op == "select_topk":
            keep = (torch.arange(n, device=dev).unsqueeze(0) < topk_count(value, n)).expand_as(idx)
        else:
            cs = vals.cumsum(1)
            keep = torch.arange(n, device=dev).unsqueeze(0) <= (cs < value * cs[:, -1:]).sum(1, keepdim=True)
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, keep)

    return dict(op=op, args=(scores, value), mutated=(), composite=composite, nbytes=scores.numel() * 4,
                dtype=torch.float32)


def _masked_case(torch, op: str, dev: str, rows: int, cols: int, dtype):
    g = torch.Generator(device=dev).manual_seed(0)
    p, grad = (torch.randn(rows, cols, generator=g, device=dev, dtype=dtype) for _ in range(2))
    mask = torch.rand(rows, generator=g, device=dev) < 0.5
    sgd = op == "masked_sgd_"
    states = [torch.zeros_like(p) for _ in range(1 if sgd else 2)]
    hyper = (1e-3, 0.9, 0.01) if sgd else (1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
    frozen = (~mask).nonzero().squeeze(1)
    param = torch.nn.Parameter(p.clone())
    param.grad = grad
    opt = (torch.optim.SGD([param], lr=1e-3, momentum=0.9, weight_decay=0.01) if sgd
           else torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01))
    opt.step()  # creates the state

    def composite(_):  # torch's optimizer, then the frozen rows (and their state) put back
        keep = [param.data, *opt.state[param].values()]
        keep = [t for t in keep if t.dim() == 2]
        saved = [t[frozen].clone() for t in keep]
        opt.step()
        for t, s in zip(keep, saved):
            t[frozen] = s

    return dict(op=op, args=(p, grad, *states, mask, *hyper), mutated=(0,) + tuple(range(2, 2 + len(states))),
                composite=composite, nbytes=(2 + len(states)) * p.numel() * p.element_size() + mask.numel(),
                dtype=dtype)


def _cases(torch, dev: str, dry: bool):
    """Foundation shapes, then the large-model ones: a 14336-wide layer's scores (rows longer than
    one select block) and the AdamW step of a 14336x4096 bf16 FFN weight."""
    for name, shape in (DRY_SHAPES if dry else GPU_SHAPES).items():
        yield f"accumulate_ {name}", lambda shape=shape: _accumulate_case(torch, shape, dev, dry)
    for r, n in ((3, 20), (2, 37)) if dry else ((1000, 4096), (1000, 14336)):
        for op in ("select", "select_topk"):
            yield f"{op} R={r} N={n}", lambda op=op, r=r, n=n: _select_case(torch, op, dev, r, n)
    half = torch.float16 if dry else torch.bfloat16
    sizes = ((8, 6, torch.float32), (9, 5, half)) if dry else ((4096, 4096, torch.float32), (14336, 4096, half))
    for rows, cols, dtype in sizes:
        for op in ("masked_adamw_", "masked_sgd_"):
            name = f"{op} {rows}x{cols} {str(dtype)[6:]}, 50% rows"
            yield name, lambda op=op, rows=rows, cols=cols, dtype=dtype: _masked_case(torch, op, dev, rows, cols, dtype)


# ---------------------------------------------------------------------------------------------
# correctness

def _clone(case) -> list:
    args = list(case["args"])
    for i in case["mutated"]:
        args[i] = args[i].clone()
    return args


def _sum_rule(torch, case, got, fails, tol) -> tuple:
    """docs/architecture.md (Tests): a sum may pass at <= 2x the error of the torch composite (input dtype) vs float64."""
    from neuslice.ops import reference
    x, grad, ref, labels, cl = case["args"][:5]
    oracle = [None if t is None else t.double() * 0 for t in case["args"][5:10]]
    reference.accumulate_(x.double(), grad.double(), None if ref is None else ref.double(), labels, cl, *oracle,
                          *case["args"][10:])
    comp = [None if t is None else t.clone() * 0 for t in case["args"][5:10]]
    case["composite"](comp)
    atol = tol.ACCUMULATE[case["dtype"]][1]
    for i in fails:
        err = float((got[i].double() - oracle[i]).abs().max())
        bound = 2 * float((comp[i].double() - oracle[i]).abs().max()) + atol
        if err > bound:
            return False, f"{STATS[i]}: max error {err:.3g} vs float64 > 2x composite's {bound:.3g}"
    return True, f"{', '.join(STATS[i] for i in fails)} within 2x the composite's error (the tolerance rule of docs/architecture.md)"


def _compare(torch, case, got, want, out, want_out, tol) -> tuple:
    op = case["op"]
    if op.startswith("select"):
        bad = int((out != want_out).sum())
        return bad == 0, f"{bad} of {out.numel()} entries differ" if bad else "identical masks"
    if op == "accumulate_":
        fails = []
        for i in range(5, 10):
            if want[i] is None:  # a statistic not kept
                continue
            try:
                tol.assert_close(got[i], want[i], tol.ACCUMULATE, case["dtype"])
            except AssertionError:
                fails.append(i - 5)
        return _sum_rule(torch, case, got[5:10], fails, tol) if fails else (True, "within tolerance table")
    mask = case["args"][len(case["mutated"]) + 1]
    for i in case["mutated"]:
        m = mask.view(-1, *[1] * (got[i].dim() - 1)).expand_as(got[i])
        if not torch.equal(got[i][~m], case["args"][i][~m]):
            return False, f"argument {i}: a frozen entry changed"
        try:
            tol.assert_close(got[i][m], want[i][m], tol.MASKED_UPDATE, case["dtype"])
        except AssertionError as e:
            return False, f"argument {i}: {str(e).splitlines()[0]}"
    return True, "within tolerance table; frozen entries bit-identical"


# ---------------------------------------------------------------------------------------------
# one case: every backend, reference, composite

def _row(name, impl, ms=None, nbytes=None, copy=None, check="", detail=""):
    gbs = None if ms is None else nbytes / (ms * 1e-3) / 1e9
    return dict(case=name, impl=impl, ms=ms, gbs=gbs, pct_copy=None if gbs is None else 100 * gbs / copy,
                check=check, detail=detail)


def _try_backend(torch, name, case, be, want, want_out, timer, tol, copy) -> list:
    from neuslice.ops import _dispatch
    from neuslice import ops
    op = case["op"]
    why = _dispatch.refusals(op, tuple(case["args"]))[be]
    if why:
        return [_row(name, be, check="refused", detail=why)]
    os.environ[_dispatch.ENV] = be
    try:
        got = _clone(case)
        out = getattr(ops, op)(*got)
        ok, detail = _compare(torch, case, got, want, out, want_out, tol)
        work = _clone(case)
        rows = [_row(name, be, timer(lambda: getattr(ops, op)(*work)), case["nbytes"], copy,
                     "PASS" if ok else "FAIL", detail)]
        if op == "accumulate_":  # the kernels alone, without the op's argument checks (one sync)
            fn = _dispatch.implementation(be, op)
            rows.append(_row(name, f"{be} (backend fn)", timer(lambda: fn(*work)), case["nbytes"], copy, "", ""))
        return rows
    except Exception as e:  # a crash in one backend is a result, not the end of the check
        return [_row(name, be, check="ERROR", detail=f"{type(e).__name__}: {e}"[:400])]
    finally:
        os.environ.pop(_dispatch.ENV, None)


def _oracle(torch, case):
    """`reference` on clones. A half-precision optimizer step runs it on float32 copies, rounded once
    at the end as the kernels do (the reference in bf16/f16 rounds after every op; tests/test_triton.py)."""
    from neuslice.ops import reference
    op, want = case["op"], _clone(case)
    if not op.startswith("masked") or case["dtype"] == torch.float32:
        return want, getattr(reference, op)(*want)
    w32 = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in want]
    getattr(reference, op)(*w32)
    for i in case["mutated"]:
        want[i] = w32[i].to(case["dtype"])
    return want, None


def _run_case(torch, name, make, backends, timer, tol, copy) -> list:
    from neuslice import ops
    case = make()
    op = case["op"]
    want, want_out = _oracle(torch, case)
    rows = []
    for be in backends:
        rows += _try_backend(torch, name, case, be, want, want_out, timer, tol, copy)
    os.environ["NEUSLICE_BACKEND"] = "reference"
    work = _clone(case)
    rows.append(_row(name, "reference", timer(lambda: getattr(ops, op)(*work)), case["nbytes"], copy))
    os.environ.pop("NEUSLICE_BACKEND", None)
    work = _clone(case)
    rows.append(_row(name, "composite", timer(lambda: case["composite"](work[5:10] if op == "accumulate_" else work[5:])),
                     case["nbytes"], copy))
    for r in rows:
        base = [c for c in rows if c["impl"] == "composite"][0]["ms"]
        r["x_composite"] = None if r["ms"] is None else base / r["ms"]
    return rows


# ---------------------------------------------------------------------------------------------
# report

def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _table(rows) -> str:
    lines = ["| case | impl | median ms | GB/s | % of copy | speedup vs composite | check |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        check = r["check"] if r["check"] in ("PASS", "") else f"{r['check']}: {r['detail'][:70]}"
        lines.append(f"| {r['case']} | {r['impl']} | {_fmt(r['ms'], '.3f')} | {_fmt(r['gbs'], '.3g')} | "
                     f"{_fmt(r['pct_copy'], '.0f')} | {_fmt(r['x_composite'], '.2g')} | {check} |")
    return "\n".join(lines)


def _save(out: Path, meta: dict, rows: list) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-")
    stem = out / f"gpu_check_{slug}_{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    notes = "\n".join(f"- {r['case']} / {r['impl']}: {r['check']}: {r['detail']}" for r in rows if r["detail"])
    stem.with_suffix(".md").write_text(
        f"# gpu_check on {meta['device']} ({meta['date']})\n\ncommand: `{meta['command']}`; torch {meta['torch']}, "
        f"triton {meta['triton']}; copy bandwidth {meta['copy_gbs']:.4g} GB/s (read+write)/time; GB/s = bytes "
        f"read once / median time ({meta['timer']}).\n\n{_table(rows)}\n\n{notes}\n")
    return stem.with_suffix(".md")


def _cli_pipeline(dev: str) -> list:
    """The user's path on this device: ``neuslice demo --device`` (train, profile, slice, restructure,
    readapt, incremental, report) and ``neuslice predict --device`` on the model it wrote."""
    from neuslice.cli import main as cli
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_cli_") as tmp:
        t0 = time.perf_counter()
        for argv in (["demo", "--epochs", "2", "--out", tmp], ["predict", "--weights", f"{tmp}/model.safetensors",
                                                               "--data", "digits:test"]):
            rc = cli(argv + ["--device", dev, "--quiet", "--json"])
            ok = rc == 0 and (argv[0] != "demo" or Path(tmp, "summary.json").exists())
            rows.append(_row(f"cli {argv[0]} --device {dev}", "cli", check="ok" if ok else "FAIL",
                             detail="" if ok else f"exit code {rc}"))
            rows[-1]["x_composite"] = None
        print(f"[{time.perf_counter() - t0:6.1f}s] cli pipeline on {dev}", flush=True)
    return rows


def main() -> int:
    args = _args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton
    build = _build() if args.build else None
    if build is not None and build["ok"]:
        _adopt_install()
    import torch
    try:
        import neuslice
    except ImportError as e:
        print(f"gpu_check: neuslice is not installed ({e}); run pip install -e . or pass --build"
              + (f"\nbuild: {build}" if build is not None else ""), file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run to exercise the script on the CPU", file=sys.stderr)
        return 2
    dev = "cpu" if args.dry_run else "cuda"
    info = neuslice.backend_info()
    timer = Timer(args.dry_run, dev)
    tol = _tolerances()
    copy = timer.copy_gbs(torch)
    device = "cpu-interpreter-dry-run" if args.dry_run else torch.cuda.get_device_name()
    meta = dict(device=device, date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), torch=torch.__version__,
                timer="perf_counter, 3 calls" if args.dry_run else "triton.testing.do_bench median, cold L2",
                triton=info.get("triton"), copy_gbs=copy, build=build, backend_info=info)
    t0, rows = time.perf_counter(), []
    for name, make in _cases(torch, dev, args.dry_run):
        try:
            rows += _run_case(torch, name, make, args.backends.split(","), timer, tol, copy)
        except Exception as e:  # out of memory, say: the case is reported, the check goes on
            rows.append(_row(name, "case", check="ERROR", detail=f"{type(e).__name__}: {e}"[:400]))
            rows[-1]["x_composite"] = None
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    rows += _cli_pipeline(dev)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run else ROOT / "bench" / "results")
    path = _save(out, meta, rows)
    print(f"\nbuild: {build}\nbackends: {info['backends']}\nresults: {path}\n"
          f"copy bandwidth: {copy:.1f} GB/s\n\n{_table(rows)}")
    return 1 if any(r["check"] in ("FAIL", "ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
