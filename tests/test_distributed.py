"""Profile.all_reduce: two gloo processes on 127.0.0.1, each over one half of the data, get the
single-process result exactly."""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import neuslice
from neuslice import Profile
from neuslice.engine.slices import STATS
from slicing_fixtures import small_loader, trained
from tolerances import ACCUMULATE, assert_close

K = 10


def _halves():
    batches = list(small_loader(160, 40))
    return batches[:2], batches[2:]


def _model(path):
    import neuslice.models as M
    model = M.build("digits_cnn")
    model.load_state_dict(load_file(path))
    return model.eval()


def _worker(rank, port, threads, model_path, out_dir):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        p = neuslice.profile(_model(model_path), _halves()[rank], K, progress=False)
        p.all_reduce()
        p.save(os.path.join(out_dir, f"rank{rank}.safetensors"))
        bad = neuslice.profile(_model(model_path), _halves()[rank], K, progress=False,
                               layers=None if rank == 0 else ["features.0"])
        try:
            bad.all_reduce()
        except ValueError as e:
            with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
                f.write(str(e))
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank, port, threads, model_path, out_dir):
    """Each rank runs the Profiler over its half in a DDP training step (no optimizer step: fixed weights)."""
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_model(model_path))
        with neuslice.Profiler(ddp, K) as prof:
            for x, y in _halves()[rank]:
                with prof.batch(y):
                    F.cross_entropy(ddp(x), y, reduction="sum").backward()
        p = prof.profile()
        p.all_reduce()
        p.save(os.path.join(out_dir, f"ddp{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _spawn(worker, model_path, out_dir):
    ctx = mp.spawn(worker, args=(_free_port(), torch.get_num_threads(), model_path, out_dir), nprocs=2, join=False)
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two gloo ranks did not finish in 150 s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_get_the_single_process_result_exactly(tmp_path):
    model = trained()
    model_path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, model_path)
    _spawn(_worker, model_path, str(tmp_path))
    model = _model(model_path)
    a, b = (neuslice.profile(model, h, K, progress=False) for h in _halves())
    merged = a + b
    one_pass = neuslice.profile(model, a_b := _halves()[0] + _halves()[1], K, progress=False)
    assert len(a_b) == 4
    for rank in (0, 1):
        got = Profile.load(tmp_path / f"rank{rank}.safetensors", model=model)
        assert got.num_batches == 4
        for n in got.layer_names:
            for s in STATS:
                assert torch.equal(got.stats[n][s], merged.stats[n][s]), (rank, n, s)
                # float64 totals of float32 batch sums: the one-pass profile is the same sum, bit for bit
                assert torch.equal(got.stats[n][s], one_pass.stats[n][s]), (rank, n, s)
        assert "ranks hold profiles of different layers" in (tmp_path / f"error{rank}.txt").read_text()


def test_all_reduce_without_an_initialised_process_group():
    p = neuslice.profile(trained(), small_loader(20, 20), K, metrics=("avg",), progress=False)
    with pytest.raises(RuntimeError, match="Profile.all_reduce: torch.distributed is not initialised"):
        p.all_reduce()


@pytest.mark.slow
def test_profiler_under_ddp_equals_the_bare_model(tmp_path):
    """docs/method.md §1: a DDP-wrapped model is profiled as the bare model (no ``module.`` prefix); the ranks'
    profiles merged by all_reduce equal one Profiler over all batches of the bare model."""
    import torch.nn.functional as F
    model = trained()
    model_path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, model_path)
    _spawn(_ddp_worker, model_path, str(tmp_path))
    bare = _model(model_path)
    with neuslice.Profiler(bare, K) as prof:
        for x, y in _halves()[0] + _halves()[1]:
            with prof.batch(y):
                F.cross_entropy(bare(x), y, reduction="sum").backward()
    want = prof.profile()
    for rank in (0, 1):
        got = Profile.load(tmp_path / f"ddp{rank}.safetensors", model=bare)
        assert got.layer_names == want.layer_names == ["features.0", "features.4"]
        assert got.num_batches == 4
        for n in got.layer_names:
            for s in ("count", "act_sum", "act_sq", "taylor_sum"):
                assert_close(got.stats[n][s], want.stats[n][s], ACCUMULATE, torch.float64, f"rank {rank} {n}/{s}")
