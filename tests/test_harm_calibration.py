"""Harm score and calibrated flag (issue 13) on constructed cases where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trajinf.errors import TrajinfError
from trajinf.scoring.calibration import (
    flag_rate,
    harm_features,
    harm_p_values,
    harm_threshold,
    loo_directions,
    onset_steps,
    step_drops,
)
from trajinf.scoring.directions import target_directions
from trajinf.scoring.source import ScoreConfig
from trajinf.selection.repair import repair_plan

D = 48


def _trajectories(rng, n, u, *, n_steps=(5, 9), reverse=None, noise=0.6):
    """n trajectories whose steps follow the target direction u (unit [D]) with noise; the
    steps listed in ``reverse`` (traj index -> step) take the opposite decision: -u, with the
    large gradient of an action the model (warmed up toward the target) finds unlikely."""
    steps, owner, bad = [], [], {}
    for i in range(n):
        k = int(rng.integers(n_steps[0], n_steps[1] + 1))
        for s in range(k):
            sign = 1.0
            mag = rng.uniform(0.5, 1.5)
            if reverse and reverse.get(i) == s:
                sign, bad[i], mag = -1.0, s, 4.0
            steps.append(mag * (sign * u + noise * rng.standard_normal(D) / math.sqrt(D) * 3))
            owner.append(i)
    steps = np.asarray(steps, np.float32)
    owner = np.asarray(owner, np.int64)
    traj = np.zeros((n, D), np.float32)
    np.add.at(traj, owner, steps)
    return traj, steps, owner, bad


def _unit(rng):
    u = rng.standard_normal(D)
    return (u / np.linalg.norm(u)).astype(np.float32)


def test_step_drops_match_a_loop_reference() -> None:
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(6), [1, 2, 3, 5, 4, 7])
    v = rng.standard_normal(len(owner))
    v[3] = np.nan
    drops, harm, worst = step_drops(v, owner, 7)
    for pos in range(len(v)):
        mine = owner == owner[pos]
        others = v[mine & (np.arange(len(v)) != pos)]
        others = others[np.isfinite(others)]
        want = -v[pos] if mine.sum() < 2 else np.median(others) - v[pos]
        np.testing.assert_allclose(drops[pos], want, equal_nan=True)
    for i in range(6):
        d = np.where(owner == i, drops, np.nan)
        assert harm[i] == np.nanmax(d) and worst[i] == np.nanargmax(d)
    assert np.isnan(harm[6]) and worst[6] == -1  # no steps
    _, m_harm, _ = step_drops(v, owner, 7, "min")
    assert m_harm[0] == -v[0]
    with pytest.raises(TrajinfError, match="statistic"):
        step_drops(v, owner, 7, "max")


def test_onset_steps_locate_the_first_step_reaching_half_the_largest_drop() -> None:
    rng = np.random.default_rng(3)
    sizes = [1, 2, 3, 5, 4, 7, 6]
    owner = np.repeat(np.arange(7), sizes)
    # steps stored out of order within a trajectory: "first" is by step index, not position
    step_index = np.concatenate([rng.permutation(k) for k in sizes])
    v = rng.standard_normal(len(owner))
    v[4] = np.nan
    drops, harm, worst = step_drops(v, owner, 8)
    got = onset_steps(drops, owner, step_index, harm, worst, 0.5)
    for i in range(8):
        mine = np.flatnonzero(owner == i)
        if not len(mine):
            assert got[i] == -1
            continue
        if not harm[i] > 0:
            assert got[i] == worst[i]
            continue
        reach = [p for p in mine if np.isfinite(drops[p]) and drops[p] >= 0.5 * harm[i]]
        assert got[i] == min(reach, key=lambda p: step_index[p])
    np.testing.assert_array_equal(onset_steps(drops, owner, step_index, harm, worst, 1.0), worst)
    with pytest.raises(TrajinfError, match="onset"):
        onset_steps(drops, owner, step_index, harm, worst, 0.0)
    # a trajectory whose step 1 drops 0.6 and whose step 3 drops 1.0 is located at step 1
    d2, h2, w2 = step_drops(np.array([0.0, -0.6, 0.0, -1.0]), np.zeros(4, int), 1)
    assert w2[0] == 3 and onset_steps(d2, np.zeros(4, int), np.arange(4), h2, w2)[0] == 1


def test_loo_directions_equal_directions_of_the_target_without_each_item() -> None:
    rng = np.random.default_rng(1)
    t = rng.standard_normal((7, 10)).astype(np.float32)
    sub = ["a", "a", "a", "b", "b", "b", "b"]
    cfg = ScoreConfig()
    full, vectors, names = loo_directions([t], cfg, subtasks=sub)
    assert names == ["a", "b"] and vectors[0].shape == (14, 10)
    for i in range(7):
        keep = [j for j in range(7) if j != i]
        ref = target_directions([t[keep]], cfg, subtasks=[sub[j] for j in keep])
        np.testing.assert_allclose(vectors[0][2 * i : 2 * i + 2], ref.vectors[0], rtol=1e-5)


def test_threshold_is_the_conformal_quantile_or_a_gaussian_bound() -> None:
    c = np.arange(1.0, 40.0)  # 39 scores
    thr, how = harm_threshold(c, 0.05)
    # brute force: a new exchangeable score exceeds the r-th smallest of n with probability
    # (n + 1 - r) / (n + 1); the threshold is the r-th smallest for the smallest r with <= alpha
    n = len(c)
    r = min(r for r in range(1, n + 1) if (n + 1 - r) / (n + 1) <= 0.05 + 1e-12)
    assert how == "conformal" and thr == c[r - 1] == 38.0
    small, how = harm_threshold(np.array([0.1, 0.2, 0.3, 0.4]), 0.05)
    assert how == "gaussian" and small > 0.4
    p = harm_p_values(np.array([0.0, 100.0, np.nan]), c, "conformal")
    assert p[0] == 1.0 and p[1] == pytest.approx(1 / 40) and np.isnan(p[2])
    with pytest.raises(TrajinfError, match="need >= 2"):
        harm_threshold(np.array([1.0]), 0.05)


def test_flag_rate_intervals() -> None:
    r = flag_rate(np.zeros(20, bool))
    assert r["rate"] == 0.0 and r["ci_exact"][0] == 0.0
    assert r["ci_exact"][1] == pytest.approx(1 - 0.025 ** (1 / 20))  # exact bound at k = 0
    r = flag_rate(np.array([True] * 3 + [False] * 7))
    lo, hi = r["ci_wilson"]
    assert lo < 0.3 < hi and r["ci_exact"][0] < lo  # exact is wider than Wilson here
    assert flag_rate(np.zeros(0, bool))["rate"] is None


@pytest.mark.parametrize("signal", ["surprise", "alignment"])
def test_one_reversed_decision_is_flagged_and_repaired_at_that_step(signal) -> None:
    rng = np.random.default_rng(2)
    u = _unit(rng)
    target = _trajectories(rng, 30, u)
    pool = _trajectories(rng, 12, u, reverse={3: 4, 7: 0})
    res = harm_features(*pool[:3], *target[:3], ScoreConfig(), alpha=0.05, signal=signal)
    tr = res.trajectories
    assert res.info["method"] == "conformal"
    assert bool(tr.loc[3, "harmful"]) and bool(tr.loc[7, "harmful"])
    assert tr.loc[3, "worst_step"] == 4 and tr.loc[7, "worst_step"] == 0
    plan = repair_plan(tr, res.steps).set_index("id")
    assert plan.loc["3", "choice"] == "repaired" and plan.loc["3", "bad_steps"] == [4]
    assert plan.loc["7", "choice"] == "repaired" and plan.loc["7", "bad_steps"] == [0]
    assert (tr["harm_p"][[3, 7]] <= 1 / 31 + 1e-12).all()


@pytest.mark.parametrize("signal", ["surprise", "alignment"])
def test_a_clean_target_keeps_its_false_positive_rate_over_many_draws(signal) -> None:
    alpha, flags = 0.1, []
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        u = _unit(rng)
        target = _trajectories(rng, 24, u)
        pool = _trajectories(rng, 25, u)  # exchangeable with the target: all good
        res = harm_features(*pool[:3], *target[:3], ScoreConfig(), alpha=alpha, signal=signal)
        flags.append(res.trajectories["harmful"].to_numpy(bool))
    r = flag_rate(np.concatenate(flags))
    # conformal: E[FPR] <= alpha; 1,000 pool draws in 40 calibrations: allow the draw noise
    assert r["rate"] <= alpha + 0.03, r
    assert r["rate"] >= alpha - 0.06, r  # and it is not trivially silent


def test_repair_plan_drops_mostly_bad_and_one_step_trajectories() -> None:
    import pandas as pd

    harm = pd.DataFrame({"id": ["a", "b", "c", "d"], "harmful": [False, True, True, True]})
    steps = pd.DataFrame(
        {
            "id": ["a"] * 3 + ["b"] * 9 + ["c"] * 3 + ["d"],
            "step": [0, 1, 2, *range(9), 0, 1, 2, 0],
            "bad": [True, False, False] + [False] * 8 + [True] + [True, True, False] + [True],
        }
    )
    plan = repair_plan(harm, steps).set_index("id")
    assert plan.loc["a", "choice"] == "kept"  # not flagged: a bad mark alone changes nothing
    assert plan.loc["b", "choice"] == "repaired" and plan.loc["b", "bad_steps"] == [8]
    assert plan.loc["c", "choice"] == "dropped"  # 2 of 3 bad
    assert plan.loc["d", "choice"] == "dropped"  # its only step is bad
    with pytest.raises(TrajinfError, match="lacks column"):
        repair_plan(harm.drop(columns="harmful"), steps)
