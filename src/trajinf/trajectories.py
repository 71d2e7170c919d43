"""Trajectory schema, loaders and writers (OpenAI chat JSONL, ShareGPT, HF datasets).

Every input is normalized to OpenAI chat messages; the original record is kept in
``Trajectory.raw`` so :func:`write_pool` can write it back in its own format without loss.
Field names in errors are paths into the *original* record (``messages[3].tool_call_id``,
``conversations[2].value``); ``line`` is the 1-based line of a JSONL file, or the 1-based record
number of a ``.json`` list, an HF dataset or an in-memory list.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trajinf.errors import TrajectoryFormatError

ROLES = frozenset({"system", "user", "assistant", "tool"})
_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
}  # fmt: skip
_KNOWN = ("id", "task_id", "source", "success", "reward", "tools", "meta")


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


class _Ctx:
    """Where a record came from, to build errors naming file, line and field."""

    def __init__(self, path: str | None, line: int | None) -> None:
        self.path, self.line = path, line

    def err(self, message: str, fld: str | None = None) -> TrajectoryFormatError:
        return TrajectoryFormatError(message, path=self.path, line=self.line, field=fld)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_call(call: Any, name: str, ctx: _Ctx) -> dict:
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


def _check_messages(
    msgs: Any, names: list[str], ctx: _Ctx, key: str = "messages", content_key: str = "content"
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


def _sharegpt_messages(rec: dict, ctx: _Ctx) -> list[dict]:
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
            msgs.append(turn)  # _check_messages reports it
            continue
        frm = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = _SHAREGPT_ROLES.get(frm) if isinstance(frm, str) else None
        if role is None:
            raise ctx.err(
                f"unknown role {frm!r} (expected {sorted(_SHAREGPT_ROLES)})", f"{name}.from"
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
    return _check_messages(msgs, names, ctx, key="conversations", content_key="value")


def _opt_str(rec: dict, key: str, ctx: _Ctx) -> str | None:
    v = rec.get(key)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise ctx.err(f"must be a string, got {type(v).__name__}", key)


def _parse_record(rec: Any, fmt: str, ctx: _Ctx) -> Trajectory:
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
        messages = _check_messages(msgs, names, ctx)
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
    skip = set(_KNOWN) | ({"messages"} if fmt == "openai" else {"conversations", "system"})
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


def _strip_none(x: Any) -> Any:
    # Arrow unifies struct fields across rows and fills the missing ones with None.
    if isinstance(x, dict):
        return {k: _strip_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_strip_none(v) for v in x]
    return x


def _hf_row(row: dict) -> dict:
    row = dict(row)
    for key in ("messages", "conversations", "tools", "meta"):
        if isinstance(row.get(key), list | dict):
            row[key] = _strip_none(row[key])
    return row


def _read_records(source: Any) -> tuple[str, str, list[tuple[int, Any]]]:
    """-> (label for errors, stem for generated ids, [(line, record)])."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        label = str(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TrajectoryFormatError(f"cannot read file: {e.strerror}", path=label) from e
        if path.suffix == ".json":
            try:
                doc = json.loads(data.decode("utf-8"))
                items = doc if isinstance(doc, list) else [doc]
                return label, path.stem, [(i + 1, r) for i, r in enumerate(items)]
            except (ValueError, RecursionError):
                pass  # maybe JSONL under a .json name; the line-wise parse names the bad line
        out = []
        for n, raw in enumerate(data.split(b"\n"), start=1):
            try:
                text = raw.decode("utf-8").strip()
                if text:
                    out.append((n, json.loads(text)))
            except UnicodeDecodeError as e:
                raise TrajectoryFormatError(
                    f"not UTF-8 text: {e.reason}", path=label, line=n
                ) from e
            except (ValueError, RecursionError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                raise TrajectoryFormatError(f"malformed JSON: {msg}", path=label, line=n) from e
        return label, path.stem, out
    if hasattr(source, "column_names") and hasattr(source, "__iter__"):  # datasets.Dataset
        if isinstance(source, Mapping):
            raise TrajectoryFormatError("got a DatasetDict; pass one split, e.g. ds['train']")
        return "<dataset>", "dataset", [(i + 1, _hf_row(r)) for i, r in enumerate(source)]
    if isinstance(source, Sequence) and not isinstance(source, bytes):
        return "<records>", "records", [(i + 1, copy.deepcopy(r)) for i, r in enumerate(source)]
    raise TypeError(f"load_pool: unsupported source type {type(source).__name__}")


def load_pool(
    source: str | os.PathLike | Any, *, format: str = "auto", subtask_field: str = "task_id"
) -> list[Trajectory]:
    """Load and validate a pool of trajectories.

    ``source``: a ``.jsonl`` file (one record a line), a ``.json`` file (a list of records), an HF
    ``datasets.Dataset``, or a list of record dicts. Records are OpenAI chat (``messages``) or
    ShareGPT (``conversations``); ``format="auto"`` decides per record. Ids are generated as
    ``{stem}-{line:06d}`` (with one warning) only when no record has an id. A warning is issued
    when no trajectory has a value for ``subtask_field`` (see :func:`field_value`).
    Raises TrajectoryFormatError naming file, line and field.
    """
    if format not in ("auto", "openai", "sharegpt", "hf"):
        raise ValueError(f"load_pool: unknown format {format!r}")
    label, stem, records = _read_records(source)
    trajs = [_parse_record(rec, format, _Ctx(label, line)) for line, rec in records]
    missing = [t for t in trajs if not t.id]
    if missing and len(missing) < len(trajs):
        t = missing[0]
        raise TrajectoryFormatError(
            "missing id (some records have ids, so all need one)",
            path=label,
            line=t.origin[1],
            field="id",
        )
    if missing:
        for t in trajs:
            t.id = f"{stem}-{t.origin[1]:06d}"
        warnings.warn(
            f"{label}: no trajectory has an id; generated '{stem}-<line>' ids", stacklevel=2
        )
    first: dict[str, int] = {}
    for t in trajs:
        if t.id in first:
            raise TrajectoryFormatError(
                f"duplicate trajectory id {t.id!r} (also on line {first[t.id]})",
                path=label, line=t.origin[1], field="id",
            )  # fmt: skip
        first[t.id] = t.origin[1]
    if trajs and all(field_value(t, subtask_field) is None for t in trajs):
        warnings.warn(f"{label}: no trajectory has a '{subtask_field}' field", stacklevel=2)
    return trajs


def field_value(traj: Trajectory, name: str) -> Any:
    """Value of ``name`` for ``traj``: a Trajectory attribute, else ``extra[name]``, else
    ``meta[name]``; ``None`` when absent. Dotted names descend into dicts (``"meta.family"``)."""
    head, *rest = name.split(".")
    value = None
    if head in {f.name for f in dataclasses.fields(Trajectory)}:
        value = getattr(traj, head)
    if value is None:
        value = traj.extra.get(head, traj.meta.get(head))
    for part in rest:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def trajectory_from_messages(messages: Sequence[dict], **fields: Any) -> Trajectory:
    """Build a validated Trajectory from OpenAI messages (for envs / rollouts).

    Keyword fields matching Trajectory attributes are set; any others go to ``extra``. Without an
    ``id`` a content hash id ``traj-<12 hex>`` is used. Raises TrajectoryFormatError.
    """
    names = [f"messages[{i}]" for i in range(len(messages))]
    msgs = _check_messages(list(messages), names, _Ctx(None, None))
    known = {f.name for f in dataclasses.fields(Trajectory)} - {"messages"}
    kw = {k: v for k, v in fields.items() if k in known}
    kw["extra"] = {**kw.get("extra", {}), **{k: v for k, v in fields.items() if k not in known}}
    if not kw.get("id"):
        digest = hashlib.sha1(json.dumps(msgs, sort_keys=True, default=str).encode()).hexdigest()
        kw["id"] = f"traj-{digest[:12]}"
    kw["id"] = str(kw["id"])
    return Trajectory(messages=msgs, **kw)


def _raw_messages(t: Trajectory) -> list[dict] | None:
    """The normalized messages of ``t.raw``, or None if raw is missing/invalid."""
    if not isinstance(t.raw, dict):
        return None
    try:
        return _parse_record(t.raw, t.format, _Ctx(None, None)).messages
    except TrajectoryFormatError:
        return None


def _to_sharegpt(messages: list[dict]) -> tuple[str | None, list[dict]]:
    # Used only when messages were edited after loading. Assistant text next to tool calls has no
    # place in a function_call turn and is dropped (with a warning).
    back = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}
    system = None
    if messages and messages[0].get("role") == "system" and set(messages[0]) == {"role", "content"}:
        system, messages = messages[0]["content"], messages[1:]
    conv = []
    for m in messages:
        extra = {
            k: v for k, v in m.items() if k not in ("role", "content", "tool_calls", "tool_call_id")
        }
        if m.get("tool_calls"):
            if m.get("content"):
                warnings.warn(
                    "ShareGPT write-back drops assistant text beside tool calls", stacklevel=3
                )
            calls = []
            for c in m["tool_calls"]:
                try:
                    args = json.loads(c["function"]["arguments"])
                except ValueError:
                    args = c["function"]["arguments"]
                calls.append({"name": c["function"]["name"], "arguments": args})
            value = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            conv.append({"from": "function_call", "value": value, **extra})
        else:
            conv.append({"from": back[m["role"]], "value": m.get("content", ""), **extra})
    return system, conv


