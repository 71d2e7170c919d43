"""trajinf bench (environment benchmark): metrics on constructed cases, the cell plan, resume,
option errors, and the quick run end to end through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from trajinf.bench.env_bench import BenchConfig, cell_key, plan_cells, read_cells
from trajinf.bench.metrics import bad_step_localization, lds, summarize_cells
from trajinf.data.trajectories import trajectory_from_messages
from trajinf.errors import TrajinfError


def test_lds_recovers_a_linear_datamodel_and_its_sign() -> None:
    rng = np.random.default_rng(0)
    subsets = rng.random((40, 30)) < 0.5
    effect = rng.normal(size=(30, 2))  # helpfulness of each item for each query
    losses = 5.0 - subsets.astype(float) @ effect  # helpful items lower the loss
    r, se, per = lds(subsets, losses, effect)
    assert r == pytest.approx(1.0) and len(per) == 2
    r_neg, _, _ = lds(subsets, losses, -effect)
    assert r_neg == pytest.approx(-1.0)
    r_one, _, _ = lds(subsets, losses[:, :1], effect[:, 0])  # [N] values: same for all queries
    assert r_one == pytest.approx(1.0)
    noise, _, _ = lds(subsets, losses, rng.normal(size=(30, 2)))
    assert abs(noise) < 0.6


def _traj(i: int, n_steps: int, meta: dict):
    msgs = [{"role": "user", "content": "go"}]
    for k in range(n_steps):
        msgs += [{"role": "assistant", "content": f"a{k}"}, {"role": "user", "content": "ok"}]
    t = trajectory_from_messages(msgs, id=f"t{i}", task_id=f"task{i}")
    t.meta.update(meta)
    return t


def test_bad_step_localization_finds_the_lowest_scored_step() -> None:
    pool = [_traj(0, 4, {"bad_step": 2}), _traj(1, 4, {"bad_step": 0}), _traj(2, 3, {})]
    rows = []
    for i, bad in ((0, 2), (1, 0)):
        for k in range(4):
            rows.append({"id": f"t{i}", "step": k, "score": -5.0 if k == bad else float(k)})
    rows += [{"id": "t2", "step": k, "score": 0.0} for k in range(3)]
    res = bad_step_localization(pool, pd.DataFrame(rows))
    assert res["n_trajectories"] == 2  # t2 names no bad step
    assert res["auroc_pooled"] == pytest.approx(1.0)
    assert res["one_bad_step_top1"] == 1.0 and res["one_bad_step_top1_chance"] == 0.25
    flipped = pd.DataFrame(rows).assign(score=lambda d: -d["score"])
    assert bad_step_localization(pool, flipped)["one_bad_step_top1"] == 0.0


def test_plan_cells_runs_full_once_and_budgets_only_where_asked() -> None:
    cfg = BenchConfig.full().with_options(env="twx", seeds=2)
    cells = plan_cells(cfg.plans[0], cfg)
    keys = {cell_key(c) for c in cells}
    assert len(keys) == len(cells)  # no duplicate cell
    full = [c for c in cells if c["method"] == "full" and c["scenario"] == "mixed"]
    assert {c["budget"] for c in full} == {1.0} and len(full) == 2
    inf = {c["budget"] for c in cells if c["method"] == "inf" and c["scenario"] == "mixed"}
    assert inf == {0.05, 0.1, 0.25}
    less = {c["budget"] for c in cells if c["method"] == "inf-less"}
    assert less == {0.1}


def test_read_cells_ignores_a_torn_last_line(tmp_path) -> None:
    p = tmp_path / "cells.jsonl"
    row = {"scenario": "mixed", "method": "inf", "budget": 0.1, "seed": 0, "success_rate": 0.5}
    p.write_text(json.dumps(row) + "\n" + '{"scenario": "mixed", "meth')
    done = read_cells(p)
    assert list(done) == ["mixed|inf|0.1|0"]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"env": "nope"}, "--env"),
        ({"scenarios": "mixed,bogus"}, "scenario"),
        ({"budgets": "0.1,2"}, "budgets"),
        ({"budgets": "a"}, "budgets"),
        ({"seeds": 0}, "seeds"),
    ],
)
def test_bad_options_raise_naming_the_option(kw, match) -> None:
    with pytest.raises(TrajinfError, match=match):
        BenchConfig.full().with_options(**kw)


def test_summaries_pair_seeds_against_random_and_full() -> None:
    cells = []
    for s in range(3):
        cells.append(
            {
                "scenario": "mixed",
                "method": "inf",
                "budget": 0.1,
                "seed": s,
                "success_rate": 0.5 + 0.1 * s,
                "step_agreement": 0.7,
            }
        )
        cells.append(
            {
                "scenario": "mixed",
                "method": "random",
                "budget": 0.1,
                "seed": s,
                "success_rate": 0.1 * s + (0.05 if s == 1 else 0.0),
                "step_agreement": 0.2,
            }
        )
        cells.append(
            {
                "scenario": "mixed",
                "method": "full",
                "budget": 1.0,
                "seed": s,
                "success_rate": 0.0,
                "step_agreement": 0.2,
            }
        )
    summ = summarize_cells(cells)
    inf = summ["mixed|inf|0.1"]
    assert inf["success_mean"] == pytest.approx(0.6)
    assert inf["paired"]["random"]["mean_diff"] == pytest.approx(0.5 - 0.05 / 3)
    assert inf["paired"]["random"]["p_value"] < 0.01
    assert inf["paired"]["full"]["mean_diff"] == pytest.approx(0.6)
    assert "random" not in summ["mixed|random|0.1"]["paired"]


@pytest.mark.slow
def test_quick_bench_through_the_cli_writes_results_and_resumes(tmp_path) -> None:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "trajinf", "bench", "--quick", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((out / "bench.json").read_text())
    env = res["envs"]["builtin"]
    # the flood has its own rounds driver (tests/test_bench_flood.py), output under OUT/flood
    assert set(env["scenarios"]) == {"mixed", "outcome", "early"}
    assert (out / "flood" / "flood.json").exists()
    assert env["scenarios"]["early"]["pool"].get("world_model", {}).get("n", 0) > 0
    assert len(res["cells"]) == len(read_cells(out / "builtin" / "cells.jsonl")) > 0
    mixed = env["scenarios"]["mixed"]["variants"]["inf"]
    assert mixed["bad_step"]["n_trajectories"] > 0 and mixed["cost_epochs"] > 0
    assert env["lds"]["n_models"] == 6 and "inf" in env["lds"]["methods"]
    assert "inf|0.2" not in env["summary"]  # keys are scenario|method|budget
    assert {"mixed|inf|0.2", "mixed|full|1", "outcome|inf-adv|0.2", "early|inf+allee|0.2"} <= set(
        env["summary"]
    )
    early = env["summary"]
    assert early["early|inf+allee|0.2"]["n_selected"] > early["early|inf-noee|0.2"]["n_selected"]
    weighted = [c for c in res["cells"] if c["method"] in ("inf+stepw", "inf*expert_aligned")]
    # step weighting acts: some negative-influence steps are zeroed in the exported selection
    assert weighted and sum(c["n_weighted_zero"] for c in weighted) > 0
    # The quick slice carries no quality threshold: every method's success is 0 (the tiny agent
    # never finishes a ToolWorld task) and, measured 2026-11-30, influence's top 20 % held 10 %
    # target-family trajectories against 43 % in the pool. The thresholds live in
    # tests/test_quality.py, on a harness where the answer is known.
    share = env["scenarios"]["mixed"]["variants"]["inf"]["target_share"]
    assert 0.0 <= share["top"] <= 1.0 and 0.0 < share["pool"] < 1.0
    html = (out / "bench.html").read_text()
    assert "<img" in html and "Linear datamodeling score" in html
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to run" in again.stderr + again.stdout  # every cell was kept from the first run


def test_cli_bench_bad_env_is_a_one_line_error(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "trajinf", "bench", "--env", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "--env" in run.stderr and "Traceback" not in run.stderr
