"""rollout + scripted policies on ToolWorld: ids, determinism, batching, labels, noise grading."""

from __future__ import annotations

import json

import pytest

from trajinf.data.trajectories import load_pool
from trajinf.data.write import write_pool
from trajinf.envs import FAMILIES, ToolWorld
from trajinf.envs.families import BIN, CUT, KEY, PART
from trajinf.envs.policies import (
    ExpertPolicy,
    NoisyExpertPolicy,
    PlantedHarmfulPolicy,
    RandomPolicy,
)
from trajinf.envs.rollout import EpisodeState, rollout
from trajinf.errors import TrajinfError


@pytest.fixture(scope="module")
def env() -> ToolWorld:
    return ToolWorld()


@pytest.fixture(scope="module")
def tasks(env):
    return env.tasks("train", 120, seed=0)


class CountingPolicy:
    """Wraps a policy; records the batch sizes it was called with."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []
        self.first: list[tuple] = []  # (state, its valid actions, #messages) at the first call

    def act(self, episodes: list[EpisodeState]):
        if not self.calls:
            self.first = [(ep, list(ep.valid_actions), len(ep.messages)) for ep in episodes]
        self.calls.append(len(episodes))
        return self.inner.act(episodes)


def comparable(trajs):
    return [(t.id, t.messages, t.success, t.reward, t.meta) for t in trajs]


def test_ids_fields_and_messages(env, tasks):
    trajs = rollout(env, tasks[:8], ExpertPolicy(), source="expert", n_per_task=2)
    assert [t.id for t in trajs] == [f"expert-{t.id}-{k}" for t in tasks[:8] for k in range(2)]
    for traj in trajs:
        task = next(t for t in tasks if traj.task_id == t.id)
        assert traj.source == "expert" and traj.meta["family"] == task.family
        assert "planted" not in traj.meta and traj.tools == env.tools_for(task)
        m = traj.messages
        assert [x["role"] for x in m[:2]] == ["system", "user"] and task.goal in m[1]["content"]
        steps = traj.steps()
        assert len(steps) == traj.meta["n_steps"] == len(env.expert(task))
        for s in steps:
            call = m[s.action]["tool_calls"][0]
            (c,) = s.consequences
            assert m[c]["role"] == "tool" and m[c]["tool_call_id"] == call["id"]
    other = rollout(env, tasks[:2], ExpertPolicy(), source="expert", id_prefix="run7")
    assert other[0].id == f"run7-{tasks[0].id}-0" and other[0].source == "expert"


def test_deterministic_and_independent_of_batching(env, tasks):
    pol = NoisyExpertPolicy(0.4)
    a = rollout(env, tasks[:40], pol, source="noisy", n_per_task=2, seed=3)
    b = rollout(env, tasks[:40], pol, source="noisy", n_per_task=2, seed=3, batch_size=7)
    c = rollout(env, tasks[:40], pol, source="noisy", n_per_task=2, seed=4)
    assert comparable(a) == comparable(b)
    assert comparable(a) != comparable(c)
    # the two repeats of a task differ (each episode has its own rng stream)
    assert any(a[2 * i].messages != a[2 * i + 1].messages for i in range(40))


def test_policy_called_once_per_step_with_all_live_episodes(env, tasks):
    pol = CountingPolicy(ExpertPolicy())
    trajs = rollout(env, tasks[:12], pol, source="expert")
    lengths = sorted(t.meta["n_steps"] for t in trajs)
    # one call per step of the longest episode; call k sees every episode still running
    assert len(pol.calls) == lengths[-1]
    assert pol.calls == [sum(n > k for n in lengths) for k in range(lengths[-1])]
    ep, valid, n_messages = pol.first[0]
    assert n_messages == 2 and ep.messages[0]["role"] == "system" and ep.tools
    assert valid[0].startswith("take") and isinstance(ep.env, ToolWorld) and ep.task in tasks[:12]
    small = CountingPolicy(ExpertPolicy())
    rollout(env, tasks[:12], small, source="expert", batch_size=5)
    assert max(small.calls) <= 5


def test_bad_policy_output_raises(env, tasks):
    class Short:
        def act(self, episodes):
            return []

    with pytest.raises(TrajinfError, match="returned 0 actions"):
        rollout(env, tasks[:3], Short(), source="x")
    with pytest.raises(TrajinfError, match="n_per_task"):
        rollout(env, tasks[:3], ExpertPolicy(), source="x", n_per_task=0)
    with pytest.raises(TrajinfError, match="level"):
        NoisyExpertPolicy(1.5)


def test_invalid_actions_recorded_not_fatal(env, tasks):
    class Babble:
        def act(self, episodes):
            return ["sing loudly" for _ in episodes]

    (traj,) = rollout(env, tasks[:1], Babble(), source="babble")
    assert not traj.success and traj.meta["truncated"]
    assert traj.meta["invalid_steps"] == list(range(traj.meta["n_steps"]))
    assert traj.messages[2] == {"role": "assistant", "content": "sing loudly"}
    assert traj.messages[3]["role"] == "user" and "not possible" in traj.messages[3]["content"]


def _decision_is_wrong(family: str, traj) -> bool:
    """Check the trajectory's decision against the TRUE rule, reading only its own messages."""
    goal = traj.messages[1]["content"]
    calls = [
        (
            m["tool_calls"][0]["function"]["name"],
            json.loads(m["tool_calls"][0]["function"]["arguments"]),
        )
        for m in traj.messages
        if m.get("tool_calls")
    ]
    if family == "cook":
        cut = next(w for w in CUT if f" {w} " in goal)
        return CUT[cut] not in [a["tool"] for n, a in calls if n == "use"]
    if family == "unlock":
        color = next(c for c in KEY if f"a {c} lock" in goal)
        return [a["key"] for n, a in calls if n == "unlock"] != [f"{color} key"]
    if family == "repair":
        symptom = next(s for s in PART for m in traj.messages if f" {s}." in str(m.get("content")))
        return [a["part"] for n, a in calls if n == "install"] != [PART[symptom]]
    puts = [a for n, a in calls if n == "put"]
    return any(a["target"] != f"{BIN[a['item'].split()[0]]} bin" for a in puts)


