"""Priors on TextWorld Express: expert agreement from gold paths (defined only while the history
is on the path), tasks rebuilt from meta, early experience. Skipped without Java."""

from __future__ import annotations

import math
import shutil

import pytest

from trajinf.envs.early_experience import early_experience
from trajinf.envs.policies import ExpertPolicy, NoisyExpertPolicy
from trajinf.envs.rollout import rollout
from trajinf.selection.priors import step_prior


@pytest.fixture(scope="module")
def env():
    if shutil.which("java") is None:
        pytest.skip("no java")
    from trajinf.envs.twx import TwxEnv

    e = TwxEnv(("coin",))
    yield e
    e.close()


def test_gold_path_agreement_and_early_experience(env):
    tasks = env.tasks("train", 3, 0)
    rebuilt = env.make_task("coin", tasks[0].seed, "train")
    assert rebuilt.data["gold"] == tasks[0].data["gold"] and rebuilt.goal == tasks[0].goal
    pool = rollout(env, tasks, ExpertPolicy(), source="e") + rollout(
        env, tasks, NoisyExpertPolicy(1.0), source="n"
    )
    df = step_prior("expert_aligned", pool, env=env)
    assert df.attrs["info"]["expert"] == "gold path"
    v = {i: list(g.sort_values("step")["value"]) for i, g in df.groupby("id")}
    for t in pool:
        off = t.meta.get("noisy_steps", [])
        if not off:
            assert all(x == 1.0 for x in v[t.id])
            continue
        first = off[0]  # agreement until the first detour, 0 there, undefined after it
        assert all(x == 1.0 for x in v[t.id][:first]) and v[t.id][first] == 0.0
        assert all(math.isnan(x) for x in v[t.id][first + 1 :])
    assert step_prior("tool_call", pool, env=env)["value"].isna().all()  # plain-text actions
    ee = early_experience(env, pool[:1], k=2, seed=0)
    assert {x.source for x in ee} == {"world_model", "reflection"}
    assert ee == early_experience(env, pool[:1], k=2, seed=0)
