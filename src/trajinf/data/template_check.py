"""Refuse chat templates that silently drop what an agent did.

Many instruct models' templates render only ``message['content']`` (SmolLM2's does), so an
assistant message that is only a tool call renders as an empty turn: training and scoring would
then run on empty actions without a word. :func:`check_chat_template` renders a small probe
conversation (a tool call, its result, a plain answer) and raises a one-line TemplateError naming
the model, what was lost and the fix when a part the data uses is missing from its turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from trajinf.data.chat_templates import CHAT_TEMPLATES
from trajinf.errors import TemplateError

_NAME, _ARG, _RESULT, _ANSWER = "probe_lookup", "zq7 probe argument", "zq7 probe result", "zq7 done"
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _NAME,
            "description": "Look something up.",
            "parameters": {
                "type": "object",
                "properties": {"item": {"type": "string"}},
                "required": ["item"],
            },
        },
    }
]
PROBE_MESSAGES = [
    {"role": "system", "content": "You are a careful agent."},
    {"role": "user", "content": "Look up the item."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": _NAME, "arguments": json.dumps({"item": _ARG})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": _RESULT},
    {"role": "assistant", "content": _ANSWER},
]
FIX = f"pass --chat-template {' or '.join(CHAT_TEMPLATES)} (or a Jinja file that renders them)"


def model_name(tokenizer) -> str:
    """The name a message should use for the model behind ``tokenizer``."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _render(tokenizer, messages: list[dict], tools, gen: bool = False) -> str:
    try:
        out = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=gen
        )
    except Exception as e:  # jinja / transformers raise many types; all mean "template failed"
        raise TemplateError(
            f"{model_name(tokenizer)}: chat template failed on a tool-call conversation ({e}); "
            f"{FIX}"
        ) from e
    return str(out)


def _turn(tokenizer, k: int, tools) -> str:
    """Rendered text of PROBE_MESSAGES[k]: the render of messages[:k+1] after that of [:k]
    (after the generation prompt for an assistant turn, so a header is not an action)."""
    before = _render(tokenizer, PROBE_MESSAGES[:k], tools, PROBE_MESSAGES[k]["role"] == "assistant")
    after = _render(tokenizer, PROBE_MESSAGES[: k + 1], tools)
    if not after.startswith(before):
        # not prefix-stable here: tokenize.py refuses such templates with its own message; the
        # probe still looks for the parts in what the turn added
        return after
    return after[len(before) :]


def lost_parts(tokenizer, *, tool_calls: bool = True, tool_results: bool = True) -> list[str]:
    """What the tokenizer's chat template drops of the probe conversation (empty: nothing)."""
    lost = []
    tools = PROBE_TOOLS if tool_calls else None
    if tool_calls:
        call = _turn(tokenizer, 2, tools)
        if _NAME not in call:
            lost.append("the assistant's tool-call name")
        if _ARG not in call:
            lost.append("the tool-call arguments")
    if tool_results and _RESULT not in _turn(tokenizer, 3, tools):
        lost.append("the tool result's content")
    if _ANSWER not in _turn(tokenizer, 4, tools):
        lost.append("the assistant's text content")
    return lost


def check_chat_template(
    tokenizer, *, tool_calls: bool = True, tool_results: bool = True, where: str = ""
) -> None:
    """Raise TemplateError (one line: model, what was lost, fix) if the chat template drops the
    tool calls, tool results (when the data has them) or assistant text."""
    lost = lost_parts(tokenizer, tool_calls=tool_calls, tool_results=tool_results)
    if lost:
        ctx = f" ({where})" if where else ""
        raise TemplateError(
            f"{model_name(tokenizer)}: its chat template drops {', '.join(lost)}{ctx}, so actions "
            f"would be trained and scored as empty turns; {FIX}"
        )


def data_uses(messages_lists: Iterable[Sequence[dict]]) -> tuple[bool, bool]:
    """(any assistant tool call, any tool result) over conversations."""
    calls = results = False
    for messages in messages_lists:
        for m in messages:
            calls = calls or (m.get("role") == "assistant" and bool(m.get("tool_calls")))
            results = results or m.get("role") == "tool"
        if calls and results:
            break
    return calls, results


def check_template_for(tokenizer, trajectories: Sequence, *, where: str = "") -> None:
    """:func:`check_chat_template` for the parts ``trajectories`` (objects with ``messages``)
    use: a pool without tool calls does not need a tool-aware template."""
    calls, results = data_uses(t.messages for t in trajectories)
    check_chat_template(tokenizer, tool_calls=calls, tool_results=results, where=where)
