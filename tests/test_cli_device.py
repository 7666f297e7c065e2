"""--device, the thread default, --version, and the class count that profile takes from the model's head."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import neuslice
from neuslice.cli import common, main
from neuslice.engine.slices import Profile
from neuslice.io.digits import load_digits, subset_classes
from neuslice.models import build, fit

A, B = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task_a(tmp_path_factory):
    """A 10-output digits_cnn trained on task A only, and task A / task B data without declared classes."""
    d = tmp_path_factory.mktemp("device")
    x, y = load_digits("train")
    xa, ya = subset_classes(x, y, A)
    model = fit(build("digits_cnn", seed=0), DataLoader(TensorDataset(xa, ya), 64, shuffle=True), epochs=2)
    torch.save(model.state_dict(), d / "model_a.pt")
    np.savez(d / "a.npz", x=xa.numpy(), y=ya.numpy())
    xb, yb = subset_classes(x, y, B)
    np.savez(d / "b.npz", x=xb.numpy(), y=yb.numpy())
    return d


def _ok(argv, capsys) -> dict:
    rc = main(argv + ["--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_the_whole_pipeline_with_device_auto(task_a, capsys):
    """profile → slice → restructure → predict → readapt → incremental → report, every model on
    --device auto (the CPU here: the same code path moves models and batches on a GPU machine)."""
    d = task_a
    m = ["--model", "digits_cnn", "--weights", str(d / "model_a.pt"), "--device", "auto"]
    p = _ok(["profile", *m, "--data", str(d / "a.npz"), "--out", str(d / "p.safetensors")], capsys)
    assert len(p["per_class"]) == 10                       # the head's classes, not the 5 the data holds
    _ok(["slice", "--profile", str(d / "p.safetensors"), "--theta", "0.7", "--out", str(d / "s.safetensors")], capsys)
    r = _ok(["restructure", *m, "--slices", str(d / "s.safetensors"), "--keep", "1,3", "--data", str(d / "a.npz"),
             "--test-data", str(d / "a.npz"), "--out", str(d / "r.safetensors")], capsys)
    final = r["accuracy_finetuned"] if r["accuracy_finetuned"] is not None else r["accuracy_restructured"]
    got = _ok(["predict", "--weights", str(d / "r.safetensors"), "--data", str(d / "a.npz"), "--device", "auto"],
              capsys)
    assert got["accuracy"] == pytest.approx(final, abs=1e-4)     # the saved model is the one restructure scored
    _ok(["readapt", *m, "--slices", str(d / "s.safetensors"), "--data", str(d / "a.npz"), "--epochs", "1",
         "--out", str(d / "ra.safetensors")], capsys)
    inc = _ok(["incremental", *m, "--slices", str(d / "s.safetensors"), "--data", str(d / "b.npz"),
               "--new-classes", "5,6,7,8,9", "--epochs", "1", "--out", str(d / "inc.safetensors")], capsys)
    assert inc["new_classes"] == B
    rep = _ok(["report", "--profile", str(d / "p.safetensors"), "--slices", str(d / "s.safetensors"),
               "--results", str(d / "r.safetensors"), str(d / "inc.safetensors"), "--out", str(d / "rep")], capsys)
    assert (d / "rep" / "index.html").exists() and rep["figures"]


def test_profile_takes_the_class_count_from_the_head(task_a, capsys):
    d = task_a
    out = d / "p10.safetensors"
    _ok(["profile", "--model", "digits_cnn", "--weights", str(d / "model_a.pt"), "--data", str(d / "a.npz"),
         "--out", str(out)], capsys)
    prof = Profile.load(out)
    assert prof.num_classes == 10 and prof.counts[5:].sum() == 0 and prof.counts[:5].min() > 0
    # declared classes beyond the head's outputs are an error, not a silent profile
    rc = main(["profile", "--model", "digits_cnn", "--weights", str(d / "model_a.pt"), "--data", str(d / "a.npz"),
               "--classes", ",".join(str(k) for k in range(12)), "--out", str(d / "p12.safetensors"), "--quiet"])
    assert rc == 1 and "the model scores 10" in capsys.readouterr().err


def test_incremental_on_old_five_class_slices_says_the_fix(task_a, capsys):
    """Slices made from a profile of the data's 5 classes (as older versions wrote them) on a 10-output model."""
    d = task_a
    x, y = load_digits("train")
    xa, ya = subset_classes(x, y, A)
    model = common.load_model_of(type("A", (), {"model": "digits_cnn", "weights": str(d / "model_a.pt"),
                                                "model_args": None, "trust_model_code": False, "device": "cpu"})())
    prof = neuslice.profile(model, DataLoader(TensorDataset(xa, ya), 64), 5, progress=False)
    neuslice.semantic_slice(prof, "taylor", 0.7).save(d / "s5.safetensors")
    rc = main(["incremental", "--model", "digits_cnn", "--weights", str(d / "model_a.pt"), "--slices",
               str(d / "s5.safetensors"), "--data", str(d / "b.npz"), "--new-classes", "5,6", "--quiet",
               "--out", str(d / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "has 10 outputs but the slices have 5 classes" in err and "neuslice profile" in err


def test_device_errors_are_usage_errors(task_a, capsys):
    argv = ["profile", "--model", "digits_cnn", "--weights", str(task_a / "model_a.pt"), "--data",
            str(task_a / "a.npz"), "--out", str(task_a / "never.safetensors"), "--quiet"]
    assert main(argv + ["--device", "gpu"]) == 2
    assert "auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(argv + ["--device", "cuda:0"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
    assert not (task_a / "never.safetensors").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"neuslice {neuslice.__version__}"


@pytest.mark.parametrize("load, cores, want", [(0.0, 2, 2), (1.0, 2, 1), (1.6, 2, 1), (7.9, 2, 1), (0.4, 4, 4)])
def test_default_threads_follow_the_idle_cores(monkeypatch, load, cores, want):
    monkeypatch.setattr(common.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(common.torch, "get_num_threads", lambda: cores)
    assert common.default_threads() == want


def test_readapt_replay_from_the_command_line(task_a, capsys):
    d = task_a
    m = ["--model", "digits_cnn", "--weights", str(d / "model_a.pt")]
    _ok(["profile", *m, "--data", str(d / "a.npz"), "--out", str(d / "pr.safetensors")], capsys)
    _ok(["slice", "--profile", str(d / "pr.safetensors"), "--out", str(d / "sr.safetensors")], capsys)
    x, y = subset_classes(*load_digits("test"), [3])
    np.savez(d / "new3.npz", x=torch.roll(x, 1, 3).numpy(), y=y.numpy())
    base = ["readapt", *m, "--slices", str(d / "sr.safetensors"), "--data", str(d / "new3.npz"), "--epochs", "1"]
    assert main(base + ["--replay", "0.5", "--out", str(d / "never.safetensors"), "--quiet"]) == 2
    assert "--replay 0.5 needs --replay-data" in capsys.readouterr().err
    got = _ok(base + ["--replay-data", str(d / "a.npz"), "--out", str(d / "rr.safetensors")], capsys)
    assert got["replay"] == 0.5 and got["replayed"] == max(1, round(0.5 * len(y)))
    got = _ok(base + ["--replay-data", str(d / "a.npz"), "--replay", "0", "--out", str(d / "r0.safetensors")], capsys)
    assert got["replay"] == 0.0 and got["replayed"] == 0
