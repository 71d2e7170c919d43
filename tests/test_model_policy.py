"""model_policy.py: rank mode picks trained actions, batching/prefix sharing does not change scores,
generate mode returns parseable actions, seeded sampling, reply parsing, history windows."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from trajinf.data.schema import Trajectory
from trajinf.envs.base import Task
from trajinf.envs.model_policy import ModelPolicy, parse_reply, window_messages
from trajinf.envs.rollout import EpisodeState
from trajinf.errors import TrajinfError
from trajinf.models.tiny import tiny_model
from trajinf.train.sft import TrainConfig, train_sft

ITEMS = ("apple", "key", "coin", "lamp")
SYSTEM = "You are an agent in a text world."


class FetchEnv:
    """Minimal env: every action ``take X`` is a ``take`` tool call (ChatML ``<tool_call>``)."""

    name = "fetch"
    tool_schema = None

    def action_to_message(self, action: str) -> dict:
        verb, item = action.split(" ", 1)
        fn = {"name": verb, "arguments": json.dumps({"item": item})}
        return {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": fn}]}  # fmt: skip

    def message_to_action(self, message: dict) -> str:
        calls = message.get("tool_calls") or []
        if not calls:
            raise TrajinfError("no tool call")
        fn = calls[0]["function"]
        return f"{fn['name']} {json.loads(fn['arguments'])['item']}"


# goal verb -> the two items to take, in order: conditional on the goal, no copying needed
GOALS = {"eat": ("apple", "key"), "open": ("key", "coin"), "buy": ("coin", "lamp"), "read": ("lamp", "apple")}  # fmt: skip


def _messages(goal: str, steps: int) -> list[dict]:
    env = FetchEnv()
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Goal: {goal}."},
    ]
    for item in GOALS[goal][:steps]:
        msgs.append(env.action_to_message(f"take {item}"))
        msgs.append({"role": "tool", "tool_call_id": "c", "content": f"You take the {item}."})
    return msgs


def _episode(goal: str, steps: int) -> EpisodeState:
    return EpisodeState(
        env=FetchEnv(),  # type: ignore[arg-type]
        task=Task(id=goal, family="fetch", split="test", seed=0, goal=goal),
        k=0,
        messages=_messages(goal, steps),
        tools=None,
        valid_actions=[f"take {i}" for i in ITEMS],
        rng=random.Random(0),
        step=steps,
    )


CASES = [(g, s) for g in GOALS for s in (0, 1)]


@pytest.fixture(scope="module")
def trained(chatml_tokenizer):
    """A tiny model overfit on the four two-step fetch trajectories."""
    trajs = [Trajectory(id=g, messages=_messages(g, 2)) for g in GOALS]
    model = tiny_model(chatml_tokenizer, hidden=64, layers=2, heads=4, seed=0)
    # ~150 full-batch steps: tiny models from scratch sit on a plateau (ignoring the goal) for
    # the first ~50
    cfg = TrainConfig(epochs=150, lr=3e-3, batch_size=4, warmup_ratio=0.0, scheduler="constant")
    res = train_sft(model, chatml_tokenizer, trajs, cfg)
    assert res.losses[-1] < 0.02, res.losses[-5:]
    return res.model


def test_rank_mode_picks_the_trained_actions(trained, chatml_tokenizer):
    policy = ModelPolicy(trained, chatml_tokenizer)
    chosen = policy.act([_episode(g, s) for g, s in CASES])
    want = [f"take {GOALS[g][s]}" for g, s in CASES]
    assert chosen == want


def test_prefix_sharing_and_batching_do_not_change_scores(trained, chatml_tokenizer):
    episodes = [_episode(g, s) for g in GOALS for s in (0, 1, 2)]
    shared = ModelPolicy(trained, chatml_tokenizer, batch_size=4).score_actions(episodes)
    full = ModelPolicy(trained, chatml_tokenizer, share_prefix=False, batch_size=64)
    one = ModelPolicy(trained, chatml_tokenizer, share_prefix=False, batch_size=1)
    assert ModelPolicy(trained, chatml_tokenizer).share_prefix  # the fast path is the default
    for s, f, o in zip(
        shared, full.score_actions(episodes), one.score_actions(episodes), strict=True
    ):
        np.testing.assert_allclose(s, o, atol=1e-3)
        np.testing.assert_allclose(f, o, atol=1e-3)
    # each episode alone gives the same scores as inside a batch
    alone = [ModelPolicy(trained, chatml_tokenizer).score_actions([ep])[0] for ep in episodes]
    for s, a in zip(shared, alone, strict=True):
        np.testing.assert_allclose(s, a, atol=1e-3)
    # candidate scores are log-probabilities of the whole assistant message
    assert all((s < 0).all() for s in shared)


def test_generate_mode_returns_parseable_action(trained, chatml_tokenizer):
    policy = ModelPolicy(trained, chatml_tokenizer, mode="generate", max_new_tokens=40)
    episodes = [_episode("open", 0), _episode("buy", 1)]
    assert policy.act(episodes) == ["take key", "take lamp"]
    text = policy.generate_text(policy.prompt_text(episodes[0]))
    assert "<tool_call>" in text and "<|im_end|>" not in text


def test_sampling_is_seeded_and_diverse(chatml_tokenizer):
    model = tiny_model(chatml_tokenizer, hidden=32, layers=1, heads=2, seed=1)  # untrained
    ep = _episode("eat", 0)

    def draws(seed: int) -> list[str]:
        policy = ModelPolicy(model, chatml_tokenizer, temperature=50.0, seed=seed)
        return [policy.act([ep])[0] for _ in range(12)]

    assert draws(0) == draws(0)
    assert len(set(draws(0))) > 1  # a hot temperature explores
    greedy = ModelPolicy(model, chatml_tokenizer)
    assert len({greedy.act([ep])[0] for _ in range(3)}) == 1


def test_episodes_without_valid_actions_fall_back_to_generation(trained, chatml_tokenizer):
    ep = replace(_episode("read", 0), valid_actions=None)
    assert ModelPolicy(trained, chatml_tokenizer).act([ep]) == ["take lamp"]


def test_bad_arguments():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TrajinfError, match="mode"):
        ModelPolicy(model, None, mode="beam")
    with pytest.raises(TrajinfError, match="temperature"):
        ModelPolicy(model, None, temperature=-1)


def test_parse_reply_forms():
    chatml = '<tool_call>\n{"name": "take", "arguments": {"item": "key"}}\n</tool_call>'
    msg = parse_reply(chatml)
    fn = msg["tool_calls"][0]["function"]
    assert fn["name"] == "take" and json.loads(fn["arguments"]) == {"item": "key"}
    assert msg["content"] == ""
    llama = '{"name": "open", "parameters": {"target": "door"}}'
    fn = parse_reply(llama)["tool_calls"][0]["function"]
    assert fn["name"] == "open" and json.loads(fn["arguments"]) == {"target": "door"}
    assert parse_reply("  look around \n") == {"role": "assistant", "content": "look around"}
    assert "tool_calls" not in parse_reply("<tool_call>\n{not json")
    two = parse_reply(chatml + "\n" + chatml.replace("key", "coin"))
    assert [c["id"] for c in two["tool_calls"]] == ["call_0", "call_1"]


def test_window_messages_keeps_goal_and_last_steps():
    msgs = _messages("eat", 2)  # system, user, (assistant, tool) x 2
    assert window_messages(msgs, None) == msgs
    assert window_messages(msgs, 5) == msgs
    one = window_messages(msgs, 1)
    assert one == msgs[:2] + msgs[4:]
    assert window_messages(msgs, 0) == msgs[:2]
