"""Combining step values, step weights, update-mask statistics, and selection with priors
(library and CLI)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from trajinf.cli.main import app
from trajinf.data.write import write_pool
from trajinf.envs import make_env
from trajinf.envs.policies import ExpertPolicy, NoisyExpertPolicy
from trajinf.envs.rollout import rollout
from trajinf.errors import TrajinfError
from trajinf.selection.priors import combine_steps, mask_stats, trajectory_prior, weights_from_steps
from trajinf.selection.select import select

NAN = float("nan")


def frame(ids, steps, values, col="value"):
    return pd.DataFrame({"id": ids, "step": steps, col: values})


def test_trajectory_prior_aggregates_and_skips_nan():
    s = frame(["a", "a", "a", "b", "c"], [0, 1, 2, 0, 0], [1.0, 3.0, NAN, -2.0, NAN])
    out = trajectory_prior(s).set_index("id")["value"]
    assert out["a"] == 2.0 and out["b"] == -2.0 and math.isnan(out["c"])
    assert trajectory_prior(s, "min").set_index("id")["value"]["a"] == 1.0
    assert math.isnan(trajectory_prior(s, "sum").set_index("id")["value"]["c"])
    with pytest.raises(TrajinfError, match="how"):
        trajectory_prior(s, "median")


def test_combine_rank_and_product():
    a = frame(["x"] * 3, [0, 1, 2], [1.0, 2.0, 3.0], col="score")  # influence step scores
    b = frame(["x"] * 3, [0, 1, 2], [3.0, 2.0, 1.0])
    r = combine_steps(a, b, how="rank").sort_values("step")["value"].to_numpy()
    np.testing.assert_allclose(r, [1 / 6, 1 / 6, 1 / 6])  # mean of (1/3, 1) etc., minus .5
    b2 = frame(["x"] * 3, [0, 1, 2], [NAN, 1.0, 2.0])
    r2 = combine_steps(a, b2, how="rank").sort_values("step")["value"].to_numpy()
    np.testing.assert_allclose(r2, [1 / 3 - 0.5, (2 / 3 + 0.5) / 2 - 0.5, 0.5])
    # product: z of (0, 1, 2) is (-c, 0, c) with c = sqrt(1.5); u = z + c; value = u u - c c
    p = combine_steps(frame(["x"] * 3, [0, 1, 2], [0.0, 1.0, 2.0]),
                      frame(["x"] * 3, [0, 1, 2], [0.0, 1.0, 2.0]), how="product")  # fmt: skip
    c = math.sqrt(1.5)
    np.testing.assert_allclose(p.sort_values("step")["value"], [-c * c, 0.0, 3 * c * c])
    both_nan = combine_steps(frame(["y"], [0], [NAN]), frame(["y"], [0], [NAN]), how="product")
    assert math.isnan(both_nan["value"].iloc[0])
    with pytest.raises(TrajinfError, match="how"):
        combine_steps(a, b, how="sum")


def test_weights_binary_soft_and_nan():
    signed = frame(["a", "a", "a", "b"], [0, 1, 2, 0], [0.5, -0.1, NAN, 2.0])
    assert weights_from_steps(signed, ["a", "b"]) == {"a": [1.0, 0.0, 1.0], "b": [1.0]}
    nonneg = frame(["a", "a", "a"], [0, 1, 2], [1.0, 0.0, 0.5])  # lowest gets 0
    assert weights_from_steps(nonneg, ["a"]) == {"a": [1.0, 0.0, 1.0]}
    flat = frame(["a", "a"], [0, 1], [1.0, 1.0])
    assert weights_from_steps(flat, ["a"]) == {"a": [1.0, 1.0]}
    assert weights_from_steps(nonneg, ["a"], threshold=0.75) == {"a": [1.0, 0.0, 0.0]}
    soft = weights_from_steps(signed, ["a", "b"], mode="soft")
    np.testing.assert_allclose(soft["a"], [0.6 / 2.1, 0.0, 1.0])
    padded = weights_from_steps(signed, ["a", "z"], n_steps={"a": 5, "z": 2})
    assert padded == {"a": [1.0, 0.0, 1.0, 1.0, 1.0], "z": [1.0, 1.0]}
    with pytest.raises(TrajinfError, match="mode"):
        weights_from_steps(signed, ["a"], mode="hard")


def test_mask_stats_overlap_and_chance():
    a = {
        "w": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool),
        "b": torch.zeros(2).bool(),
    }
    b = {
        "w": torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool),
        "x": torch.ones(3).bool(),
    }
    s = mask_stats(a, b)  # only "w" is shared: 8 params, |A| = |B| = 2, |A & B| = 1
    assert s["n_params"] == 8 and s["density_a"] == 0.25 and s["sparsity_b"] == 0.75
    assert s["jaccard"] == pytest.approx(1 / 3) and s["overlap_a"] == 0.5
    chance = 0.25 * 0.25 / (0.5 - 0.0625)
    assert s["chance_jaccard"] == pytest.approx(chance)
    assert s["jaccard_vs_chance"] == pytest.approx((1 / 3) / chance)
    with pytest.raises(TrajinfError, match="share no parameter"):
        mask_stats({"p": torch.ones(1).bool()}, {"q": torch.ones(1).bool()})


@pytest.fixture(scope="module")
def scored_dir(tmp_path_factory):
    """A ToolWorld pool with fake influence scores (no model needed for selection)."""
    d = tmp_path_factory.mktemp("prior-select")
    env = make_env("toolworld")
    tasks = env.tasks("train", 6, 0)
    pool = rollout(env, tasks, ExpertPolicy(), source="expert", with_tools=False) + rollout(
        env, tasks, NoisyExpertPolicy(0.7), source="noisy", with_tools=False
    )
    write_pool(pool, d / "pool.jsonl")
    rng = np.random.default_rng(0)
    rows = [(t.id, k, float(rng.normal())) for t in pool for k in range(len(t.steps()))]
    steps = pd.DataFrame(rows, columns=["id", "step", "score"])
    scores = steps.groupby("id", sort=False)["score"].sum().reset_index()
    scores["harmful"] = False
    (d / "scores").mkdir()
    scores.to_parquet(d / "scores" / "scores.parquet")
    steps.to_parquet(d / "scores" / "step_scores.parquet")
    return d, pool


def test_select_with_step_values_and_prior_method(scored_dir):
    _, pool = scored_dir
    values = frame([t.id for t in pool], [0] * len(pool), [float(i) for i in range(len(pool))])
    sel = select("prior", pool, fraction=0.25, step_values=values, step_weights=True)
    assert sel.ids == [t.id for t in pool[::-1][: len(sel.ids)]]  # highest prior first
    assert all(len(sel.step_weights[i]) == len(t.steps()) for t in pool if (i := t.id) in sel.ids)
    with pytest.raises(TrajinfError, match="step_values"):
        select("prior", pool, fraction=0.25)


def _weights(path):
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[r["id"]] = [m["weight"] for m in r["messages"] if m["role"] == "assistant"]
    return out


def test_cli_select_with_prior_and_combination(scored_dir, tmp_path):
    d, pool = scored_dir
    out = tmp_path / "sel.jsonl"
    args = ["select", "--scores", str(d / "scores"), "--pool", str(d / "pool.jsonl"),
            "--fraction", "0.5", "--step-weights", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(
        app, [*args, "--method", "prior", "--prior", "expert_aligned", "--env", "toolworld"]
    )
    assert res.exit_code == 0, res.output
    w = _weights(out)
    assert len(w) == 6
    noisy_off = {t.id: set(t.meta.get("noisy_steps", [])) for t in pool}
    for i, ws in w.items():  # 0 exactly where the noisy policy left the expert's action
        assert {k for k, x in enumerate(ws) if x == 0.0} == noisy_off[i]
    assert all(i.startswith("expert") or not noisy_off[i] for i in w)  # agreement ranks first
    res = CliRunner().invoke(
        app, [*args, "--method", "influence", "--prior", "branch", "--combine", "rank"]
    )
    assert res.exit_code == 0, res.output
    assert all(set(ws) <= {0.0, 1.0} for ws in _weights(out).values())
    res = CliRunner().invoke(app, [*args, "--combine", "rank"])
    assert isinstance(res.exception, TrajinfError) and "--prior" in str(res.exception)
