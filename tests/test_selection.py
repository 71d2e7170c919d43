"""Harmful flags against a random-direction null; selection methods; filters."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from trajinf.data.schema import Trajectory
from trajinf.errors import TrajinfError
from trajinf.scoring.directions import prepare_directions, target_directions
from trajinf.scoring.harm import harmful_flags, null_scores
from trajinf.scoring.scores import ScoreResult, score_stores, score_tables
from trajinf.scoring.source import PoolSource, ScoreConfig
from trajinf.selection.select import near_duplicate_filter, select, zero_variance_filter
from trajinf.store.feature_store import FeatureStore

D = 32


def noise_pool(n: int, seed: int, n_steps: int = 3):
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((n * n_steps, D)).astype(np.float32)
    owner = np.repeat(np.arange(n), n_steps)
    return steps, owner


def scored(steps, owner, target, cfg=None, n_null=32, seed=0):
    cfg = cfg or ScoreConfig()
    traj = np.zeros((owner.max() + 1, D), np.float32)
    np.add.at(traj, owner, steps)
    pool = PoolSource.from_arrays(traj, steps=steps, step_owner=owner)
    dirs = prepare_directions(pool, target_directions(target, cfg), cfg)
    return score_tables(pool, dirs, cfg), null_scores(
        pool, dirs, cfg, n_directions=n_null, seed=seed
    )


def test_planted_bad_step_is_flagged():
    rng = np.random.default_rng(0)
    u = rng.standard_normal(D).astype(np.float32)
    u /= np.linalg.norm(u)
    target = u + 0.1 * rng.standard_normal((8, D)).astype(np.float32)
    steps, owner = noise_pool(300, seed=1)
    # plausible trajectory: two helpful steps, one strongly harmful one, positive in total
    steps[:3] = np.stack([5 * u, 5 * u, -8 * u]) + 0.3 * rng.standard_normal((3, D))
    res, null = scored(steps, owner, target)
    assert res.trajectories["score"].iloc[0] > 0
    flags, info = harmful_flags(res, null, alpha=0.05)
    assert flags["harmful"].iloc[0] and "step" in flags["reason"].iloc[0]
    assert flags["harmful"].iloc[1:].mean() < 0.10  # clean items mostly not flagged
    assert 0 < info["fpr_estimate"] <= 0.05
    assert info["step_threshold"] < 0 and info["score_threshold"] < 0


@pytest.mark.parametrize("joint", [True, False])
def test_false_positive_rate_on_pure_noise(joint):
    steps, owner = noise_pool(600, seed=2)
    target = np.random.default_rng(3).standard_normal((4, D)).astype(np.float32)
    res, null = scored(steps, owner, target, n_null=32, seed=4)
    assert len(null.trajectories) == 600 * 32
    flags, info = harmful_flags(res, null, alpha=0.05, joint=joint)
    lo, hi = (0.035, 0.05) if joint else (0.05, 0.10)
    assert lo <= info["fpr_estimate"] <= hi + 1e-9
    assert abs(flags["harmful"].mean() - info["fpr_estimate"]) < 0.04  # the estimate holds


def test_null_from_stores(tmp_path):
    steps, owner = noise_pool(10, seed=5, n_steps=2)
    stores = []
    for name, feats, own in [("p", steps, owner), ("t", steps[:6], None)]:
        fs = FeatureStore.create(tmp_path / name, fingerprint={}, dim=D,
                                 checkpoints=[{"path": "c", "lr": 0.1}])  # fmt: skip
        if own is None:
            df = pd.DataFrame({"id": [f"x{i}" for i in range(6)], "step": -1})
            fs.write_shard(0, 0, df, feats)
        else:
            traj = np.zeros((10, D), np.float32)
            np.add.at(traj, own, feats)
            rows, f = [], []
            for i in range(10):
                rows.append({"id": f"p{i}", "step": -1})
                f.append(traj[i])
                for k in np.nonzero(own == i)[0]:
                    rows.append({"id": f"p{i}", "step": len(rows) % 3})
                    f.append(feats[k])
            fs.write_shard(0, 0, pd.DataFrame(rows), np.stack(f))
        stores.append(fs)
    cfg = ScoreConfig(remove_mean=True)
    null = null_scores(stores[0], stores[1], cfg, n_directions=5, seed=1)
    assert len(null.trajectories) == 50 and null.trajectories["score"].notna().all()
    again = null_scores(stores[0], stores[1], cfg, n_directions=5, seed=1)
    pd.testing.assert_frame_equal(null.trajectories, again.trajectories)
    flags, _ = harmful_flags(score_stores(stores[0], stores[1], cfg), null)
    assert len(flags) == 10


def pool_table(n=20):
    return pd.DataFrame(
        {
            "id": [f"t{i}" for i in range(n)],
            "task_id": [f"g{i // 4}" for i in range(n)],
            "success": [i % 3 == 0 for i in range(n)],
            "n_action_tokens": [(i * 7) % 11 for i in range(n)],
        }
    )


def result_for(pool: pd.DataFrame) -> ScoreResult:
    n = len(pool)
    score = np.linspace(-1, 1, n)[::-1].copy()
    score[5] = np.nan  # non-finite item: never selected by influence
    traj = pd.DataFrame(
        {"id": pool["id"], "score": score, "harmful": [i in (0, 2) for i in range(n)]}
    )
    steps = pd.DataFrame(
        {
            "id": np.repeat(pool["id"], 3),
            "step": np.tile([0, 1, 2], n),
            "score": np.tile([0.5, -0.1, 0.2], n),
        }
    )
    return ScoreResult(traj, steps)


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("method", ["influence", "random", "rds", "loss", "gradnorm", "length"])
def test_budget(method, fraction):
    pool = pool_table()
    stats = pd.DataFrame({"id": pool["id"], "rds": np.arange(20.0), "loss": np.arange(20.0)[::-1],
                          "grad_norm": np.arange(20.0) % 5})  # fmt: skip
    sel = select(method, pool, fraction=fraction, scores=result_for(pool), statistics=stats)
    k = math.ceil(fraction * 20)
    expect = k if method != "influence" else min(k, 19)  # one NaN score
    assert len(sel.ids) == expect == sel.info["n_selected"] and len(set(sel.ids)) == expect


def test_orderings():
    pool = pool_table()
    res = result_for(pool)
    sel = select("influence", pool, fraction=0.25, scores=res)
    assert sel.ids == ["t0", "t1", "t2", "t3", "t4"]
    sel = select("influence", pool, fraction=0.25, scores=res, drop_harmful=True)
    assert sel.ids == ["t1", "t3", "t4", "t6", "t7"] and sel.info["dropped_harmful"] == 2
    stats = pd.DataFrame({"id": pool["id"], "loss": np.arange(20.0), "rds": -np.arange(20.0)})
    assert select("loss", pool, fraction=0.1, statistics=stats).ids == ["t19", "t18"]
    assert select("rds", pool, fraction=0.1, statistics=stats).ids == ["t0", "t1"]
    # length falls back to the pool table's action-token counts; ties keep pool order
    assert select("length", pool, fraction=0.15).ids == ["t3", "t14", "t6"]
    full = select("full", pool, fraction=0.1)
    assert full.ids == pool["id"].tolist()


def test_success_random_and_step_weights():
    pool = pool_table()
    succ = set(pool.loc[pool["success"], "id"])  # 7 successes
    sel = select("success", pool, fraction=0.1, seed=1)
    assert len(sel.ids) == 2 and set(sel.ids) <= succ and sel.info["budget_met"]
    sel = select("success", pool, fraction=0.5)
    assert set(sel.ids) == succ and not sel.info["budget_met"]
    a = select("random", pool, fraction=0.5, seed=3).ids
    assert (
        a
        == select("random", pool, fraction=0.5, seed=3).ids
        != select("random", pool, fraction=0.5, seed=4).ids
    )
    res = result_for(pool)
    sel = select("influence", pool, fraction=0.1, scores=res.trajectories, step_scores=res.steps,
                 step_weights=True)  # fmt: skip
    assert sel.step_weights == {"t0": [1.0, 0.0, 1.0], "t1": [1.0, 0.0, 1.0]}


def test_select_accepts_trajectories_and_errors():
    trajs = [Trajectory(id=f"t{i}", messages=[], success=i % 2 == 0) for i in range(6)]
    assert select("success", trajs, fraction=1.0).ids == ["t0", "t2", "t4"]
    with pytest.raises(TrajinfError, match="method"):
        select("best", trajs, fraction=0.5)
    with pytest.raises(TrajinfError, match="fraction"):
        select("random", trajs, fraction=0)
    with pytest.raises(TrajinfError, match="harmful"):
        select("random", trajs, fraction=0.5, drop_harmful=True)
    with pytest.raises(TrajinfError, match="grad_norm"):
        select("gradnorm", trajs, fraction=0.5)


def test_zero_variance_filter():
    pool = pd.DataFrame(
        {
            "id": list("abcdefghij"),
            "task_id": ["g0", "g0", "g1", "g1", "g2", "g3", "g3", "g3", "g4", "g4"],
            "success": [True, True, True, False, True, False, False, False, True, None],
        }
    )
    kept, info = zero_variance_filter(pool)
    assert kept["id"].tolist() == ["c", "d", "e", "i", "j"]
    assert info == {"groups_removed": 2, "trajectories_removed": 5}
    # a reward column overrides success
    kept, info = zero_variance_filter(pool.assign(reward=[1.0, 0.5] + [0.0] * 6 + [None, None]))
    assert "a" in kept["id"].tolist() and info["groups_removed"] == 2  # g1 (0, 0) and g3


def test_near_duplicate_filter():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 16)).astype(np.float32)
    x = np.concatenate([base, base[:2] * 3 + 1e-3 * rng.standard_normal((2, 16))])  # 4, 5 dup 0, 1
    assert near_duplicate_filter(x).tolist() == [0, 1, 2, 3]
    scores = np.array([0, 0, 0, 0, 1.0, -1.0])
    assert near_duplicate_filter(x, scores=scores, block=2).tolist() == [1, 2, 3, 4]
    assert near_duplicate_filter(x, threshold=1.01).tolist() == list(range(6))


def test_prior_registry_is_the_one_table():
    """step_prior's names and options, and the CLI's --prior choices, come from PRIORS; each
    registered option is a keyword of the function behind it."""
    import inspect

    from typer.testing import CliRunner

    from trajinf.cli.main import app
    from trajinf.selection.priors import PRIORS, step_prior
    from trajinf.selection.priors.groups import branch_values, variance_values
    from trajinf.selection.priors.replay import expert_values, tool_call_values

    behind = {"branch": branch_values, "group_variance": variance_values,
              "expert_aligned": expert_values, "tool_call": tool_call_values}  # fmt: skip
    assert set(PRIORS) == set(behind)
    renamed = {"similarity": "similarity_mode"}
    for name, prior in PRIORS.items():
        params = inspect.signature(behind[name]).parameters
        assert all(renamed.get(o, o) in params for o in prior.options), name
        assert prior.help
    text = CliRunner().invoke(app, ["select", "--help"], env={"COLUMNS": "200"}).output
    assert "<" + "|".join(PRIORS) + ">" in text
    with pytest.raises(TrajinfError, match="allowed: \\['invalid', 'tasks'\\]"):
        step_prior("tool_call", [], stat=None)
    with pytest.raises(TrajinfError, match="choose from branch"):
        step_prior("nope", [])
