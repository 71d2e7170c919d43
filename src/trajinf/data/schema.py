"""The trajectory schema (:class:`Trajectory`, :class:`Step`) and validation of one record
(OpenAI chat or ShareGPT) into it. Errors name the field as a path into the original record."""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from trajinf.errors import TrajectoryFormatError

ROLES = frozenset({"system", "user", "assistant", "tool"})
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
}  # fmt: skip
KNOWN_FIELDS = ("id", "task_id", "source", "success", "reward", "tools", "meta")


@dataclass
class Step:
    """One agent step: an assistant message (the action) plus the messages that follow it."""

    index: int
    action: int
    consequences: list[int]


@dataclass
class Trajectory:
    """One agent trajectory in normalized OpenAI chat form."""

    id: str
    messages: list[dict]
    task_id: str | None = None
    source: str | None = None
    success: bool | None = None
    reward: float | None = None
    tools: list[dict] | None = None
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    origin: tuple[str, int] | None = None
    format: str = "openai"
    raw: dict | None = None

    def steps(self) -> list[Step]:
        """Steps in order: one per assistant message, with the non-assistant messages after it."""
        out: list[Step] = []
        for i, m in enumerate(self.messages):
            if m.get("role") == "assistant":
                out.append(Step(index=len(out), action=i, consequences=[]))
            elif out:
                out[-1].consequences.append(i)
        return out