def test_planted_labelled_success_but_fail_true_rule(env, tasks):
    trajs = rollout(env, tasks, PlantedHarmfulPolicy(), source="planted")
    for t in trajs:
        assert t.success is True and t.reward == 1.0 and t.source == "planted"
        assert t.meta["planted"] is True and t.meta["true_success"] is False
        assert t.meta["true_reward"] == 0.0 and "doom_step" in t.meta
        assert t.meta["doom_step"] < t.meta["n_steps"] - 1  # the wrong rule bites early
        # the decision points are recorded, and the task is doomed at or after the first
        assert t.meta["planted_steps"] and min(t.meta["planted_steps"]) <= t.meta["doom_step"]
        assert _decision_is_wrong(t.meta["family"], t), t.id
    # the same helper says the expert follows the true rule
    assert not any(
        _decision_is_wrong(t.meta["family"], t)
        for t in rollout(env, tasks, ExpertPolicy(), source="e")
    )
    # plausible: same length as the expert's, and no verdict in the text
    text = " ".join(str(m.get("content")) for t in trajs for m in t.messages).lower()
    assert not any(w in text for w in ("fail", "wrong", "ruin", "success"))


@pytest.mark.parametrize("mode", ["inject", "cutoff"])
def test_noisy_expert_success_decreases_with_level(env, tasks, mode):
    rates = []
    for level in (0.0, 0.2, 0.5, 1.0):
        trajs = rollout(env, tasks, NoisyExpertPolicy(level, mode=mode), source="noisy", seed=1)
        rates.append(sum(t.success for t in trajs) / len(trajs))
        if level == 0.0:
            assert all("noisy_steps" not in t.meta for t in trajs)
    assert rates[0] == 1.0 and rates[0] > rates[1] > rates[2] > rates[3]
    assert rates[3] < 0.3  # level 1.0 is the random policy (cutoff: from a random step on)


def test_noisy_steps_and_doom_recorded(env, tasks):
    trajs = rollout(env, tasks, NoisyExpertPolicy(0.3), source="noisy", seed=2)
    failed = [t for t in trajs if not t.success]
    assert failed and all("noisy_steps" in t.meta for t in failed)
    for t in failed:
        if "doom_step" in t.meta:  # a noisy step caused the doom (the expert never dooms)
            assert min(t.meta["noisy_steps"]) <= t.meta["doom_step"]


def test_random_policy_and_families_balanced(env, tasks):
    trajs = rollout(env, tasks, RandomPolicy(), source="random")
    assert {t.meta["family"] for t in trajs} == set(FAMILIES)
    assert sum(t.success for t in trajs) / len(trajs) < 0.25


def test_pool_round_trip(env, tasks, tmp_path):
    trajs = rollout(env, tasks[:8], PlantedHarmfulPolicy(), source="planted")
    trajs += rollout(env, tasks[:8], NoisyExpertPolicy(0.5), source="noisy")
    write_pool(trajs, tmp_path / "pool.jsonl")
    back = load_pool(tmp_path / "pool.jsonl")
    assert [(t.id, t.task_id, t.success, t.meta, t.messages) for t in back] == [
        (t.id, t.task_id, t.success, t.meta, t.messages) for t in trajs
    ]


def test_without_tool_schemas_calls_remain(env, tasks):
    (traj,) = rollout(env, tasks[:1], ExpertPolicy(), source="expert", with_tools=False)
    assert traj.tools is None and traj.success
    assert "tool" in traj.messages[0]["content"]  # the system prompt still says: call tools
    assert all(m.get("tool_calls") for m in traj.messages if m["role"] == "assistant")
