"""The HTML report: figures exist and are valid PNGs, summary.json matches, curves make sense."""
from __future__ import annotations

import json

import pytest
import torch

import neuslice
from neuslice.cli import report
from neuslice.io.modelfile import save_model
from neuslice.io.digits import digits_loaders
from neuslice.models import build, fit
from helpers import check_page


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run():
    train, test = digits_loaders(seed=0)
    model = fit(build("digits_cnn", seed=0), train, epochs=3)
    prof = neuslice.profile(model, train, 10, progress=False)
    return model, prof, neuslice.semantic_slice(prof, "taylor", 0.9), test


def test_curves_cover_three_modes_and_trade_accuracy_for_compression(run):
    model, prof, slices, test = run
    curves = report.accuracy_curves(model, prof, test, "taylor", [[0, 1], [3, 8]], thetas=(0.5, 0.99),
                                    ratios=(0.1, 0.9))
    assert set(curves) == {"global", "category", "semantic"}
    for pts in curves.values():
        assert len(pts) == 2 and all(0 <= p["accuracy"] <= 1 and 0 < p["compression_rate"] < 1 for p in pts)
        # keeping more neurons (larger ratio or theta) removes fewer parameters
        assert pts[0]["compression_rate"] > pts[1]["compression_rate"]
    assert curves["semantic"][1]["accuracy"] > 0.9


def test_report_page_figures_and_summary(run, tmp_path):
    model, prof, slices, test = run
    curves = report.accuracy_curves(model, prof, test, "taylor", report.default_subsets(slices), thetas=(0.9,),
                                    ratios=(0.5,))
    maint = {"restructure": {"classes": ["3", "8"], "compression_rate": 0.5, "accuracy_original": 1.0,
                             "accuracy_restructured": 0.99, "accuracy_finetuned": None, "original_params": 6138},
             "incremental": {"theta": 0.7, "task_a_acc_before": 0.99, "task_a_acc_after": 0.98,
                             "task_b_acc_before": None, "task_b_acc_after": 0.95}}
    index = report.write_report(tmp_path / "rep", slices=slices, curves=curves, maintenance=maint,
                                summary={"model": "digits_cnn", **report.slices_summary(slices)})
    images = check_page(tmp_path / "rep")
    assert images == report.figures_of(index)
    assert images == ["critical_neurons.png", "class_similarity.png", "accuracy_vs_compression.png",
                      "maintenance.png"]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["figures"] == images and summary["maintenance"] == maint and summary["curves"] == curves
    assert sorted(c for g in summary["groups"] for c in g) == [str(k) for k in range(10)]
    page = index.read_text()
    assert "features.4" in page and "task_a_acc_after" in page


def test_report_without_curves_or_maintenance_has_two_figures(run, tmp_path):
    _, prof, _, _ = run
    gslices = neuslice.global_slice(prof, "avg", 0.3)
    index = report.write_report(tmp_path, slices=gslices)
    assert check_page(tmp_path) == ["critical_neurons.png", "class_similarity.png"]
    assert json.loads((tmp_path / "summary.json").read_text())["curves"] is None
    assert index.name == "index.html"


def test_load_results_from_model_files_and_json(run, tmp_path):
    model = run[0]
    save_model(tmp_path / "r.safetensors", model, spec="digits_cnn",
               report={"readapt": {"new_acc_after": 0.9, "trainable_fraction": 0.5}})
    (tmp_path / "inc.json").write_text(json.dumps({"model": "x", "task_a_acc_after": 0.9}))
    got = report.load_results([tmp_path / "r.safetensors", tmp_path / "inc.json"])
    assert got == {"readapt": {"new_acc_after": 0.9, "trainable_fraction": 0.5},
                   "incremental": {"model": "x", "task_a_acc_after": 0.9}}
    save_model(tmp_path / "plain.safetensors", model, spec="digits_cnn")
    with pytest.raises(ValueError, match="not a model file written by neuslice restructure"):
        report.load_results([tmp_path / "plain.safetensors"])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no restructure, readapt or incremental result"):
        report.load_results([tmp_path / "other.json"])


def test_make_slices_modes_and_bad_mode(run):
    prof = run[1]
    assert report.make_slices(prof, "category", None, 0.25).mode == "category"
    with pytest.raises(ValueError, match="mode must be one of"):
        report.make_slices(prof, "bogus", None, 0.5)
    assert torch.equal(report.make_slices(prof, "semantic", "taylor", 0.9).critical_sets["features.0"],
                       run[2].critical_sets["features.0"])
