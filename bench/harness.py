"""The one bench harness: cache flushing, the machine's copy bandwidth, and the result table.

Conventions (printed with every table):
- Every timed call starts from a cold last-level cache (a 96 MiB buffer is rewritten first), so a
  kernel's inputs come from DRAM as they would for real activations.
- GB/s of a kernel = bytes that must be read once (its inputs) / median time.
- Copy bandwidth = (bytes read + bytes written) / median time of ``dst.copy_(src)`` over 256 MiB,
  measured in the same run at the same thread count (the STREAM "copy" convention). Each row's
  "% of copy" is against a copy measured right after that row's case (``copy_bandwidth_now``):
  this dev VM's memory bandwidth drifts by up to a third within a minute (measured: the same
  read-only pass at 26.7 and 17.8 GB/s in two runs a minute apart), so one figure from the
  start of a session misstates rows timed later. The per-row copies are printed beside each row.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"
_FLUSH = None


def flush_cache() -> None:
    """Evict the inputs of the previous call from every cache level."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(96 * 2**20 // 4, dtype=torch.float32)
    _FLUSH.fill_(1.0)


def median_seconds(fn: Callable[[], object], *, reps: int = 15, flush: bool = True) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls (after one warm-up), each from a cold cache."""
    fn()
    times = []
    for _ in range(reps):
        if flush:
            flush_cache()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> Dict[str, float]:
    """Median wall seconds per call of each function, the functions taking turns every round after
    ``warmup`` calls each (load drifts hit all of them alike); no cache flush (whole passes, not kernels)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


_COPY: Dict[int, float] = {}
_COPY_BUF = None   # (src, dst), 256 MiB each, allocated once


def copy_bandwidth_now(threads: int, reps: int = 5) -> float:
    """A fresh STREAM-copy measurement in GB/s ((read + write bytes) / median time of ``dst.copy_(src)``)
    at ``threads`` threads: the normaliser for the case just timed."""
    global _COPY_BUF
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if _COPY_BUF is None:
            src = torch.ones(256 * 2**20 // 4, dtype=torch.float32)
            _COPY_BUF = (src, torch.empty_like(src))
        src, dst = _COPY_BUF
        t = median_seconds(lambda: dst.copy_(src), reps=reps, flush=False)
        return 2 * src.numel() * 4 / t / 1e9
    finally:
        torch.set_num_threads(prev)


def copy_bandwidth(threads: int) -> float:
    """The session's first STREAM-copy measurement at ``threads`` threads (cached)."""
    if threads not in _COPY:
        _COPY[threads] = copy_bandwidth_now(threads, reps=9)
    return _COPY[threads]


@dataclass
class Row:
    op: str
    case: str
    impl: str
    threads: int
    ms: float
    gbs: Optional[float] = None
    extra: Dict[str, float] = field(default_factory=dict)
    copy_gbs: Optional[float] = None  # copy bandwidth measured right after this row's case


class Table:
    """Collects rows during a pytest session; bench/conftest.py prints and saves it at the end."""

    def __init__(self) -> None:
        self.rows: List[Row] = []

    def add(self, op: str, case: str, impl: str, threads: int, seconds: float, nbytes: Optional[int] = None,
            **extra: float) -> Row:
        """A row; rows with ``nbytes`` get a copy bandwidth measured now, right after their case."""
        row = Row(op, case, impl, threads, seconds * 1e3, None if nbytes is None else nbytes / seconds / 1e9,
                  dict(extra), None if nbytes is None else copy_bandwidth_now(threads))
        self.rows.append(row)
        return row

    def _baseline(self, row: Row, impl: str) -> Optional[Row]:
        for r in self.rows:
            if (r.op, r.case, r.threads, r.impl) == (row.op, row.case, row.threads, impl):
                return r
        return None

    def markdown(self) -> str:
        any_extra = any(r.extra for r in self.rows)
        lines = [
            f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}; "
            "GB/s = bytes read once / median time (cold cache); copy = STREAM copy (read+write)/time, "
            "measured right after each row's case.",
            "",
            "| op | case | impl | threads | median ms | GB/s | copy GB/s | % of copy | speedup vs composite | vs reference |"
            + (" extra |" if any_extra else ""),
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if any_extra else ""),
        ]
        for r in self.rows:
            comp, ref = self._baseline(r, "composite"), self._baseline(r, "reference")
            copy = r.copy_gbs if r.copy_gbs is not None else (None if r.gbs is None else copy_bandwidth(r.threads))
            pct = "" if r.gbs is None else f"{100 * r.gbs / copy:.0f}%"
            sp = "" if comp is None or r.impl == "composite" else f"{comp.ms / r.ms:.1f}x"
            if r.impl == "read-bound" and comp is not None:
                sp += " (ceiling)"
            sr = "" if ref is None or r.impl == "reference" else f"{ref.ms / r.ms:.1f}x"
            gbs = "" if r.gbs is None else f"{r.gbs:.1f}"
            cp = "" if copy is None else f"{copy:.1f}"
            ms = f"{r.ms:.2f}" if r.ms >= 0.1 else f"{r.ms:.4f}"
            extra = ", ".join(f"{k} {v:.4g}" for k, v in r.extra.items())
            lines.append(f"| {r.op} | {r.case} | {r.impl} | {r.threads} | {ms} | {gbs} | {cp} | {pct} | {sp} | {sr} |"
                         + (f" {extra} |" if any_extra else ""))
        ratios = [r for r in self.rows if "floor_ratio" in r.extra]
        if ratios:
            lines += ["", "Fused accumulate against the read-only floor (x.sum(); g.sum()), alternated call by "
                      "call in one process, median of each; ratio = floor / fused (>= 0.9 is the target):", "",
                      "| case | threads | fused ms | floor ms | ratio |", "|---|---|---|---|---|"]
            for r in ratios:
                fl = self._baseline(r, "read-bound")
                lines.append(f"| {r.case} | {r.threads} | {r.ms:.2f} | {fl.ms:.2f} | {r.extra['floor_ratio']:.2f} |")
        copies = ", ".join(f"{t} thread(s): {bw:.1f} GB/s" for t, bw in sorted(_COPY.items()))
        spread = []
        for t in sorted({r.threads for r in self.rows if r.copy_gbs is not None}):
            cs = [r.copy_gbs for r in self.rows if r.threads == t and r.copy_gbs is not None]
            spread.append(f"{t} thread(s): {min(cs):.1f}-{max(cs):.1f} GB/s")
        lines += ["", f"copy bandwidth at the start of this run: {copies}"
                  + (f"; next to the rows: {', '.join(spread)}" if spread else "")]
        return "\n".join(lines)

    def save(self, name: str, note: str = "") -> Path:
        """``bench/results/<name>.json`` and ``.md``; ``note`` (e.g. the command) goes above the table."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d")
        (RESULTS / f"{name}.json").write_text(json.dumps(
            {"date": stamp, "note": note, "copy_gbs": _COPY, "rows": [asdict(r) for r in self.rows]}, indent=1))
        path = RESULTS / f"{name}.md"
        path.write_text(f"# {name} ({stamp})\n\n" + (f"{note}\n\n" if note else "") + f"{self.markdown()}\n")
        return path


TABLE = Table()
