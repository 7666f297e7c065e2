"""Benchmarks: `python -m pytest bench/bench_ops.py --benchmark-enable` (see README)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from harness import TABLE, copy_bandwidth  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _warm_memory_system():
    """Measure the copy bandwidth before any kernel: it also warms the allocator, the page tables
    and the clock, which otherwise made the session's first timed case ~50% slower (measured)."""
    for t in (1, 2):
        copy_bandwidth(t)


@pytest.fixture(params=[1, 2], ids=lambda t: f"{t}thr")
def threads(request):
    prev = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(prev)


def pytest_terminal_summary(terminalreporter):
    if not TABLE.rows:
        return
    path = TABLE.save(os.environ.get("NEUSLICE_BENCH_NAME", "cpu_ops"))
    terminalreporter.write_sep("=", "neuslice benchmark table")
    terminalreporter.write_line(TABLE.markdown())
    terminalreporter.write_line(f"saved to {path}")
