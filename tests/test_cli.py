"""The `neuslice` command through its real entry points."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from neuslice.cli import main


def test_demo_runs_end_to_end_and_writes_its_report(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "rep"), "--epochs", "3", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    on_disk = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary == on_disk
    assert (tmp_path / "rep" / "profile.safetensors").stat().st_size > 0
    assert (tmp_path / "rep" / "slices.safetensors").stat().st_size > 0
    assert summary["test_accuracy"] > 0.5
    assert {r["layer"] for r in summary["layers"]} == {"features.0", "features.4"}
    for r in summary["pairs"]:
        assert 0.0 < r["compression_rate"] < 1.0 and 0.0 <= r["masked_accuracy"] <= 1.0
    # every class appears in exactly one semantic group
    assert sorted(c for g in summary["groups"] for c in g) == list(range(10))


def test_demo_bad_theta_is_an_error_with_exit_1(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--epochs", "1", "--theta", "1.5", "--quiet"])
    assert rc == 1
    assert "theta" in capsys.readouterr().err


def test_usage_error_exits_2():
    out = subprocess.run([sys.executable, "-m", "neuslice", "nosuchcommand"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["info", "--help"]])
def test_help(argv):
    out = subprocess.run([sys.executable, "-m", "neuslice", *argv], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: neuslice" in out.stdout


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"] is None and "cpu" in info["order"]
