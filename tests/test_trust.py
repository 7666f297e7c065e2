"""Hardening: model files never run code the caller did not allow, and the command never hurts its user
(docs/method.md §5, "Model files: trust"; README, "The `neuslice` command")."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from neuslice.cli import main
from neuslice.io import container
from neuslice.io.container import FileFormatError
from neuslice.io.data import DataFileError, load_data
from neuslice.io.modelfile import FactoryError, build_model, load_model, resolve_factory, save_model
from neuslice.models import build

pytestmark = pytest.mark.usefixtures("one_thread")


def _evil_file(path, marker):
    """A model file whose metadata names os:system with a command that would create ``marker``."""
    save_model(path, build("digits_mlp"), spec="os:system", model_args={"command": f"touch {marker}"})


# a module that leaves a marker when it is imported: proof of whether a file's factory was imported
MARKING_MODULE = """
import pathlib
import torch.nn as nn
pathlib.Path({marker!r}).write_text("imported")

def make(width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 3))

def not_a_model():
    return 3

def bye():
    raise SystemExit(0)
"""


@pytest.fixture
def marking(tmp_path, monkeypatch):
    """A module ``nsmark_<n>`` on sys.path, its marker file, and a model file naming its ``make``."""
    name = f"nsmark_{len(sys.modules)}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(MARKING_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    save_model(tmp_path / "m.safetensors", net, spec=f"{name}:make", model_args={"width": 5})
    yield name, marker, tmp_path / "m.safetensors"
    sys.modules.pop(name, None)


# ---------------------------------------------------------------------------------------------
# no code from files

def test_file_naming_os_system_never_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    _evil_file(tmp_path / "evil.safetensors", marker)
    with pytest.raises(FactoryError, match=r"evil.safetensors: the file names the factory 'os:system', which is not"):
        load_model(weights=tmp_path / "evil.safetensors")
    with pytest.raises(FactoryError, match="built-in function, not a model factory"):   # not even when trusted
        load_model(weights=tmp_path / "evil.safetensors", trust_code=True)
    for extra in ([], ["--trust-model-code"]):
        assert main(["predict", "--weights", str(tmp_path / "evil.safetensors"), "--data", "digits:test",
                     "--quiet", *extra]) == 1
        err = capsys.readouterr().err
        assert "os:system" in err and "Traceback" not in err
    assert not marker.exists()


def test_files_factory_is_imported_only_when_allowed(marking, capsys):
    name, marker, path = marking
    with pytest.raises(FactoryError, match=rf"names the factory '{name}:make'.*--trust-model-code"):
        load_model(weights=path)
    assert main(["predict", "--weights", str(path), "--data", "digits:test", "--quiet"]) == 1
    assert "--trust-model-code" in capsys.readouterr().err
    assert not marker.exists() and name not in sys.modules
    model = load_model(weights=path, trust_code=True)            # the caller trusts the file
    assert marker.exists() and model[1].out_features == 5
    assert main(["predict", "--weights", str(path), "--data", "digits:test", "--quiet", "--trust-model-code"]) == 0
    marker.unlink()
    assert isinstance(load_model(f"{name}:make", path), torch.nn.Sequential)   # the caller names it: allowed


def test_passed_factory_must_match_the_files(tmp_path, capsys):
    save_model(tmp_path / "mlp.safetensors", build("digits_mlp"), spec="digits_mlp")
    with pytest.raises(FactoryError, match="written with the factory 'digits_mlp', but the factory passed .* is "
                                           "'digits_cnn'"):
        load_model("digits_cnn", tmp_path / "mlp.safetensors")
    assert main(["predict", "--model", "neuslice.models:MLP", "--weights", str(tmp_path / "mlp.safetensors"),
                 "--data", "digits:test", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "'digits_mlp'" in err and "'neuslice.models:MLP'" in err
    assert isinstance(load_model("digits_mlp", tmp_path / "mlp.safetensors"), torch.nn.Module)


def _with_modules(tmp_path, modules, spec="digits_cnn"):
    """A model file of digits_cnn whose metadata 'modules' entry is ``modules``."""
    net = build("digits_cnn")
    path = tmp_path / "m.safetensors"
    container.write("test", path, "model", dict(net.state_dict()),
                    {"model": spec, "model_args": {}, "wrapper": None, "modules": modules, "report": None})
    return path


@pytest.mark.parametrize("modules, field, problem", [
    ({"features.0": {"padding": [0, 0]}}, r"modules\['features.0'\].padding", "may not be set from a file"),
    ({"features.0": {"dilation": [2, 2]}}, r"modules\['features.0'\].dilation", "may not be set from a file"),
    ({"features.0": {"forward": 1}}, r"modules\['features.0'\].forward", "may not be set from a file"),
    ({"nope": {"out_channels": 4}}, r"modules\['nope'\]", "names no module of the model"),
    ({"features.0": {"out_channels": 0}}, r"modules\['features.0'\].out_channels", "must be a positive int"),
    ({"features.0": {"out_channels": True}}, r"modules\['features.0'\].out_channels", "must be a positive int"),
    ({"features.0": {"out_channels": "16"}}, r"modules\['features.0'\].out_channels", "must be a positive int"),
    ({"features.0": {"out_channels": 17}}, r"modules\['features.0'\]", r"weight of \[17, 1, 3, 3\] but the "
                                                                       r"weights hold \[16, 1, 3, 3\]"),
    ({"features.0": {"groups": 3}}, r"modules\['features.0'\]", "groups 3 does not divide"),
    ({"features.1": {"num_features": 8}}, r"modules\['features.1'\]", "weight of \\[8\\]"),
    ({"head": {"in_features": [3]}}, r"modules\['head'\].in_features", "must be a positive int"),
    ({"features.0": {"in_features": 3}}, r"modules\['features.0'\].in_features", "is not a field of Conv2d"),
    ([1, 2], "'modules'", "must be an object"),
])
def test_metadata_sets_only_checked_shape_fields(tmp_path, modules, field, problem):
    path = _with_modules(tmp_path, modules)
    with pytest.raises(FileFormatError, match=rf"m.safetensors: metadata field {field} .*{problem}"):
        load_model(weights=path)


def test_metadata_layer_norm_shape_is_checked(tmp_path):
    net = build("digits_transformer")
    name = next(n for n, m in net.named_modules() if isinstance(m, torch.nn.LayerNorm))
    save_model(tmp_path / "t.safetensors", net, spec="digits_transformer")
    assert isinstance(load_model(weights=tmp_path / "t.safetensors"), torch.nn.Module)
    container.write("test", tmp_path / "t2.safetensors", "model", dict(net.state_dict()),
                    {"model": "digits_transformer", "model_args": {}, "wrapper": None,
                     "modules": {name: {"normalized_shape": [7]}}, "report": None})
    with pytest.raises(FileFormatError, match=rf"metadata field modules\['{name}'\] .*LayerNorm weight of \[7\]"):
        load_model(weights=tmp_path / "t2.safetensors")


@pytest.mark.parametrize("field, value, problem", [("model", 3, "must name the factory"),
                                                   ("model_args", [1], "must be an object of keyword arguments")])
def test_metadata_factory_fields_are_typed(tmp_path, field, value, problem):
    meta = {"model": "digits_cnn", "model_args": {}, "wrapper": None, "modules": {}, "report": None, field: value}
    container.write("test", tmp_path / "m.safetensors", "model", dict(build("digits_cnn").state_dict()), meta)
    with pytest.raises(FileFormatError, match=rf"m.safetensors: metadata field '{field}' {problem}"):
        load_model(weights=tmp_path / "m.safetensors")


# ---------------------------------------------------------------------------------------------
# --model names only factories

@pytest.mark.parametrize("spec, problem", [
    ("sys:exit", "built-in function, not a model factory"),
    ("os:system", "built-in function, not a model factory"),
    ("builtins:print", "built-in function, not a model factory"),
    ("collections:OrderedDict", "is the class OrderedDict, not a torch.nn.Module"),
    ("neuslice.models:MODELS", "is a dict, not callable"),
    ("no_such_pkg_xyz:f", "cannot import module 'no_such_pkg_xyz'"),
    ("neuslice.models:", "expected 'package.module:factory'"),
])
def test_model_spec_must_name_a_factory(spec, problem, capsys, tmp_path):
    with pytest.raises(FactoryError, match=problem):
        resolve_factory(spec)
    torch.save(build("digits_mlp").state_dict(), tmp_path / "w.pt")
    assert main(["predict", "--model", spec, "--weights", str(tmp_path / "w.pt"), "--data", "digits:test",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert problem.split(" ")[0] in err and "Traceback" not in err


def test_factory_that_exits_raises_or_returns_no_module(marking, tmp_path, capsys):
    name, _, _ = marking
    with pytest.raises(FactoryError, match="the factory returned int, not a torch.nn.Module"):
        build_model(f"{name}:not_a_model")
    with pytest.raises(FactoryError, match="the factory raised SystemExit"):
        build_model(f"{name}:bye")
    with pytest.raises(FactoryError, match="the factory raised TypeError"):
        build_model(f"{name}:make", {"depth": 3})
    (tmp_path / "nsexit_mod.py").write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(FactoryError, match="cannot import module 'nsexit_mod' \\(SystemExit"):
        resolve_factory("nsexit_mod:f")
    torch.save(build("digits_mlp").state_dict(), tmp_path / "w.pt")
    for spec in (f"{name}:bye", "sys:exit"):   # exit 1 with a message, never a silent exit 0
        assert main(["predict", "--model", spec, "--weights", str(tmp_path / "w.pt"), "--data", "digits:test"]) == 1
        assert spec in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the command never hurts its user

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A digits_cnn state dict, its profile and slices, and an .npz data file."""
    d = tmp_path_factory.mktemp("trust")
    torch.save(build("digits_cnn", seed=0).state_dict(), d / "w.pt")
    x, y = load_data("digits:test").x[:60], load_data("digits:test").y[:60]
    np.savez(d / "d.npz", x=x.numpy(), y=y.numpy())
    assert main(["profile", "--model", "digits_cnn", "--weights", str(d / "w.pt"), "--data", str(d / "d.npz"),
                 "--classes", ",".join(map(str, range(10))), "--out", str(d / "p.safetensors"), "--quiet"]) == 0
    assert main(["slice", "--profile", str(d / "p.safetensors"), "--out", str(d / "s.safetensors"), "--quiet"]) == 0
    return d


