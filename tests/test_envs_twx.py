"""TextWorld Express adapter: expert gold paths solve the games, rollouts give valid trajectories.

Every test that starts a JVM is skipped (with the install hint) only when ``java`` is missing.
"""

from __future__ import annotations

import shutil

import pytest

from trajinf.envs import Task, TextEnv, make_env
from trajinf.envs.policies import ExpertPolicy, NoisyExpertPolicy, PlantedHarmfulPolicy
from trajinf.envs.rollout import rollout
from trajinf.envs.twx import JAVA_HINT, TwxEnv
from trajinf.errors import EnvUnavailableError, TrajinfError

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason=f"no java: {JAVA_HINT}")
GAMES = ("coin", "mapreader", "arithmetic", "twc")


@pytest.fixture(scope="module")
def env():
    if shutil.which("java") is None:
        pytest.skip(f"no java: {JAVA_HINT}")
    e = TwxEnv(GAMES, max_valid_actions=6)
    yield e
    e.close()


@pytest.fixture(scope="module")
def tasks(env):
    return env.tasks("train", 8, seed=0)


def test_missing_java_raises_with_hint(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EnvUnavailableError, match="openjdk-17-jre-headless"):
        make_env("twx")


@needs_java
def test_tasks_and_folds(env, tasks):
    assert isinstance(env, TextEnv) and env.tool_schema is None
    assert [t.family for t in tasks] == list(GAMES) * 2
    assert len({t.id for t in tasks}) == 8
    assert all(0 <= t.seed < 10_000 and t.data["gold"] and t.goal for t in tasks)
    test = env.tasks("test", 4, seed=0)
    assert all(t.seed >= 20_000 and t.split == "test" for t in test)  # disjoint simulator folds
    assert [t.id for t in env.tasks("train", 8, seed=0)] == [t.id for t in tasks]
    with pytest.raises(TrajinfError, match="split"):
        env.tasks("validation", 1, 0)


@needs_java
def test_expert_gold_path_succeeds(env, tasks):
    for task in tasks:
        obs = env.reset(task)
        assert obs.startswith(task.goal)
        for a in env.expert(task):
            obs, reward, done, info = env.step(a)
        assert done and info["success"] and not info["doomed"], task.id


@needs_java
def test_valid_actions_cap_is_deterministic(env, tasks):
    env.reset(tasks[2])  # arithmetic lists ~9 actions
    full = sorted(env._all_valid)
    capped = env.valid_actions()
    assert len(full) > 6 and len(capped) == 6 and set(capped) <= set(full)
    assert env.valid_actions() == capped
    obs, _, done, info = env.step("fly to the moon")
    assert not done and not info["valid"] and isinstance(obs, str)


@needs_java
def test_rollout_trajectories(env, tasks):
    trajs = rollout(env, tasks, ExpertPolicy(), source="expert")
    assert [t.id for t in trajs] == [f"expert-{t.id}-0" for t in tasks]
    for traj, task in zip(trajs, tasks, strict=True):
        assert traj.success and traj.task_id == task.id and traj.meta["family"] == task.family
        assert traj.tools is None and traj.meta["env"] == "twx"
        roles = [m["role"] for m in traj.messages]
        assert roles[:2] == ["system", "user"] and roles[2:] == ["assistant", "user"] * len(
            task.data["gold"]
        )
        assert [m["content"] for m in traj.messages if m["role"] == "assistant"] == task.data[
            "gold"
        ]
    noisy = rollout(env, tasks, NoisyExpertPolicy(1.0), source="noisy", seed=1)
    assert sum(t.success for t in noisy) < len(tasks)


@needs_java
def test_planted_demos_take_a_wrong_object_at_the_last_gold_step():
    """Gold path up to its last step, there another valid action with the same verb; the
    episode ends with it; labelled success, the truth in meta. Tasks without such an
    alternative (coin) are played as the expert and not relabelled."""
    with TwxEnv(GAMES) as plain:
        tasks = plain.tasks("train", 8, seed=0)
        trajs = rollout(plain, tasks, PlantedHarmfulPolicy(), source="expert", id_prefix="demo")
    planted = [t for t in trajs if t.meta.get("planted")]
    assert {t.meta["family"] for t in planted} == {"mapreader", "arithmetic", "twc"}
    for traj, task in zip(trajs, tasks, strict=True):
        acts = [m["content"] for m in traj.messages if m["role"] == "assistant"]
        gold = task.data["gold"]
        if not traj.meta.get("planted"):
            assert task.family == "coin" and acts == gold and traj.success
            continue
        assert traj.success and traj.reward == 1.0 and traj.meta["true_success"] is False
        assert traj.meta["planted_steps"] == [len(gold) - 1] and len(acts) == len(gold)
        assert acts[:-1] == gold[:-1] and acts[-1] != gold[-1]
        assert acts[-1].split()[0] == gold[-1].split()[0]  # a wrong object / direction


@needs_java
def test_message_round_trip(env):
    msg = env.action_to_message("take coin")
    assert msg == {"role": "assistant", "content": "take coin"}
    assert env.message_to_action(msg) == "take coin"


@needs_java
def test_case_sensitive_names_and_lowercase_actions(env):
    """The simulator is case-sensitive ("TV remote control"); gold actions keep their case and a
    lower-cased action still matches its valid action."""
    task = Task(
        id="twc-257",
        family="twc",
        split="train",
        seed=257,
        goal="Put things away.",
        data={"game": "twc", "fold": "train", "gold": [], "max_steps": 6},
    )
    env.reset(task)
    assert "take TV remote control" in env._all_valid
    _, _, _, info = env.step("take tv remote control")
    assert info["valid"]
    _, _, done, info = env.step("put TV remote control in TV stand")
    assert done and info["success"]
