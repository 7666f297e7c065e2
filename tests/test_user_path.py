"""The user's path through the command: data that cannot be silently wrong, outputs that say what they mean,
feedback during long steps (issue "The user's path")."""
from __future__ import annotations

import io
import json
import sys
import warnings

import numpy as np
import pytest
import torch

from neuslice.cli import main
from neuslice.engine.slices import Slices
from neuslice.io.data import load_data
from neuslice.io.digits import load_digits
from neuslice.maintain import finetune, incremental, restructure
from neuslice.models import build

pytestmark = pytest.mark.usefixtures("one_thread")

A, B = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
TEN = ",".join(str(k) for k in range(10))


class _Tty(io.StringIO):
    def isatty(self):
        return True


def run_json(argv, capsys):
    rc = main(argv + ["--json", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out), out.err


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """An untrained digits_cnn (the numbers do not matter here), its profile and slices on task A, digits as
    npz in several shapes and scales."""
    d = tmp_path_factory.mktemp("userpath")
    torch.save(build("digits_cnn", seed=0).state_dict(), d / "model.pt")
    x, y = load_digits("test")
    np.savez(d / "hw.npz", x=x[:, 0].numpy(), y=y.numpy())               # [N, H, W]
    np.savez(d / "rgb.npz", x=x.repeat(1, 3, 1, 1).numpy(), y=y.numpy())   # 3 channels: digits_cnn takes 1
    np.savez(d / "raw.npz", x=(x * 255).numpy(), y=y.numpy())               # float, not scaled
    np.savez(d / "std.npz", x=((x - 0.5) / 0.25).numpy(), y=y.numpy())      # float, standardised by hand
    import neuslice
    a = torch.isin(y, torch.tensor(A))
    prof = neuslice.profile(build("digits_cnn", seed=0), [(x[a], y[a])], 10, progress=False)
    prof.save(d / "pa.safetensors")
    neuslice.semantic_slice(prof, "taylor", 0.7, classes=A).save(d / "sa.safetensors")
    return d


def _common(d):
    return ["--model", "digits_cnn", "--weights", str(d / "model.pt")]


# ---------------------------------------------------------------------------------------------
# 1. data that cannot be silently wrong

def test_npz_without_channel_axis_is_read_as_grey_images(d, capsys):
    ds = load_data(str(d / "hw.npz"))
    assert ds.x.shape == (450, 1, 8, 8) and "[N, 1, H, W]" in ds.notes[0]
    rc = main(["predict", *_common(d), "--data", str(d / "hw.npz")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "note:" in out.err and "read as grey images [450, 1, 8, 8]" in out.err


def test_inputs_the_model_cannot_take_are_a_clear_error(d, capsys):
    rc = main(["predict", *_common(d), "--data", str(d / "rgb.npz")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "rgb.npz: the model cannot take these inputs: one sample is [3, 8, 8]" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_unscaled_float_inputs_warn(d, capsys):
    from neuslice.io.data import UnscaledDataWarning
    with pytest.warns(UnscaledDataWarning, match=r"values in \[0, 255\]"):
        load_data(str(d / "raw.npz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_data(str(d / "std.npz"))       # standardised: no warning
        load_data("digits:test")            # in [0, 1]: no warning
    _, err = run_json(["predict", *_common(d), "--data", str(d / "raw.npz")], capsys)
    assert "warning:" in err and "look unscaled" in err and "--normalize" in err   # even with --quiet


def test_normalize_option_and_python_equivalent(d, capsys):
    raw = load_data("digits:test")
    ds = load_data("digits:test", normalize=(0.5, 0.25))
    assert torch.allclose(ds.x, (raw.x - 0.5) / 0.25)
    assert torch.equal(raw.normalize([0.5], [0.25]).x, ds.x)
    with pytest.raises(ValueError, match="3 values; the data has 1 channel"):
        raw.normalize([0.1, 0.2, 0.3], [1, 1, 1])
    got, err = run_json(["predict", *_common(d), "--data", "digits:test", "--normalize", "0.5,0.25"], capsys)
    ref, _ = run_json(["predict", *_common(d), "--data", str(d / "std.npz")], capsys)
    assert got["accuracy"] == ref["accuracy"] and "unscaled" not in err
    rgb = load_data(str(d / "rgb.npz"), normalize=([0.1, 0.2, 0.3], [0.5, 0.5, 0.5]))
    assert torch.allclose(rgb.x[:, 2], (load_data(str(d / "rgb.npz")).x[:, 2] - 0.3) / 0.5)
    for bad in ("0.5", "a,b", "0.5,0"):
        assert main(["predict", *_common(d), "--data", "digits:test", "--normalize", bad]) == 2
        assert "--normalize" in capsys.readouterr().err


def test_data_classes_takes_a_class_subset_keeping_class_ids(d, tmp_path, capsys):
    _, y = load_digits("test")
    n = int(((y == 3) | (y == 8)).sum())
    got, _ = run_json(["predict", *_common(d), "--data", "digits:test", "--data-classes", "3,8",
                       "--out", str(tmp_path / "p.csv")], capsys)
    assert got["samples"] == n
    labels = {int(line.split(",")[1]) for line in (tmp_path / "p.csv").read_text().splitlines()[1:]}
    assert labels == {3, 8}
    named, _ = run_json(["predict", *_common(d), "--data", "digits:test", "--classes", "zero,one,two,three,four,"
                         "five,six,seven,eight,nine", "--data-classes", "three,eight"], capsys)
    assert named["samples"] == n
    assert main(["predict", *_common(d), "--data", "digits:test", "--data-classes", "cat"]) == 2


# ---------------------------------------------------------------------------------------------
# 2. outputs that say what they mean

@pytest.fixture(scope="module")
def inc(d):
    out = d / "inc.safetensors"
    assert main(["incremental", *_common(d), "--slices", str(d / "sa.safetensors"), "--data", "digits:test",
                 "--data-classes", "5,6,7,8,9", "--new-classes", "5,6,7,8,9", "--epochs", "1",
                 "--objective", "joint", "--optimizer", "sgd", "--lr", "0.01", "--out", str(out), "--quiet"]) == 0
    return out


def test_predict_task_aware_without_task_reports_each_task_and_the_inferred_one(inc, capsys):
    got, _ = run_json(["predict", "--weights", str(inc), "--data", "digits:test"], capsys)
    assert set(got["accuracy_by_task"]) == {"A", "B"} and got["accuracy_of"].startswith("task-inferred")
    a, _ = run_json(["predict", "--weights", str(inc), "--data", "digits:test", "--task", "A"], capsys)
    assert got["accuracy_by_task"]["A"] == a["accuracy"] and a["classes"] == A
    assert a["samples"] == 450 and a["accuracy_samples"] < 450 and "note" in a
    assert main(["predict", "--weights", str(inc), "--data", "digits:test", "--task", "C"]) == 2
    assert "the model's tasks are ['A', 'B']" in capsys.readouterr().err


def test_task_on_a_model_without_tasks_is_refused(d, capsys):
    assert main(["predict", *_common(d), "--data", "digits:test", "--task", "A"]) == 2
    assert "this model has no tasks" in capsys.readouterr().err


def test_incremental_names_original_slice_and_after(d):
    from neuslice.cli.report import maintenance_bars
    model = build("digits_cnn", seed=0)
    model.load_state_dict(torch.load(d / "model.pt", weights_only=True))
    x, y = load_digits("test")
    a = torch.isin(y, torch.tensor(A))
    b = ~a
    data = [(x[b], y[b])]
    _, rep = incremental(model, Slices.load(d / "sa.safetensors"), data, new_classes=B, epochs=1,
                         eval_data=[(x[a], y[a])])
    assert rep.task_a_acc_slice is not None and rep.task_a_acc_slice == rep.task_a_acc_after
    title, labels, series = maintenance_bars("incremental", rep.as_dict())
    assert list(series) == ["original model", "task-A slice", "after learning B"]
    assert series["task-A slice"][0] == rep.task_a_acc_slice and series["original model"][0] == rep.task_a_acc_before


def test_report_bars_show_restructured_and_finetuned_apart():
    from neuslice.cli.report import maintenance_bars
    r = {"classes": ["3", "8"], "compression_rate": 0.5, "accuracy_original": 0.99, "accuracy_restructured": 0.6,
         "accuracy_finetuned": 0.95}
    _, _, series = maintenance_bars("restructure", r)
    assert series["restructured"][1] == 0.6 and series["fine-tuned"][1] == 0.95
    _, _, series = maintenance_bars("restructure", {**r, "accuracy_finetuned": None})
    assert list(series) == ["original", "restructured"]


# ---------------------------------------------------------------------------------------------
# 3. feedback

def test_training_steps_reach_a_callback():
    from neuslice.maintain import TrainStep, on_train_step
    x, y = load_digits("test")
    keep = (y == 3) | (y == 8)
    model, _ = restructure(build("digits_cnn", seed=0), _slices_all(), [3, 8], mode="mask")
    seen = []
    with on_train_step(seen.append):
        finetune(model, [(x[keep][:32], y[keep][:32]), (x[keep][32:64], y[keep][32:64])], epochs=2)
    assert [(s.epoch, s.epochs, s.step, s.steps) for s in seen] == [(1, 2, 1, 2), (1, 2, 2, 2), (2, 2, 1, 2),
                                                                     (2, 2, 2, 2)]
    assert all(isinstance(s, TrainStep) and s.loss > 0 for s in seen)


def _slices_all():
    import neuslice
    x, y = load_digits("test")
    model = build("digits_cnn", seed=0)
    prof = neuslice.profile(model, [(x, y)], 10, progress=False)
    return neuslice.semantic_slice(prof, "taylor", 0.9)


def test_training_bars_show_label_check_epoch_and_loss(d, monkeypatch, capsys):
    import neuslice
    x, y = load_digits("test")
    model = build("digits_cnn", seed=0)
    model.load_state_dict(torch.load(d / "model.pt", weights_only=True))
    neuslice.semantic_slice(neuslice.profile(model, [(x, y)], 10, progress=False), "taylor", 0.9).save(
        d / "s_all.safetensors")
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["restructure", *_common(d), "--slices", str(d / "s_all.safetensors"), "--keep", "3,8", "--mode",
                 "mask", "--data", "digits:test", "--finetune-epochs", "2", "--out", str(d / "r.safetensors")]) == 0
    err = tty.getvalue()
    assert "check labels" in err and "finetune epoch 1/2 loss " in err and "finetune epoch 2/2 loss " in err
    lines = [ln.split("\r")[-1] for ln in err.split("\n") if ln]
    assert not any(ln.startswith("finetune ") and "epoch" not in ln for ln in lines)


def test_report_curves_have_a_bar_of_their_own(d, monkeypatch, tmp_path):
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["report", "--profile", str(d / "pa.safetensors"), *_common(d), "--test-data", "digits:test",
                 "--out", str(tmp_path / "rep")]) == 0
    assert "curves" in tty.getvalue() and "18/18" in tty.getvalue()
