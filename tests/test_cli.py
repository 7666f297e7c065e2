"""The `neuslice` command through its real entry points: main(argv) and `python -m neuslice`."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from neuslice.cli import Progress, build_parser, main
from neuslice.io.digits import load_digits, subset_classes
from neuslice.io.modelfile import load_model
from neuslice.maintain import RestructuredModel, TaskAwareModel, restructure
from neuslice.models import build, fit
from neuslice.engine.slices import Profile, Slices
from torch.utils.data import DataLoader, TensorDataset

from helpers import check_page

A, B = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
TEN = ",".join(str(k) for k in range(10))
COMMANDS = ["profile", "merge", "slice", "restructure", "readapt", "incremental", "predict", "report", "demo", "info"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_json(argv, capsys):
    """main(argv + --json): exit code 0 and exactly one JSON object on stdout."""
    rc = main(argv + ["--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A digits_cnn trained on all classes and one on task A (as torch.save state dicts), and npz data."""
    d = tmp_path_factory.mktemp("cli")
    x, y = load_digits("train")
    model = fit(build("digits_cnn", seed=0), DataLoader(TensorDataset(x, y), 64, shuffle=True), epochs=3)
    torch.save(model.state_dict(), d / "model.pt")
    xa, ya = subset_classes(x, y, A)
    model_a = fit(build("digits_cnn", seed=0), DataLoader(TensorDataset(xa, ya), 64, shuffle=True), epochs=3)
    torch.save(model_a.state_dict(), d / "model_a.pt")
    np.savez(d / "a.npz", x=xa.numpy(), y=ya.numpy())
    np.savez(d / "b.npz", x=subset_classes(x, y, B)[0].numpy(), y=subset_classes(x, y, B)[1].numpy())
    return d


@pytest.fixture(scope="module")
def chain(files, tmp_path_factory):
    """profile → slice through main(): the files later steps read."""
    d = files
    rc = main(["profile", "--model", "digits_cnn", "--weights", str(d / "model.pt"), "--data", "digits",
               "--out", str(d / "p.safetensors"), "--quiet"])
    assert rc == 0
    assert main(["slice", "--profile", str(d / "p.safetensors"), "--out", str(d / "s.safetensors"), "--quiet"]) == 0
    return d


# ---------------------------------------------------------------------------------------------
# entry points, help, usage errors

@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_on_every_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and f"usage: neuslice {cmd}" in capsys.readouterr().out


