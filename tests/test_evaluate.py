"""evaluate.py: AUROC (hand cases, ties), Wilson intervals, success rate of policies on ToolWorld."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trajinf.envs import ToolWorld
from trajinf.envs.evaluate import EvalResult, auroc, evaluate_policy, success_rate_ci
from trajinf.envs.policies import ExpertPolicy, RandomPolicy
from trajinf.errors import TrajinfError


def _pairwise_auroc(scores, labels) -> float:
    """The definition: P(score_pos > score_neg) + 0.5 P(tie), by enumerating pairs."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_hand_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # positives 0.35 and 0.8 vs negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # every score tied: no information
    assert auroc([3.0] * 5, [1, 0, 1, 0, 0]) == pytest.approx(0.5)
    # ties across classes count one half: pairs (1,1)=.5 (1,0)=1 (0,1)=0 (0,0)=.5
    assert auroc([1, 0, 1, 0], [True, True, False, False]) == pytest.approx(0.5)


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.3
    assert auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels))


def test_auroc_undefined_and_bad_input():
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    assert math.isnan(auroc([], []))
    with pytest.raises(ValueError):
        auroc([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError):
        auroc([0.1, float("nan")], [1, 0])


def test_wilson_interval_known_values():
    lo, hi = success_rate_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = success_rate_ci(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = success_rate_ci(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    assert success_rate_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        success_rate_ci(11, 10)


def test_expert_policy_succeeds_everywhere():
    env = ToolWorld()
    res = evaluate_policy(env, ExpertPolicy(), n_tasks=16, seed=3)
    assert isinstance(res, EvalResult)
    assert res.success_rate == 1.0 and res.n_episodes == 16 and res.seed == 3
    assert set(res.per_family) == {"cook", "unlock", "repair", "sort"}
    assert all(v == 1.0 for v in res.per_family.values())
    assert sum(res.per_family_n.values()) == 16
    assert res.mean_steps > 1
    assert res.ci_low < 1.0 == res.ci_high
    json.dumps(res.to_dict())  # plain JSON


def test_random_policy_is_worse_and_families_filter():
    env = ToolWorld()
    rnd = evaluate_policy(env, RandomPolicy(), n_tasks=24, seed=0)
    assert rnd.success_rate < 0.7
    only = evaluate_policy(env, ExpertPolicy(), n_tasks=12, seed=0, families=["sort"])
    assert set(only.per_family) == {"sort"} and only.n_episodes == 3
    with pytest.raises(TrajinfError, match="families"):
        evaluate_policy(env, ExpertPolicy(), n_tasks=4, seed=0, families=["nope"])
