"""Env-backed priors (ToolWorld): expert agreement, tool-call correctness, tool-call token spans,
and early-experience data."""

from __future__ import annotations

import difflib
import math

import numpy as np
import pytest

from trajinf.data.tokenize import tokenize_pool, tokenize_trajectory
from trajinf.data.trajectories import load_pool, trajectory_from_messages
from trajinf.data.write import write_pool
from trajinf.envs import make_env
from trajinf.envs.early_experience import early_experience
from trajinf.envs.policies import ExpertPolicy, expert_action
from trajinf.envs.rollout import rollout
from trajinf.errors import TrajinfError
from trajinf.selection.priors import step_prior, tool_call_mask, tool_call_spans


class DetourPolicy:
    """The expert, except at step ``at``: a valid non-expert action, or an invalid one."""

    name = "detour"

    def __init__(self, at: int, invalid: bool = False) -> None:
        self.at, self.invalid = at, invalid

    def act(self, episodes):
        out = []
        for ep in episodes:
            planned = expert_action(ep)
            if ep.step != self.at:
                out.append(planned)
            elif self.invalid:
                out.append("take moon from sky")
            else:
                out.append(next(a for a in ep.valid_actions if a != planned))
        return out


@pytest.fixture(scope="module")
def env():
    return make_env("toolworld", families=["repair"])


@pytest.fixture(scope="module")
def tasks(env):
    return env.tasks("train", 2, 0)


def by_id(df):
    return {i: list(g.sort_values("step")["value"]) for i, g in df.groupby("id")}


def test_expert_agreement_known_detour(env, tasks):
    pool = rollout(env, tasks, DetourPolicy(1), source="self")
    v = by_id(step_prior("expert_aligned", pool, env=env))
    for t in pool:
        assert v[t.id][1] == 0.0  # the detour
        assert v[t.id][0] == 1.0 and all(x == 1.0 for x in v[t.id][2:])  # re-planned after it
    # ratio mode: the detour's similarity is difflib's ratio of the two action strings
    t = pool[0]
    env.reset(tasks[0])
    env.step(env.message_to_action(t.messages[t.steps()[0].action]))
    expert = env.next_action()
    taken = env.message_to_action(t.messages[t.steps()[1].action])
    ratio = difflib.SequenceMatcher(None, taken, expert).ratio()
    r = by_id(step_prior("expert_aligned", pool[:1], env=env, similarity="ratio"))
    assert r[t.id][1] == pytest.approx(ratio) and 0 < ratio < 1


def test_expert_agreement_needs_env_and_task(env, tasks):
    pool = rollout(env, tasks[:1], ExpertPolicy(), source="e")
    with pytest.raises(TrajinfError, match="needs an env"):
        step_prior("expert_aligned", pool)
    pool[0].meta.pop("task_seed")
    df = step_prior("expert_aligned", pool, env=env)
    assert df["value"].isna().all() and df.attrs["info"]["no_task"] == 1


def test_tool_call_values_from_env_rollout_meta_and_schema(env, tasks, tool_pool_records):
    pool = rollout(env, tasks, DetourPolicy(2, invalid=True), source="self")
    with_env = by_id(step_prior("tool_call", pool, env=env))
    from_meta = by_id(step_prior("tool_call", pool))
    for t in pool:
        # "take moon from sky" is a well-formed take call that the env rejects
        assert with_env[t.id][:3] == [1.0, 1.0, -1.0] == from_meta[t.id][:3]
        assert all(x == 1.0 for x in with_env[t.id][3:])
    recs = tool_pool_records
    bad = recs[1]["messages"][2]["tool_calls"][0]["function"]
    bad["name"] = "fly"  # not in the record's tool schemas
    trajs = [trajectory_from_messages(r["messages"], id=r["id"], tools=r["tools"]) for r in recs]
    v = by_id(step_prior("tool_call", trajs, invalid=0.0))
    assert v["t-0001"][0] == 1.0 and math.isnan(v["t-0001"][1])  # call, then plain text
    assert v["t-0002"][0] == 0.0 and v["t-0002"][2] == 1.0


