"""ModelPolicy(reuse_cache=True): an episode's prompt KV cache carried across steps gives the
scores of scoring every candidate sequence in full; a template that drops tool calls is refused."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest

from trajinf.envs.base import Task
from trajinf.envs.model_policy import _CACHE_NOTE, ModelPolicy
from trajinf.envs.rollout import EpisodeState
from trajinf.errors import TemplateError
from trajinf.models.tiny import tiny_model

ITEMS = ("apple", "key", "coin", "lamp", "front door")


def _many(n: int) -> list[str]:
    return [f"take thing{i}" for i in range(n)]


class CallEnv:
    """Actions ``take X`` are tool calls answered by tool messages."""

    name = "calls"

    def action_to_message(self, action: str) -> dict:
        fn = {"name": "take", "arguments": json.dumps({"item": action.split(" ", 1)[1]})}
        return {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": fn}]}  # fmt: skip

    def message_to_action(self, message: dict) -> str:
        return "take " + json.loads(message["tool_calls"][0]["function"]["arguments"])["item"]


def _episode(goal: str) -> EpisodeState:
    return EpisodeState(
        env=CallEnv(),  # type: ignore[arg-type]
        task=Task(id=goal, family="f", split="test", seed=0, goal=goal),
        k=0,
        messages=[
            {"role": "system", "content": "You fetch things."},
            {"role": "user", "content": f"Goal: {goal}."},
        ],
        tools=None,
        valid_actions=[f"take {i}" for i in ITEMS],
        rng=random.Random(0),
    )


def _advance(ep: EpisodeState, action: str, step: int) -> None:
    ep.messages.append(ep.env.action_to_message(action))
    ep.messages.append({"role": "tool", "tool_call_id": "c", "content": f"Step {step}: ok."})
    ep.valid_actions = [f"take {i}" for i in ITEMS[: 2 + step % 4]]


@pytest.mark.parametrize("history_window", [None, 1])
def test_cache_across_steps_matches_full_scoring(chatml_tokenizer, history_window):
    model = tiny_model(chatml_tokenizer, hidden=32, layers=2, heads=2, seed=3)
    cached = ModelPolicy(model, chatml_tokenizer, reuse_cache=True, history_window=history_window)
    full = ModelPolicy(model, chatml_tokenizer, share_prefix=False, history_window=history_window)
    assert cached.reuse_cache
    eps = [_episode("eat"), _episode("read the lamp manual")]
    for step in range(5):
        ref = full.score_actions(copy.deepcopy(eps))
        got = cached.score_actions(eps)
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-4)
        assert all(_CACHE_NOTE in ep.notes for ep in eps)
        for k, ep in enumerate(eps):
            _advance(ep, ep.valid_actions[(step + k) % len(ep.valid_actions)], step)
    # more candidates than one chunk of the cache path
    for ep in eps:
        ep.valid_actions = _many(37)
    ref = full.score_actions(copy.deepcopy(eps))
    for g, r in zip(cached.score_actions(eps), ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4)
    # the cache holds exactly the last prompt's tokens
    ids, cache = eps[0].notes[_CACHE_NOTE]
    assert cache.get_seq_length() == len(ids)


def test_policy_refuses_template_that_drops_tool_calls(chatml_tokenizer):
    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    model = tiny_model(tok, hidden=32, layers=1, heads=2)
    with pytest.raises(TemplateError, match="tool-call name"):
        ModelPolicy(model, tok).act([_episode("eat")])