def _to_record(t: Trajectory, weights: Sequence[float] | None) -> dict:
    raw = t.raw if isinstance(t.raw, dict) else None
    # Keep the raw key order; a generated id goes first.
    rec: dict = (
        copy.deepcopy(raw) if raw is not None and "id" in raw else {"id": t.id, **(raw or {})}
    )
    rec = copy.deepcopy(rec)
    rec["id"] = t.id
    sharegpt = t.format == "sharegpt"
    for name in ("task_id", "source", "success", "reward", "meta"):
        value = getattr(t, name)
        if name in rec or value not in (None, {}):
            rec[name] = value
    raw_tools = rec.get("tools")
    if not (isinstance(raw_tools, str) and sharegpt and raw is not None and _raw_tools_equal(t)):
        if "tools" in rec or t.tools is not None:
            rec["tools"] = t.tools
    rec.update(copy.deepcopy(t.extra))
    unchanged = _raw_messages(t) == t.messages
    if sharegpt:
        if not unchanged:
            system, rec["conversations"] = _to_sharegpt(t.messages)
            rec.pop("system", None)
            if system is not None:
                rec["system"] = system
        turns = [
            c
            for c in rec["conversations"]
            if _SHAREGPT_ROLES.get(c.get("from", c.get("role"))) == "assistant"
        ]
    else:
        if not unchanged:
            rec["messages"] = copy.deepcopy(t.messages)
        turns = [m for m in rec["messages"] if m.get("role") == "assistant"]
    if weights is not None:
        if len(weights) != len(turns):
            raise ValueError(
                f"step_weights[{t.id!r}] has {len(weights)} entries but the trajectory has {len(turns)} steps"
            )
        for turn, w in zip(turns, weights, strict=True):
            turn["weight"] = float(w)
    return rec


def _raw_tools_equal(t: Trajectory) -> bool:
    try:
        return json.loads(t.raw["tools"]) == t.tools
    except (ValueError, TypeError):
        return False


def write_pool(
    trajectories: Sequence[Trajectory],
    path: str | os.PathLike,
    *,
    step_weights: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Write trajectories to ``path`` (JSONL; a JSON list if it ends in ``.json``), atomically.

    Each trajectory is written in its original format (OpenAI or ShareGPT) from its original
    record, so unknown fields and message keys survive a round trip; edited attributes and
    messages are written as edited. ``step_weights[id][k]`` becomes a ``weight`` field on the
    k-th assistant message (ShareGPT: the k-th gpt/function_call turn); its length must equal
    the number of steps.
    """
    path = Path(path)
    records = [_to_record(t, (step_weights or {}).get(t.id)) for t in trajectories]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if path.suffix == ".json":
                json.dump(records, f, ensure_ascii=False, indent=1)
            else:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
