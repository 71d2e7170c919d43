"""Chat-template tokenization: action spans, step ids, weights, truncation, template checks."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trajinf.data.chat_templates import CHATML_TOOL_TEMPLATE
from trajinf.data.tokenize import TrajectoryTooLongError, tokenize_pool, tokenize_trajectory
from trajinf.data.trajectories import load_pool, trajectory_from_messages
from trajinf.errors import TemplateError
from trajinf.models.tiny import DEFAULT_CORPUS, train_tokenizer

TEMPLATES = ["chatml", "llama3"]
HEADER = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.fixture(params=TEMPLATES)
def tok(request, chatml_tokenizer, llama3_tokenizer):
    return request.param, {"chatml": chatml_tokenizer, "llama3": llama3_tokenizer}[request.param]


def expected_action(kind: str, message: dict) -> str:
    """The text the model must produce for an assistant message, written out independently."""
    if message.get("tool_calls"):
        key = "arguments" if kind == "chatml" else "parameters"
        parts = [
            f'{{"name": "{c["function"]["name"]}", "{key}": {c["function"]["arguments"]}}}'
            for c in message["tool_calls"]
        ]
        if kind == "chatml":
            parts = [f"<tool_call>\n{p}\n</tool_call>" for p in parts]
        text = "\n".join(([message["content"]] if message["content"] else []) + parts)
    else:
        text = message["content"]
    return text + ("<|im_end|>" if kind == "chatml" else "<|eot_id|>")


def _pool(records, tmp_path, write_jsonl):
    return load_pool(write_jsonl(tmp_path, records))


def test_action_tokens_are_the_assistant_text_plus_end_token(
    tok, tool_pool_records, tmp_path, write_jsonl
):
    kind, tokenizer = tok
    for traj in _pool(tool_pool_records, tmp_path, write_jsonl):
        tt = tokenize_trajectory(traj, tokenizer)
        steps = traj.steps()
        assert tt.n_steps == len(steps) and tt.dropped_steps == 0 and tt.weights is None
        assert tt.input_ids.dtype == np.int64 and tt.step_ids.dtype == np.int32
        assert tt.action_mask.dtype == bool and not tt.action_mask[0]
        np.testing.assert_array_equal(tt.action_mask, tt.step_ids >= 0)
        for step in steps:
            idx = np.flatnonzero(tt.step_ids == step.index)
            np.testing.assert_array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
            got = tokenizer.decode(tt.input_ids[idx], skip_special_tokens=False)
            assert got == expected_action(kind, traj.messages[step.action])
            # the generation prompt right before the action is not part of it
            before = tokenizer.decode(tt.input_ids[: idx[0]], skip_special_tokens=False)
            assert before.endswith(HEADER[kind])
        full = tokenizer.apply_chat_template(traj.messages, tools=traj.tools, tokenize=False)
        assert tokenizer.decode(tt.input_ids, skip_special_tokens=False) == full


def test_weights_follow_message_weight(tok, tool_pool_records, tmp_path, write_jsonl):
    _, tokenizer = tok
    traj = _pool(tool_pool_records, tmp_path, write_jsonl)[0]
    traj.messages[traj.steps()[1].action]["weight"] = 0.0
    traj.messages[traj.steps()[2].action]["weight"] = 2.5
    tt = tokenize_trajectory(traj, tokenizer)
    assert tt.weights.dtype == np.float32
    expect = np.select([tt.step_ids == 1, tt.step_ids == 2, tt.step_ids >= 0], [0.0, 2.5, 1.0], 0.0)
    np.testing.assert_array_equal(tt.weights, expect.astype(np.float32))


def test_all_tokens_mode(tok, tool_pool_records, tmp_path, write_jsonl):
    kind, tokenizer = tok
    traj = _pool(tool_pool_records, tmp_path, write_jsonl)[1]
    a = tokenize_trajectory(traj, tokenizer)
    b = tokenize_trajectory(traj, tokenizer, action_only=False)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.step_ids, b.step_ids)
    assert not b.action_mask[0] and (b.action_mask >= a.action_mask).all()
    text = tokenizer.decode(b.input_ids[b.action_mask], skip_special_tokens=False)
    assert "You are an agent" not in text  # system block (with the tools) excluded
    assert traj.messages[1]["content"] in text  # the user goal is included
    assert HEADER[kind] in text and "ok." in text  # headers and tool results included


def test_left_truncation_drops_whole_steps(tok, tool_pool_records, tmp_path, write_jsonl):
    kind, tokenizer = tok
    traj = _pool(tool_pool_records, tmp_path, write_jsonl)[0]  # 4 steps
    full = tokenize_trajectory(traj, tokenizer)
    limit = len(full.input_ids) - 5
    with pytest.warns(UserWarning, match=r"t-0001.*dropped the first 1 of 4 steps"):
        tt = tokenize_trajectory(traj, tokenizer, max_length=limit)
    assert len(tt.input_ids) <= limit and tt.dropped_steps == 1 and tt.n_steps == 3
    assert sorted(set(tt.step_ids.tolist()) - {-1}) == [1, 2, 3]  # original step indices
    for k in (1, 2, 3):  # kept steps tokenize exactly as before
        np.testing.assert_array_equal(
            tt.input_ids[tt.step_ids == k], full.input_ids[full.step_ids == k]
        )
    text = tokenizer.decode(tt.input_ids, skip_special_tokens=False)
    assert "You are an agent" in text and "Goal: put a clean apple" in text  # head kept
    assert '"apple"' not in text.split("wash apple")[0].split("Goal")[1]  # step 0 gone
    # a tighter limit drops more steps
    with pytest.warns(UserWarning):
        tight = tokenize_trajectory(traj, tokenizer, max_length=len(tt.input_ids) - 20)
    assert tight.dropped_steps >= 2 and tight.step_ids.max() == 3


def test_too_long_raises_or_skips(chatml_tokenizer, tool_pool_records, tmp_path, write_jsonl):
    pool = _pool(tool_pool_records, tmp_path, write_jsonl)
    with pytest.raises(TrajectoryTooLongError, match="t-0001"):
        tokenize_trajectory(pool[0], chatml_tokenizer, max_length=10)
    with pytest.warns(UserWarning, match="skipped"):
        out = tokenize_pool(pool, chatml_tokenizer, max_length=10, on_too_long="skip")
    assert out == []
    ok = tokenize_pool(pool, chatml_tokenizer)
    assert [t.id for t in ok] == [t.id for t in pool]


def _bad_tokenizer(template: str):
    return train_tokenizer(
        DEFAULT_CORPUS[:5], vocab_size=300, template=template, eos_token="<|end|>"
    )


def test_non_prefix_stable_template_raises(tool_pool_records, tmp_path, write_jsonl):
    traj = _pool(tool_pool_records, tmp_path, write_jsonl)[0]
    # Prints the number of messages first: every render changes earlier text.
    counting = "{{ messages|length }}{% for m in messages %}{{ m.role }}: {{ m.content }}<|end|>{% endfor %}"
    with pytest.raises(TemplateError, match="not prefix-stable"):
        tokenize_trajectory(traj, _bad_tokenizer(counting))
    # Generation prompt that the assistant turn does not start with.
    odd_prompt = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>Sure!{% endif %}"
    )
    with pytest.raises(TemplateError, match="generation prompt"):
        tokenize_trajectory(traj, _bad_tokenizer(odd_prompt))


def test_qwen_style_merged_tool_results_still_work(chatml_tokenizer):
    # Qwen2.5 merges consecutive tool results into one user block: not prefix-stable between the
    # two tool messages, but no action boundary lies there, so the action spans are still exact.
    merged = CHATML_TOOL_TEMPLATE.replace(
        "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}",
        "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}",
    )
    assert merged != CHATML_TOOL_TEMPLATE
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = merged
    fn = {"name": "f", "arguments": "{}"}
    msgs = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": fn}, {"id": "b", "type": "function", "function": fn}]},
        {"role": "tool", "tool_call_id": "a", "content": "r1"},
        {"role": "tool", "tool_call_id": "b", "content": "r2"},
        {"role": "assistant", "content": "done"},
    ]  # fmt: skip
    traj = trajectory_from_messages(msgs)
    tt = tokenize_trajectory(traj, tokenizer)
    decoded = [
        tokenizer.decode(tt.input_ids[tt.step_ids == k], skip_special_tokens=False) for k in (0, 1)
    ]
    assert decoded == [expected_action("chatml", msgs[1]), "done<|im_end|>"]
    text = tokenizer.decode(tt.input_ids, skip_special_tokens=False)
    assert "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2" in text
    # ...but a template that rewrites text before an action is rejected
    tokenizer.chat_template = merged.replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant' ~ loop.length ~ '\\n'"
    )
    assert tokenizer.chat_template != merged
    with pytest.raises(TemplateError, match="prefix-stable"):
        tokenize_trajectory(traj, tokenizer)


def test_missing_chat_template_is_a_template_error(chatml_tokenizer):
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = None
    traj = trajectory_from_messages(
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    )
    with pytest.raises(TemplateError):
        tokenize_trajectory(traj, tokenizer)


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@st.composite
def _trajectories(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(_text)})
    msgs.append({"role": "user", "content": draw(_text)})
    n_calls = 0
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            calls = []
            for _ in range(draw(st.integers(1, 2))):
                args = json.dumps({"x": draw(_text)}, ensure_ascii=draw(st.booleans()))
                calls.append(
                    {
                        "id": f"c{n_calls}",
                        "type": "function",
                        "function": {"name": "act", "arguments": args},
                    }
                )
                n_calls += 1
            msgs.append(
                {
                    "role": "assistant",
                    "content": draw(st.sampled_from(["", "thinking"])),
                    "tool_calls": calls,
                }
            )
            msgs += [
                {"role": "tool", "tool_call_id": c["id"], "content": draw(_text)} for c in calls
            ]
        else:
            msgs.append({"role": "assistant", "content": draw(_text)})
            if draw(st.booleans()):
                msgs.append({"role": "user", "content": draw(_text)})
    return trajectory_from_messages(msgs, tools=draw(st.sampled_from([None, [{"type": "function", "function": {"name": "act"}}]])))  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(traj=_trajectories(), kind=st.sampled_from(TEMPLATES), cut=st.integers(0, 60))
def test_random_trajectories_have_consistent_step_ids(
    traj, kind, cut, chatml_tokenizer, llama3_tokenizer
):
    tokenizer = chatml_tokenizer if kind == "chatml" else llama3_tokenizer
    tt = tokenize_trajectory(traj, tokenizer)
    n = len(traj.steps())
    assert tt.n_steps == n and not tt.action_mask[0]
    full = tokenizer.apply_chat_template(traj.messages, tools=traj.tools, tokenize=False)
    assert tokenizer.decode(tt.input_ids, skip_special_tokens=False) == full
    _check_step_layout(tt, range(n))
    # truncated: whole steps dropped from the left, original ids, still contiguous and ordered
    limit = max(1, len(tt.input_ids) - cut)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            short = tokenize_trajectory(traj, tokenizer, max_length=limit)
        except TrajectoryTooLongError:
            return
    assert len(short.input_ids) <= limit and short.n_steps + short.dropped_steps == n
    _check_step_layout(short, range(short.dropped_steps, n))


def _check_step_layout(tt, expected_steps):
    ids = tt.step_ids
    seen = ids[ids >= 0]
    # steps appear in increasing order and each one is a single contiguous, non-empty block
    assert (np.diff(seen) >= 0).all()
    assert sorted(set(seen.tolist())) == list(expected_steps)
    for k in expected_steps:
        idx = np.flatnonzero(ids == k)
        assert len(idx) > 0 and idx[-1] - idx[0] + 1 == len(idx)


def _varied_long(n_steps: int):
    """A system + goal head and ``n_steps`` steps of uneven length (tool calls, weights)."""
    rng = np.random.default_rng(0)
    msgs = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "go"}]
    for k in range(n_steps):
        words = " ".join(["open the door"] * int(rng.integers(1, 6)))
        if k % 3 == 0:
            call = {"id": f"c{k}", "type": "function",
                    "function": {"name": "act", "arguments": json.dumps({"x": words})}}  # fmt: skip
            msgs += [
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"c{k}", "content": f"ok {k}"},
            ]
        else:
            msgs += [
                {"role": "assistant", "content": f"step {k}: {words}", "weight": 0.5 + k % 2},
                {"role": "user", "content": "next"},
            ]
    return trajectory_from_messages(msgs, id="varied")


def test_pretrimmed_truncation_equals_exhaustive_left_truncation(tok):
    # Reference: the definition of left truncation, computed the slow way on every candidate
    # start d (head + steps[d:] tokenized without max_length); the fast path must match exactly.
    _, tokenizer = tok
    traj = _varied_long(60)
    steps = traj.steps()
    head = traj.messages[: steps[0].action]
    kept = [trajectory_from_messages(head + traj.messages[s.action :], id="varied") for s in steps]
    lens = [
        len(
            tokenizer(
                tokenizer.apply_chat_template(t.messages, tokenize=False), add_special_tokens=False
            )["input_ids"]
        )
        for t in kept
    ]
    per_step = lens[0] / len(steps)
    for action_only in (True, False):
        for max_length in (int(per_step * 10), int(per_step * 17) + 3, lens[-1], lens[1]):
            d = next(d for d in range(1, len(steps)) if lens[d] <= max_length)
            ref = tokenize_trajectory(kept[d], tokenizer, action_only=action_only)
            with pytest.warns(UserWarning, match=f"dropped the first {d} of 60 steps"):
                got = tokenize_trajectory(
                    traj, tokenizer, max_length=max_length, action_only=action_only
                )
            assert (got.dropped_steps, got.n_steps) == (d, 60 - d) and got.id == ref.id
            np.testing.assert_array_equal(got.input_ids, ref.input_ids)
            np.testing.assert_array_equal(got.action_mask, ref.action_mask)
            np.testing.assert_array_equal(
                got.step_ids, np.where(ref.step_ids >= 0, ref.step_ids + d, -1)
            )
            np.testing.assert_array_equal(got.weights, ref.weights)
    with pytest.raises(TrajectoryTooLongError, match="varied"):
        tokenize_trajectory(traj, tokenizer, max_length=lens[-1] - 1)
