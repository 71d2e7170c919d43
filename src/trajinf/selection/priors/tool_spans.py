"""Token spans of tool calls inside actions, to restrict credit or influence to them (ToolPO).

Template-agnostic: for an assistant message with tool calls, render the conversation up to it
twice, with the message as is and with its tool calls replaced by a private-use marker
character appended to the content; the two renders share the text before the calls and the
end-of-turn text after them, and the marker matches nothing, so what lies between the longest
common prefix and the longest common suffix is exactly the rendered tool calls (without the
marker, an insertion like ``<tool_call>`` before ``<|im_end|>`` would align one ``<`` off) (for ChatML
``<tool_call>{...}</tool_call>``, for Llama 3 the ``{"name": ..., "parameters": ...}`` JSON).
Character spans map to tokens like ``trajinf.data.tokenize`` does (a token belongs to the span
holding its first character).
"""

from __future__ import annotations

import os

import numpy as np

from trajinf.data.schema import Trajectory
from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError

_MARK = "\ue000"  # a private-use character: no template or tool call prints it


def _render(tokenizer, messages: list[dict], tools) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)


def _kept_messages(traj: Trajectory, tokenized: TokenizedTrajectory) -> list[dict]:
    """The messages ``tokenize_trajectory`` rendered (left truncation drops whole steps)."""
    d = tokenized.dropped_steps
    if not d:
        return traj.messages
    steps = traj.steps()
    return traj.messages[: steps[0].action] + traj.messages[steps[d].action :]


def tool_call_spans(
    traj: Trajectory, tokenized: TokenizedTrajectory, tokenizer
) -> list[tuple[int, int, int]]:
    """(step, first token, end token) of each action's rendered tool calls, in step order.

    ``tokenized`` must be ``tokenize_trajectory(traj, tokenizer, ...)``; steps without tool calls
    have no span. Raises TrajinfError when the render does not reproduce ``tokenized``'s ids.
    """
    messages = _kept_messages(traj, tokenized)
    full = _render(tokenizer, messages, traj.tools)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    if not np.array_equal(np.asarray(enc["input_ids"]), tokenized.input_ids):
        raise TrajinfError(
            f"trajectory {traj.id!r}: tokenized ids differ from this tokenizer's render; "
            "pass the tokenizer that produced them"
        )
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts = np.maximum.accumulate(offsets[:, 0]) if len(offsets) else offsets[:, 0]
    out = []
    step = tokenized.dropped_steps
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        if m.get("tool_calls"):
            with_calls = _render(tokenizer, messages[: i + 1], traj.tools)
            bare = {k: v for k, v in m.items() if k != "tool_calls"}
            bare["content"] = str(m.get("content") or "") + _MARK
            without = _render(tokenizer, [*messages[:i], bare], traj.tools)
            a = len(os.path.commonprefix([with_calls, without]))
            b = len(os.path.commonprefix([with_calls[::-1], without[::-1]]))
            end = max(a, len(with_calls) - b)
            lo, hi = np.searchsorted(starts, [a, end], side="left")
            if hi > lo:
                out.append((step, int(lo), int(hi)))
        step += 1
    return out


def tool_call_mask(traj: Trajectory, tokenized: TokenizedTrajectory, tokenizer) -> np.ndarray:
    """bool [T]: action tokens (``tokenized.action_mask``) inside a tool call's rendering.

    Multiply it into a per-token loss weight or feature mask to restrict influence to tool calls.
    """
    mask = np.zeros(len(tokenized.input_ids), dtype=bool)
    for _, lo, hi in tool_call_spans(traj, tokenized, tokenizer):
        mask[lo:hi] = True
    return mask & tokenized.action_mask