@pytest.mark.slow
def test_module_entry_point_and_usage_exit_2():
    out = subprocess.run([sys.executable, "-m", "neuslice", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in COMMANDS)
    out = subprocess.run([sys.executable, "-m", "neuslice", "nosuchcommand"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_console_script_is_declared():
    import tomllib
    from pathlib import Path
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["neuslice"] == "neuslice.cli:main"
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


def test_usage_errors_exit_2(chain, capsys):
    assert main(["slice"]) == 2                           # --profile is required
    assert "the following arguments are required: --profile" in capsys.readouterr().err
    d = chain
    base = ["restructure", "--model", "digits_cnn", "--weights", str(d / "model.pt"), "--slices",
            str(d / "s.safetensors"), "--keep", "3,8", "--out", str(d / "x.safetensors")]
    assert main(base) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(base + ["--model-args", "{bad json"]) == 2
    assert "--model-args must be a JSON object" in capsys.readouterr().err
    assert main(base[:-4] + ["--keep", "three", "--input-shape", "1,8,8"]) == 2
    assert "neither a class index nor one of the classes" in capsys.readouterr().err


USER_NET = """
import torch.nn as nn

def make(width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 3))
"""


@pytest.mark.slow
def test_user_model_from_package_module_factory_in_a_subprocess(tmp_path):
    (tmp_path / "usernet.py").write_text(USER_NET)
    import importlib.util
    spec = importlib.util.spec_from_file_location("usernet", tmp_path / "usernet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.make(width=6).state_dict(), tmp_path / "w.pt")
    x, y = load_digits("test")
    keep = y < 3
    np.savez(tmp_path / "d.npz", x=x[keep].numpy(), y=y[keep].numpy(), classes=np.array(["zero", "one", "two"]))
    cmd = [sys.executable, "-m", "neuslice", "profile", "--model", "usernet:make", "--model-args", '{"width": 6}',
           "--weights", "w.pt", "--data", "d.npz", "--out", "p.safetensors", "--json", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["per_class"] == {"zero": int((y == 0).sum()), "one": int((y == 1).sum()), "two": int((y == 2).sum())}
    assert got["layers"] == [{"name": "1", "type": "Linear", "neurons": 6}] and out.stderr == ""


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"] is None and "cpu" in info["order"]


# ---------------------------------------------------------------------------------------------
# the steps, chained through files

def test_profile_and_merge(chain, capsys):
    d = chain
    got = run_json(["profile", "--model", "digits_cnn", "--weights", str(d / "model.pt"), "--data", "digits:test",
                    "--metrics", "avg,taylor", "--out", str(d / "p_test.safetensors")], capsys)
    assert got["samples"] == 450 and got["metrics"] == ["avg", "taylor"]
    assert [layer["name"] for layer in got["layers"]] == ["features.0", "features.4"]
    main(["profile", "--model", "digits_cnn", "--weights", str(d / "model.pt"), "--data", "digits:test",
          "--out", str(d / "p_test4.safetensors"), "--quiet"])
    capsys.readouterr()
    merged = run_json(["merge", str(d / "p.safetensors"), str(d / "p_test4.safetensors"), "--out",
                       str(d / "pm.safetensors")], capsys)
    assert merged["samples"] == 1797
    a, b, m = (Profile.load(d / f) for f in ("p.safetensors", "p_test4.safetensors", "pm.safetensors"))
    assert torch.equal(m.stats["features.4"]["taylor_sum"], a.stats["features.4"]["taylor_sum"] +
                       b.stats["features.4"]["taylor_sum"])
    assert main(["merge", str(d / "p.safetensors"), str(d / "p_test.safetensors"), "--out",
                 str(d / "bad.safetensors")]) == 1
    assert "differ in metrics" in capsys.readouterr().err


def test_slice_modes(chain, capsys):
    d = chain
    got = run_json(["slice", "--profile", str(d / "p.safetensors"), "--mode", "category", "--ratio", "0.25",
                    "--metric", "avg", "--out", str(d / "sc.safetensors")], capsys)
    assert got["mode"] == "category" and got["layers"][0]["critical_per_class_mean"] == 4.0
    s = Slices.load(d / "s.safetensors")
    assert s.mode == "semantic" and s.metric == "taylor" and s.value == 0.9
    assert main(["slice", "--profile", str(d / "p.safetensors"), "--theta", "1.5", "--out",
                 str(d / "t.safetensors")]) == 2
    assert "argument --theta: must be a number in (0, 1], got '1.5'" in capsys.readouterr().err


def test_round_trip_restructure_load_predict(chain, capsys):
    d = chain
    out = d / "r.safetensors"
    got = run_json(["restructure", "--model", "digits_cnn", "--weights", str(d / "model.pt"), "--slices",
                    str(d / "s.safetensors"), "--keep", "3,8", "--data", "digits", "--test-data", "digits:test",
                    "--out", str(out)], capsys)
    assert got["classes"] == ["3", "8"] and got["params"] < got["original_params"]
    assert got["compression_rate"] == got["slice_compression_rate"] > 0.2
    loaded = load_model(weights=out)
    assert isinstance(loaded, RestructuredModel) and loaded.class_map.tolist() == [3, 8]
    model = load_model("digits_cnn", d / "model.pt")
    x, y = load_digits("test")
    ref, _ = restructure(model, Slices.load(d / "s.safetensors"), [3, 8], example_inputs=x[:2])
    assert torch.allclose(loaded(x), ref(x), rtol=1e-5, atol=1e-6)
    keep = (y == 3) | (y == 8)
    pred = loaded.predict(x[keep])
    assert set(pred.tolist()) <= {3, 8}
    assert (pred == y[keep]).float().mean().item() == pytest.approx(got["accuracy_restructured"], abs=1e-4)
    got = run_json(["predict", "--weights", str(out), "--data", "digits:test", "--out", str(d / "pred.csv")],
                   capsys)
    assert got["classes"] == [3, 8]
    assert got["accuracy"] == pytest.approx((pred == y[keep]).float().mean().item(), abs=1e-4)
    lines = (d / "pred.csv").read_text().splitlines()
    assert lines[0] == "index,label,prediction" and len(lines) == 451


def test_restructure_mask_finetune_and_compress(chain, capsys):
    d = chain
    got = run_json(["restructure", "--model", "digits_cnn", "--weights", str(d / "model.pt"), "--slices",
                    str(d / "s.safetensors"), "--keep", "0,1", "--mode", "mask", "--data", "digits",
                    "--finetune-epochs", "1", "--compress", "0.8", "--out", str(d / "rm.safetensors")], capsys)
    assert got["mode"] == "mask" and got["compress"]["iterations"] >= 1
    assert got["compress"]["compression_rate"] == pytest.approx(0.8, abs=0.01)
    loaded = load_model(weights=d / "rm.safetensors")
    assert isinstance(loaded, RestructuredModel) and loaded.mode == "mask" and loaded.class_map.tolist() == [0, 1]
    x, _ = load_digits("test")
    assert loaded(x[:4]).shape == (4, 2)
    # without fine-tuning, the written mask model computes exactly what restructure(mode="mask") gives
    assert main(["restructure", "--model", "digits_cnn", "--weights", str(d / "model.pt"), "--slices",
                 str(d / "s.safetensors"), "--keep", "0,1", "--mode", "mask", "--out", str(d / "rm0.safetensors"),
                 "--quiet"]) == 0
    ref, _ = restructure(load_model("digits_cnn", d / "model.pt"), Slices.load(d / "s.safetensors"), [0, 1],
                         mode="mask")
    assert torch.equal(load_model(weights=d / "rm0.safetensors")(x), ref(x))


def test_readapt(chain, capsys):
    d = chain
    x, y = load_digits("test")
    np.savez(d / "new.npz", x=torch.roll(x, (1, 1), (2, 3)).numpy(), y=y.numpy())
    got = run_json(["readapt", "--model", "digits_cnn", "--weights", str(d / "model.pt"), "--slices",
                    str(d / "s.safetensors"), "--data", str(d / "new.npz"), "--test-data", "digits:test",
                    "--epochs", "2", "--out", str(d / "ra.safetensors")], capsys)
    assert 0 < got["trainable_fraction"] <= 1 and got["steps"] == 16
    assert got["new_acc_after"] > got["new_acc_before"]
    new = load_model(weights=d / "ra.safetensors")
    assert not torch.equal(new(x[:8]), load_model("digits_cnn", d / "model.pt")(x[:8]))


def test_incremental_task_aware_model(files, capsys):
    d = files
    common = ["--model", "digits_cnn", "--weights", str(d / "model_a.pt")]
    assert main(["profile", *common, "--data", str(d / "a.npz"), "--classes", TEN, "--out",
                 str(d / "pa.safetensors"), "--quiet"]) == 0
    assert main(["slice", "--profile", str(d / "pa.safetensors"), "--theta", "0.7", "--out",
                 str(d / "sa.safetensors"), "--quiet"]) == 0
    capsys.readouterr()
    got = run_json(["incremental", *common, "--slices", str(d / "sa.safetensors"), "--data", str(d / "b.npz"),
                    "--classes", TEN, "--new-classes", "5,6,7,8,9", "--epochs", "2", "--test-a", "digits:test",
                    "--test-b", "digits:test", "--out", str(d / "inc.safetensors")], capsys)
    assert got["old_classes"] == A and got["new_classes"] == B and got["task_b_acc_after"] > 0.5
    loaded = load_model(weights=d / "inc.safetensors")
    assert isinstance(loaded, TaskAwareModel) and loaded.tasks == {"A": A, "B": B}
    x, _ = load_digits("test")
    assert set(loaded.predict(x, task="A").tolist()) <= set(A) and set(loaded.predict(x, task="B").tolist()) <= set(B)
    got2 = run_json(["predict", "--weights", str(d / "inc.safetensors"), "--data", "digits:test", "--task", "A"],
                    capsys)
    assert got2["accuracy"] == pytest.approx(got["task_a_acc_after"], abs=1e-4)
    assert main(["incremental", *common, "--slices", str(d / "sa.safetensors"), "--data", str(d / "b.npz"),
                 "--classes", TEN, "--new-classes", "4,5", "--out", str(d / "x.safetensors")]) == 1
    assert "overlap the old classes" in capsys.readouterr().err


@pytest.fixture(scope="module")
def restructured(chain):
    """restructure --keep 3,8 through main(), written apart from the round-trip test's file: the results the
    report reads, so the report test does not depend on another test having run first."""
    out = chain / "r_report.safetensors"
    assert main(["restructure", "--model", "digits_cnn", "--weights", str(chain / "model.pt"), "--slices",
                 str(chain / "s.safetensors"), "--keep", "3,8", "--data", "digits", "--test-data", "digits:test",
                 "--out", str(out), "--quiet"]) == 0
    return out


def test_report_from_files(chain, restructured, capsys, tmp_path):
    d = chain
    got = run_json(["report", "--profile", str(d / "p.safetensors"), "--model", "digits_cnn", "--weights",
                    str(d / "model.pt"), "--test-data", "digits:test", "--results", str(restructured),
                    "--out", str(tmp_path / "rep")], capsys)
    assert check_page(tmp_path / "rep") == got["figures"]
    assert len(got["figures"]) == 4
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert set(summary["maintenance"]) == {"restructure"} and set(summary["curves"]) == {"global", "category",
                                                                                         "semantic"}
    assert main(["report", "--out", str(tmp_path / "x")]) == 2


def test_demo_end_to_end(tmp_path, capsys):
    summary = run_json(["demo", "--out", str(tmp_path / "rep"), "--epochs", "2"], capsys)
    on_disk = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary == on_disk
    for f in ("model.safetensors", "profile.safetensors", "slices.safetensors"):
        assert (tmp_path / "rep" / f).stat().st_size > 0
    assert summary["test_accuracy"] > 0.5 and {r["layer"] for r in summary["layers"]} == {"features.0", "features.4"}
    assert sorted(c for g in summary["groups"] for c in g) == [str(k) for k in range(10)]
    assert set(summary["maintenance"]) == {"restructure", "readapt", "incremental"}
    assert len(check_page(tmp_path / "rep")) == 4
    m = summary["maintenance"]
    assert m["restructure"]["params"] < m["restructure"]["original_params"]
    assert m["readapt"]["classes"] == [3, 8] and 0 < m["readapt"]["trainable_fraction"] < 1
    assert m["incremental"]["new_classes"] == [5, 6, 7, 8, 9]
    assert isinstance(load_model(weights=tmp_path / "rep" / "model.safetensors"), torch.nn.Module)


def test_demo_bad_theta_is_a_usage_error(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--epochs", "1", "--theta", "1.5", "--quiet", "--no-maintenance"])
    assert rc == 2
    assert "argument --theta" in capsys.readouterr().err and not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# malformed input through the command

def test_malformed_files_exit_1_naming_the_file(chain, tmp_path, capsys):
    d = chain
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x08\x03\x00\x00" + b"\0" * 20)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\0")
    prof = ["profile", "--model", "digits_cnn", "--weights", str(d / "model.pt"), "--out", str(tmp_path / "p")]
    assert main(prof + ["--data", str(bad)]) == 1
    assert f"{bad}: bad magic number" in capsys.readouterr().err
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 1, 8, 8), np.float32), y=np.array([0, 1, 5]))
    assert main(prof + ["--data", str(tmp_path / "d.npz"), "--classes", "a,b,c"]) == 1
    assert "d.npz: label 5 is outside the declared classes" in capsys.readouterr().err
    torch.save(build("digits_cnn"), tmp_path / "module.pt")
    assert main(["profile", "--model", "digits_cnn", "--weights", str(tmp_path / "module.pt"), "--data", "digits"]) == 1
    assert "a pickled module is refused" in capsys.readouterr().err
    torch.save(build("digits_mlp").state_dict(), tmp_path / "mlp.pt")
    assert main(["restructure", "--model", "digits_mlp", "--weights", str(tmp_path / "mlp.pt"), "--slices",
                 str(d / "s.safetensors"), "--keep", "1", "--input-shape", "1,8,8"]) == 1
    assert "made for another model" in capsys.readouterr().err
    (tmp_path / "cut.safetensors").write_bytes((d / "s.safetensors").read_bytes()[:-40])
    assert main(["report", "--slices", str(tmp_path / "cut.safetensors"), "--out", str(tmp_path / "r")]) == 1
    assert "cut.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# progress bars

class _Tty(io.StringIO):
    def isatty(self):
        return True


def _stderr_on_a_pty(cmd) -> str:
    """Run ``cmd`` with its stderr on a pseudo-terminal; return what it wrote there."""
    import os
    import threading
    master, slave = os.openpty()
    chunks = []

    def pump():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, timeout=120)
    os.close(slave)
    t.join(5)
    os.close(master)
    assert out.returncode == 0
    return b"".join(chunks).decode()


@pytest.mark.slow
def test_progress_bars_on_a_terminal_subprocess(chain):
    cmd = [sys.executable, "-m", "neuslice", "profile", "--model", "digits_cnn", "--weights",
           str(chain / "model.pt"), "--data", "digits:test", "--out", str(chain / "tty.safetensors"), "--threads", "1"]
    err = _stderr_on_a_pty(cmd)
    assert "profile" in err and "8/8" in err and "########################" in err
    assert _stderr_on_a_pty(cmd + ["--quiet"]) == ""


def test_progress_draws_only_on_a_terminal_and_not_when_quiet(chain, capsys):
    tty = _Tty()
    assert list(Progress([1, 2, 3], "pass", stream=tty)) == [1, 2, 3]
    assert "3/3" in tty.getvalue() and "####" in tty.getvalue() and tty.getvalue().endswith("\n")
    pipe, off = io.StringIO(), _Tty()
    assert list(Progress([1, 2], "pass", stream=pipe)) == [1, 2] and pipe.getvalue() == ""
    assert list(Progress([1, 2], "pass", enabled=False, stream=off)) == [1, 2] and off.getvalue() == ""
    d = chain
    assert main(["profile", "--model", "digits_cnn", "--weights", str(d / "model.pt"), "--data", "digits:test",
                 "--out", str(d / "q.safetensors"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
