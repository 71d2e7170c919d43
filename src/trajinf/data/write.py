"""Write trajectories back in their own format (OpenAI chat or ShareGPT), losslessly from the
original record, with optional per-step ``weight`` fields; atomically."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from trajinf.atomic import atomic_write
from trajinf.data.schema import SHAREGPT_ROLES, RecordContext, Trajectory, parse_record
from trajinf.errors import TrajectoryFormatError


def _raw_messages(t: Trajectory) -> list[dict] | None:
    """The normalized messages of ``t.raw``, or None if raw is missing/invalid."""
    if not isinstance(t.raw, dict):
        return None
    try:
        return parse_record(t.raw, t.format, RecordContext(None, None)).messages
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
            if SHAREGPT_ROLES.get(c.get("from", c.get("role"))) == "assistant"
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
    if path.suffix == ".json":
        text = json.dumps(records, ensure_ascii=False, indent=1)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
