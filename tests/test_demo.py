"""The main job's quick path, run exactly as a user runs it (the CLI, a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "trajinf", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    methods = res["methods"]
    assert {"influence", "random", "full", "success", "rds"} <= set(methods)
    for r in methods.values():
        assert len(r["per_seed"]) == res["seeds"] == 2
        assert all(0.0 <= x <= 1.0 for x in r["per_seed"])
        assert abs(r["success_rate_mean"] - sum(r["per_seed"]) / 2) < 1e-9
        assert 0.0 <= r["step_agreement_mean"] <= 1.0
    n_pool = sum(v["n"] for v in res["pool"].values())
    assert methods["full"]["n_selected"] == n_pool
    assert methods["random"]["n_selected"] == methods["influence"]["n_selected"] < n_pool
    assert res["harmful_detection"]["n_planted"] > 0
    assert "auroc_low_score" in res["harmful_detection"]
    assert res["runtime_s"]["total_s"] > 0
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 4
    assert "influence" in proc.stdout  # the final table is printed