def test_replay_stops_where_the_recorded_observation_differs(env, tasks):
    pool = rollout(env, tasks[:1], DetourPolicy(2, invalid=True), source="e")
    t = pool[0]
    t.messages[t.steps()[1].action + 1]["content"] = "Something else happened."
    df = step_prior("expert_aligned", pool, env=env)
    assert df.attrs["info"]["stopped"] == {t.id: "diverged at step 1"}
    v = by_id(df)[t.id]
    assert v[:2] == [1.0, 1.0] and all(math.isnan(x) for x in v[2:])
    tc = step_prior("tool_call", pool, env=env)
    assert by_id(tc)[t.id][2] == -1.0  # after the divergence: the rollout's own record
    assert tc.attrs["info"]["rollout_meta"] >= 1


@pytest.mark.parametrize("fixture", ["chatml_tokenizer", "llama3_tokenizer"])
def test_tool_call_token_spans(fixture, request, tool_pool_records):
    tok = request.getfixturevalue(fixture)
    rec = tool_pool_records[0]  # steps: call, text, call, text
    t = trajectory_from_messages(rec["messages"], id=rec["id"], tools=rec["tools"])
    tt = tokenize_trajectory(t, tok)
    spans = tool_call_spans(t, tt, tok)
    assert [s for s, _, _ in spans] == [0, 2]
    for step, lo, hi in spans:
        text = tok.decode(tt.input_ids[lo:hi])
        name = t.messages[t.steps()[step].action]["tool_calls"][0]["function"]["name"]
        assert f'"name": "{name}"' in text and "<|im_end|>" not in text and "<|eot_id|>" not in text
        assert set(tt.step_ids[lo:hi]) == {step}
    mask = tool_call_mask(t, tt, tok)
    assert mask.any() and not (mask & ~tt.action_mask).any()
    assert not mask[np.isin(tt.step_ids, [1, 3])].any()  # plain-text steps have no call tokens


def test_tool_call_spans_after_left_truncation(chatml_tokenizer, tool_pool_records):
    rec = tool_pool_records[0]
    t = trajectory_from_messages(rec["messages"], id=rec["id"], tools=None)
    full = tokenize_trajectory(t, chatml_tokenizer)
    with pytest.warns(UserWarning, match="dropped"):
        tt = tokenize_trajectory(t, chatml_tokenizer, max_length=len(full.input_ids) - 20)
    assert tt.dropped_steps >= 1
    spans = tool_call_spans(t, tt, chatml_tokenizer)
    assert all(s >= tt.dropped_steps for s, _, _ in spans) and spans[-1][0] == 2


def test_early_experience_is_valid_deterministic_and_tokenizes(
    env, tasks, tmp_path, chatml_tokenizer
):
    expert = rollout(env, tasks, ExpertPolicy(), source="expert")
    ee = early_experience(env, expert, k=2, seed=0)
    again = early_experience(env, expert, k=2, seed=0)
    other = early_experience(env, expert, k=2, seed=1)
    assert [x.messages for x in ee] == [x.messages for x in again]
    assert [x.messages for x in ee] != [x.messages for x in other]
    n_states = sum(len(t.steps()) for t in expert)
    wm = [x for x in ee if x.source == "world_model"]
    refl = [x for x in ee if x.source == "reflection"]
    assert len(refl) == n_states and len(wm) == sum(len(x.meta["alternatives"]) + 1 for x in refl)
    # a world-model answer is what the env really returns for that action in that state
    x = next(w for w in wm if w.meta["state_step"] == 1 and not w.meta["expert_action"])
    src = next(t for t in expert if t.id == x.meta["from"])
    env.reset(tasks[[t.id for t in expert].index(src.id)])
    env.step(env.message_to_action(src.messages[src.steps()[0].action]))
    assert env.step(x.meta["action"])[0] == x.messages[-1]["content"]
    assert all(len(r.steps()) == 2 and r.messages[-1]["tool_calls"] for r in refl)
    write_pool(ee, tmp_path / "ee.jsonl")
    back = load_pool(tmp_path / "ee.jsonl")
    assert [b.id for b in back] == [x.id for x in ee]
    toks = tokenize_pool(back, chatml_tokenizer)
    assert all(
        tt.n_steps == len(b.steps()) and tt.action_mask.any()
        for tt, b in zip(toks, back, strict=True)
    )


def test_early_experience_needs_a_task(env, tasks):
    expert = rollout(env, tasks[:1], ExpertPolicy(), source="expert")
    expert[0].meta.clear()
    with pytest.raises(TrajinfError, match="no task"):
        early_experience(env, expert, k=1, seed=0)
    with pytest.raises(TrajinfError, match="k must"):
        early_experience(env, expert, k=0, seed=0)