class RecordContext:
    """Where a record came from, to build errors naming file, line and field."""

    def __init__(self, path: str | None, line: int | None) -> None:
        self.path, self.line = path, line

    def err(self, message: str, fld: str | None = None) -> TrajectoryFormatError:
        return TrajectoryFormatError(message, path=self.path, line=self.line, field=fld)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_call(call: Any, name: str, ctx: RecordContext) -> dict:
    if not isinstance(call, dict):
        raise ctx.err("a tool call must be an object", name)
    call = dict(call)
    if not isinstance(call.get("id"), str) or not call["id"]:
        raise ctx.err("tool call has no string id", f"{name}.id")
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise ctx.err("tool call needs a 'function' object", f"{name}.function")
    fn = dict(fn)
    if not isinstance(fn.get("name"), str):
        raise ctx.err("tool call function has no string name", f"{name}.function.name")
    args = fn.get("arguments", "{}")
    if isinstance(args, dict | list):
        try:  # the OpenAI form is a JSON string; accept objects and serialize them
            args = json.dumps(args, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise ctx.err(
                f"arguments are not JSON-serializable: {e}", f"{name}.function.arguments"
            ) from e
    elif not isinstance(args, str):
        raise ctx.err(
            f"arguments must be a JSON string, got {type(args).__name__}",
            f"{name}.function.arguments",
        )
    fn["arguments"] = args
    call["function"] = fn
    call.setdefault("type", "function")
    return call


def check_messages(
    msgs: Any,
    names: list[str],
    ctx: RecordContext,
    key: str = "messages",
    content_key: str = "content",
) -> list[dict]:
    """Validate and normalize OpenAI messages. ``names[i]`` is message i's path in the record."""
    if not isinstance(msgs, list):
        raise ctx.err("must be a list of messages", key)
    if not msgs:
        raise ctx.err("trajectory has no messages", key)
    out: list[dict] = []
    call_ids: set[str] = set()
    for i, m in enumerate(msgs):
        name = names[i]
        if not isinstance(m, dict):
            raise ctx.err("a message must be an object", name)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            rkey = "from" if content_key == "value" else "role"
            raise ctx.err(
                f"unknown role {role!r} (expected one of {sorted(ROLES)})", f"{name}.{rkey}"
            )
        m = dict(m)
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ctx.err("only assistant messages may carry tool_calls", f"{name}.tool_calls")
            if not isinstance(calls, list):
                raise ctx.err("tool_calls must be a list", f"{name}.tool_calls")
            m["tool_calls"] = [
                _check_call(c, f"{name}.tool_calls[{j}]", ctx) for j, c in enumerate(calls)
            ]
            for j, c in enumerate(m["tool_calls"]):
                if c["id"] in call_ids:
                    raise ctx.err(
                        f"tool_call id {c['id']!r} is reused", f"{name}.tool_calls[{j}].id"
                    )
                call_ids.add(c["id"])
            if m.get("content") is None:  # an assistant message may be tool calls only
                m["content"] = ""
        if not isinstance(m.get("content"), str):
            got = type(m.get("content")).__name__
            raise ctx.err(f"content must be a string, got {got}", f"{name}.{content_key}")
        if role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or cid not in call_ids:
                raise ctx.err(
                    f"tool result {cid!r} has no matching earlier tool call id",
                    f"{name}.tool_call_id",
                )
        if "weight" in m and not _is_number(m["weight"]):
            raise ctx.err(f"weight must be a finite number, got {m['weight']!r}", f"{name}.weight")
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise ctx.err("trajectory has no assistant message", key)
    return out


def _sharegpt_messages(rec: dict, ctx: RecordContext) -> list[dict]:
    """Convert a ShareGPT record to OpenAI messages, one assistant message per gpt/function_call
    turn (so step k is the k-th such turn). Tool call ids are ``call_{n}`` (n counts calls in the
    trajectory, so ids survive moving the system prompt); observations answer pending calls
    first-in first-out."""
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        raise ctx.err("must be a list of turns", "conversations")
    msgs: list[Any] = []
    names: list[str] = []
    if rec.get("system") is not None:
        if not isinstance(rec["system"], str):
            raise ctx.err(f"must be a string, got {type(rec['system']).__name__}", "system")
        msgs.append({"role": "system", "content": rec["system"]})
        names.append("system")
    pending: deque[str] = deque()
    n_calls = 0
    for i, turn in enumerate(conv):
        name = f"conversations[{i}]"
        names.append(name)
        if not isinstance(turn, dict):
            msgs.append(turn)  # check_messages reports it
            continue
        frm = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = SHAREGPT_ROLES.get(frm) if isinstance(frm, str) else None
        if role is None:
            raise ctx.err(
                f"unknown role {frm!r} (expected {sorted(SHAREGPT_ROLES)})", f"{name}.from"
            )
        m = {k: v for k, v in turn.items() if k not in ("from", "value", "role", "content")}
        if frm == "function_call":
            try:
                parsed = json.loads(value) if isinstance(value, str) else value
            except (ValueError, RecursionError) as e:
                raise ctx.err(f"function_call value is not valid JSON: {e}", f"{name}.value") from e
            calls = parsed if isinstance(parsed, list) else [parsed]
            tool_calls = []
            for c in calls:
                if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                    raise ctx.err("function_call must be JSON {name, arguments}", f"{name}.value")
                args = c.get("arguments", c.get("parameters", {}))
                fn = {"name": c["name"], "arguments": args}
                cid = f"call_{n_calls}"
                n_calls += 1
                tool_calls.append({"id": cid, "type": "function", "function": fn})
                pending.append(cid)
            m.update(role="assistant", content="", tool_calls=tool_calls)
        elif role == "tool":
            if not pending:
                raise ctx.err("tool result has no matching earlier function_call", name)
            m.update(role="tool", tool_call_id=pending.popleft(), content=value)
        else:
            m.update(role=role, content=value)
        msgs.append(m)
    return check_messages(msgs, names, ctx, key="conversations", content_key="value")


def _opt_str(rec: dict, key: str, ctx: RecordContext) -> str | None:
    v = rec.get(key)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise ctx.err(f"must be a string, got {type(v).__name__}", key)


def parse_record(rec: Any, fmt: str, ctx: RecordContext) -> Trajectory:
    """One record -> Trajectory (id '' when missing; the caller assigns ids)."""
    if not isinstance(rec, dict):
        raise ctx.err(f"a trajectory must be a JSON object, got {type(rec).__name__}")
    if fmt in ("auto", "hf"):
        fmt = "openai" if "messages" in rec else "sharegpt" if "conversations" in rec else ""
        if not fmt:
            raise ctx.err("record has neither 'messages' (OpenAI) nor 'conversations' (ShareGPT)")
    if fmt == "openai":
        msgs = rec.get("messages")
        names = [f"messages[{i}]" for i in range(len(msgs))] if isinstance(msgs, list) else []
        messages = check_messages(msgs, names, ctx)
    else:
        messages = _sharegpt_messages(rec, ctx)
    success, reward, meta, tools = (rec.get(k) for k in ("success", "reward", "meta", "tools"))
    if success is not None and not isinstance(success, bool):
        raise ctx.err(f"must be true/false, got {success!r}", "success")
    if reward is not None and not (
        isinstance(reward, int | float) and not isinstance(reward, bool)
    ):
        raise ctx.err(f"must be a number, got {reward!r}", "reward")
    if meta is not None and not isinstance(meta, dict):
        raise ctx.err(f"must be an object, got {type(meta).__name__}", "meta")
    if fmt == "sharegpt" and isinstance(tools, str):  # LLaMA-Factory stores tools as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except (ValueError, RecursionError) as e:
            raise ctx.err(f"tools string is not valid JSON: {e}", "tools") from e
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise ctx.err("must be a list of tool schema objects", "tools")
    skip = set(KNOWN_FIELDS) | ({"messages"} if fmt == "openai" else {"conversations", "system"})
    return Trajectory(
        id=_opt_str(rec, "id", ctx) or "",
        messages=messages,
        task_id=_opt_str(rec, "task_id", ctx),
        source=_opt_str(rec, "source", ctx),
        success=success,
        reward=None if reward is None else float(reward),
        tools=tools,
        meta=dict(meta or {}),
        extra={k: v for k, v in rec.items() if k not in skip},
        origin=(ctx.path, ctx.line) if ctx.path is not None else None,
        format=fmt,
        raw=rec,
    )
