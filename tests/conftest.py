"""Shared test setup.

TRITON_INTERPRET=1 must be in the environment before anything imports triton (a variable set
after a @triton.jit has run is ignored), so it is set here, first, when no GPU is present.
"""
import os

if not os.environ.get("NEUSLICE_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _seed_everything():
    import random

    import numpy as np
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(scope="module", autouse=True)
def _seeded_module():
    """Module fixtures (set up before any test's own seeding) draw from the same seeds in any order."""
    _seed_everything()


@pytest.fixture(autouse=True)
def _isolated_global_state():
    """Every test starts from the same global state, whatever ran before it (shuffled or alone): torch,
    numpy and random seeded to 0; afterwards the default dtype, torch's thread count and the environment
    are put back if the test changed them. (Warnings filters pytest already restores per test.)"""
    _seed_everything()
    dtype, threads, env = torch.get_default_dtype(), torch.get_num_threads(), dict(os.environ)
    yield
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests start with no backend forced; a test forces one with the `force_backend` fixture."""
    monkeypatch.delenv("NEUSLICE_BACKEND", raising=False)


@pytest.fixture
def force_backend(monkeypatch):
    def force(name: str):
        monkeypatch.setenv("NEUSLICE_BACKEND", name)
    return force


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: two OpenMP threads on this shared 2-core box
    stall at every barrier when the other core is busy (measured: 3 ms vs 200 ms per training step;
    the demo took 95 s instead of 8.5 s). Restored afterwards. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=[False, True], ids=["raised", "deferred"])
def deferred(request, monkeypatch):
    """Both ways a data error reaches the engine: raised by a synchronous call (CPU), or deferred into the
    layer's status word and read when the batch ends (how it runs on a GPU), here forced on the CPU."""
    if request.param:
        from neuslice.engine.capture import StatusWords
        monkeypatch.setattr(StatusWords, "DEFERRED", ("cuda", "cpu"))
    return request.param