def _digest(*paths):
    return [p.read_bytes() for p in paths]


def test_out_over_an_input_is_refused_before_work(made, tmp_path, capsys):
    d = made
    before = _digest(d / "w.pt", d / "p.safetensors", d / "s.safetensors", d / "d.npz")
    os.symlink(d / "p.safetensors", tmp_path / "link.safetensors")
    os.link(d / "d.npz", tmp_path / "hard.csv")
    model = ["--model", "digits_cnn", "--weights", str(d / "w.pt")]
    cases = [
        (["slice", "--profile", str(d / "p.safetensors"), "--out", str(d / "p.safetensors")], "--profile"),
        (["slice", "--profile", str(d / "p.safetensors"), "--out", str(tmp_path / "link.safetensors")], "--profile"),
        (["merge", str(d / "p.safetensors"), str(d / "p.safetensors"), "--out", str(d / "p.safetensors")],
         "the profile"),
        (["predict", *model, "--data", str(d / "d.npz"), "--out", str(d / "d.npz")], "--data"),
        (["predict", *model, "--data", str(d / "d.npz"), "--out", str(tmp_path / "hard.csv")], "--data"),
        (["predict", *model, "--data", str(d / "d.npz"), "--out", str(d / "w.pt")], "--weights"),
        (["profile", *model, "--data", "digits:test", "--out", str(d / "w.pt")], "--weights"),
        (["restructure", *model, "--slices", str(d / "s.safetensors"), "--keep", "3", "--input-shape", "1,8,8",
          "--out", str(d / "s.safetensors")], "--slices"),
        (["report", "--slices", str(d / "s.safetensors"), "--results", str(tmp_path / "summary.json"), "--out",
          str(tmp_path)], "--results"),
    ]
    (tmp_path / "summary.json").write_text("{}")
    for argv, option in cases:
        assert main(argv + ["--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert f"is the input {option}" in err and "choose another --out" in err, err
    assert _digest(d / "w.pt", d / "p.safetensors", d / "s.safetensors", d / "d.npz") == before
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_idx_labels_file_is_an_input_too(tmp_path, capsys):
    from test_datafiles import write_mnist
    ip, lp, _, _ = write_mnist(tmp_path / "mnist", n=6, h=8, w=8)
    torch.save(build("digits_cnn").state_dict(), tmp_path / "w.pt")
    raw = lp.read_bytes()
    assert main(["predict", "--model", "digits_cnn", "--weights", str(tmp_path / "w.pt"), "--data",
                 str(tmp_path / "mnist"), "--out", str(lp), "--quiet"]) == 2
    assert f"is the input --data {lp}" in capsys.readouterr().err and lp.read_bytes() == raw


def test_predict_writes_csv_atomically_and_refuses_non_regular_targets(made, tmp_path, capsys, monkeypatch):
    d = made
    argv = ["predict", "--model", "digits_cnn", "--weights", str(d / "w.pt"), "--data", str(d / "d.npz"), "--quiet"]
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert "exists and is not a regular file" in capsys.readouterr().err
    out = tmp_path / "pred.csv"
    out.write_text("old\n")
    from neuslice.cli import common

    def fail_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(common.os, "replace", fail_replace)
    assert main(argv + ["--out", str(out)]) == 1
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv"]
    monkeypatch.undo()
    old = os.umask(0o027)
    try:
        assert main(argv + ["--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.read_text().startswith("index,label,prediction\n") and len(out.read_text().splitlines()) == 61
    assert (out.stat().st_mode & 0o777) == 0o640 and sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv"]


@pytest.mark.parametrize("argv, what", [
    (["slice", "--profile", "P", "--theta", "2"], "argument --theta: must be a number in (0, 1]"),
    (["slice", "--profile", "P", "--metric", "foo"], "argument --metric: invalid choice: 'foo'"),
    (["slice", "--profile", "P", "--min-keep", "-1"], "argument --min-keep: must be an integer >= 0"),
    (["profile", "--weights", "W", "--data", "D", "--batch-size", "0"], "argument --batch-size: must be an integer"),
    (["profile", "--weights", "W", "--data", "D", "--threads", "-2"], "argument --threads: must be an integer >= 1"),
    (["profile", "--weights", "W", "--data", "D", "--metrics", "avg,foo"], "argument --metrics: must be a comma"),
    (["readapt", "--weights", "W", "--slices", "S", "--data", "D", "--lr", "nan"], "argument --lr: must be a finite"),
    (["restructure", "--weights", "W", "--slices", "S", "--keep", "1", "--compress", "1"], "argument --compress"),
    (["restructure", "--weights", "W", "--slices", "S", "--keep", "1", "--input-shape", "1,x"], "--input-shape"),
    (["demo", "--epochs", "0"], "argument --epochs: must be an integer >= 1"),
    (["nosuch"], "invalid choice"),
])
def test_argument_errors_exit_2_with_json(argv, what, capsys):
    assert main(argv) == 2
    assert what in capsys.readouterr().err
    assert main(argv + ["--json"]) == 2
    out = capsys.readouterr()
    assert what in json.loads(out.out)["error"] and json.loads(out.out)["exit_code"] == 2


def test_model_is_required_is_a_usage_error(made, capsys):
    assert main(["predict", "--weights", str(made / "w.pt"), "--data", "digits:test", "--json"]) == 2
    got = json.loads(capsys.readouterr().out)
    assert got["exit_code"] == 2 and "--model is required" in got["error"]


def test_no_traceback_without_debug(made, tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    argv = ["report", "--slices", str(made / "s.safetensors"), "--results", str(tmp_path / "list.json"),
            "--out", str(tmp_path / "rep")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "list.json: holds a JSON list, not the object" in err and "Traceback" not in err
    assert main(argv + ["--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert got == {"error": got["error"], "exit_code": 1} and "list.json" in got["error"]
    assert main(argv + ["--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(made, monkeypatch, capsys):
    from neuslice.cli import commands

    def broken(args):
        return 1 / 0
    monkeypatch.setattr(commands, "cmd_slice", broken)
    argv = ["slice", "--profile", str(made / "p.safetensors"), "--out", str(made / "x.safetensors")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: ZeroDivisionError: division by zero (--debug prints the traceback)" in err
    assert "Traceback" not in err
    assert main(argv + ["--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_predict_unknown_task_is_a_usage_error(tmp_path, capsys):
    pytest.importorskip("torch_pruning")
    from neuslice.maintain import TaskAwareModel  # noqa: F401
    from neuslice.io.modelfile import save_model as save
    from neuslice.engine.graph import discover
    net = build("digits_cnn")
    infos = list(discover(net).layers)
    keep = {i.name: torch.ones(i.n, dtype=torch.bool) for i in infos}
    save(tmp_path / "t.safetensors", TaskAwareModel(net, infos, keep, {"A": [0, 1], "B": [2]}, "B",
                                                     [str(k) for k in range(10)]), spec="digits_cnn")
    assert main(["predict", "--weights", str(tmp_path / "t.safetensors"), "--data", "digits:test", "--task", "C",
                 "--quiet"]) == 2
    assert "--task 'C': the model's tasks are ['A', 'B']" in capsys.readouterr().err


def test_huge_image_is_a_clear_error(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    (tmp_path / "a").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "a" / "0.png")
    Image.new("1", (4097, 4096)).save(tmp_path / "a" / "1.png")   # 1-bit: a small file, a huge image
    with pytest.raises(DataFileError, match=r"1.png: image is 4097x4096 \(WxH\), 16781312 pixels: more than"):
        load_data(str(tmp_path))
    torch.save(build("digits_cnn").state_dict(), tmp_path / "w.pt")
    assert main(["predict", "--model", "digits_cnn", "--weights", str(tmp_path / "w.pt"), "--data",
                 str(tmp_path), "--quiet"]) == 1
    assert "1.png: image is 4097x4096" in capsys.readouterr().err
