"""ToolWorld: protocol conformance, expert/random success, irreversible decision points,
determinism, splits, and the action <-> tool-call round trip."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trajinf.envs import FAMILIES, Task, TextEnv, ToolWorld, make_env
from trajinf.envs.policies import ExpertPolicy, RandomPolicy
from trajinf.envs.rollout import rollout
from trajinf.errors import TrajinfError


@pytest.fixture(scope="module")
def env() -> ToolWorld:
    return ToolWorld()


def play(env: ToolWorld, task: Task, actions: list[str]) -> tuple[bool, list[dict]]:
    """Reset and play ``actions``; returns (success, infos)."""
    env.reset(task)
    infos = []
    for a in actions:
        _, _, done, info = env.step(a)
        infos.append(info)
        if done:
            break
    return bool(infos and infos[-1]["success"]), infos


def test_registry_and_protocol(env):
    assert isinstance(make_env("toolworld"), TextEnv)
    assert isinstance(make_env("builtin", families=["cook"]), ToolWorld)
    assert isinstance(env, TextEnv)
    with pytest.raises(TrajinfError, match="unknown"):
        make_env("nope")
    with pytest.raises(TrajinfError, match="families"):
        ToolWorld(families=["cook", "bake"])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_conformance(family):
    env = ToolWorld(families=[family])
    assert env.valid_actions() is None  # before reset
    for task in env.tasks("train", 25, seed=1):
        assert task.family == family and task.id.startswith(f"{family}-")
        obs = env.reset(task)
        assert obs.startswith(f"Goal: {task.goal}.") and len(obs.split()) < 40
        plan = env.expert(task)
        assert 3 <= len(plan) <= 8
        for k, a in enumerate(plan):
            valid = env.valid_actions()
            assert a in valid and 3 <= len(valid) <= 10 and len(set(valid)) == len(valid)
            assert env.plan() == plan[k:]  # re-planning from the state agrees with the expert
            assert env.next_action() == a
            obs, reward, done, info = env.step(a)
            assert isinstance(obs, str) and len(obs.split()) < 40
            assert done == (k == len(plan) - 1)
            assert set(info) >= {"success", "valid_actions", "valid", "doomed"}
            assert info["valid"] and not info["doomed"]
        assert info["success"] and reward == 1.0 and info["valid_actions"] == []
        with pytest.raises(TrajinfError, match="after the episode"):
            env.step(plan[-1])


@pytest.mark.parametrize("split", ["train", "test"])
def test_expert_always_succeeds(env, split):
    tasks = env.tasks(split, 200, seed=3)
    trajs = rollout(env, tasks, ExpertPolicy(), source="expert")
    assert all(t.success and t.reward == 1.0 for t in trajs)


def test_random_policy_much_worse(env):
    tasks = env.tasks("train", 200, seed=4)
    rate = sum(t.success for t in rollout(env, tasks, RandomPolicy(), source="random")) / 200
    assert rate < 0.25


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_choice_at_decision_point_dooms(family):
    """Following the wrong rule dooms the task at an EARLY step (not the last one), and the
    re-planning expert cannot recover from there."""
    env = ToolWorld(families=[family])
    for task in env.tasks("train", 20, seed=5):
        env.reset(task)
        right, wrong = env.plan(), env.plan(wrong_rule=True)
        assert len(wrong) == len(right) or family == "unlock"  # unlock: search may stop sooner
        doom = None
        for k, a in enumerate(wrong):
            _, _, done, info = env.step(a)
            assert info["valid"]
            if info["doomed"]:
                doom = k
                break
        assert doom is not None and doom < len(wrong) - 1 and not done
        assert wrong[doom] not in right  # the decision: the expert never takes this action
        while not done:  # the expert finishes the procedure but cannot recover
            _, _, done, info = env.step(env.plan()[0])
        assert not info["success"]


def test_cook_order_matters(env):
    task = next(t for t in env.tasks("train", 8, seed=6) if t.family == "cook")
    take, cut, heat, serve = env.expert(task)
    success, infos = play(env, task, [take, heat, cut, serve])
    assert not success and infos[1]["doomed"]


def test_invalid_action_is_an_observation_not_a_crash(env):
    task = env.tasks("train", 1, seed=7)[0]
    env.reset(task)
    before = env.valid_actions()
    obs, reward, done, info = env.step("dance wildly")
    assert "not possible" in obs and reward == 0.0 and not done and not info["valid"]
    assert env.valid_actions() == before
    for _ in range(task.data["max_steps"] - 2):
        _, _, done, info = env.step("dance")
    assert not done
    _, _, done, info = env.step("dance")  # the step limit ends it
    assert done and info["truncated"] and not info["success"]


def test_tasks_deterministic_and_layouts_vary(env):
    a, b = env.tasks("train", 40, seed=11), env.tasks("train", 40, seed=11)
    assert [(t.id, t.goal, t.data) for t in a] == [(t.id, t.goal, t.data) for t in b]
    assert [t.id for t in env.tasks("train", 40, seed=12)] != [t.id for t in a]
    assert [t.family for t in a[:8]] == list(FAMILIES) * 2  # round robin
    for family in FAMILIES:
        plans = {tuple(env.expert(t)) for t in ToolWorld(families=[family]).tasks("train", 30, 0)}
        assert len(plans) >= 20  # no single action sequence solves the family
    t0 = a[0]
    assert env.reset(t0) == env.reset(t0)
    assert env.make_task(t0.family, t0.seed).data == t0.data


def test_splits_disjoint(env):
    seeds = {
        s: {(t.family, t.seed) for t in env.tasks(s, 400, seed=0)} for s in ("train", "test", "dev")
    }
    assert not seeds["train"] & seeds["test"] and not seeds["train"] & seeds["dev"]
    assert not seeds["test"] & seeds["dev"]
    assert all(t.split == "test" for t in env.tasks("test", 5, 0))
    with pytest.raises(TrajinfError, match="split"):
        env.tasks("validation", 3, 0)


def test_tool_call_round_trip(env):
    names = {s["function"]["name"] for s in env.tool_schema}
    for task in env.tasks("train", 40, seed=8):
        env.reset(task)
        assert {s["function"]["name"] for s in env.tools_for(task)} <= names
        for k, a in enumerate(env.expert(task)):
            for v in env.valid_actions():
                msg = env.action_to_message(v)
                call = msg["tool_calls"][0]
                assert msg["role"] == "assistant" and call["id"] == f"call_{k}"
                assert call["function"]["name"] in names
                assert isinstance(json.loads(call["function"]["arguments"]), dict)
                assert env.message_to_action(msg) == v
            env.step(a)
    plain = env.action_to_message("sing a song")
    assert "tool_calls" not in plain and env.message_to_action(plain) == "sing a song"
    bad = {
        "role": "assistant",
        "tool_calls": [{"id": "x", "function": {"name": "fly", "arguments": "{}"}}],
    }
    with pytest.raises(TrajinfError, match="unknown tool"):
        env.message_to_action(bad)
    missing = {
        "role": "assistant",
        "tool_calls": [{"id": "x", "function": {"name": "take", "arguments": '{"item": "x"}'}}],
    }
    with pytest.raises(TrajinfError, match="source"):
        env.message_to_action(missing)


def test_show_actions_lists_valid_actions():
    env = ToolWorld(show_actions=True)
    task = env.tasks("train", 1, 0)[0]
    obs = env.reset(task)
    assert obs.endswith(f"Actions: {'; '.join(env.valid_actions())}.")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(0, 50), min_size=1, max_size=12))
def test_any_action_sequence_is_safe(seed, picks):
    """Arbitrary valid-action sequences never crash; once doomed, an episode stays doomed."""
    env = ToolWorld()
    task = env.tasks("train", 4, seed)[seed % 4]
    env.reset(task)
    doomed = False
    for p in picks:
        valid = env.valid_actions()
        _, reward, done, info = env.step(valid[p % len(valid)])
        assert info["doomed"] or not doomed
        doomed = info["doomed"]
        assert reward == (1.0 if info["success"] else 0.0)
        if done:
            assert info["success"] != info["doomed"]
            break
