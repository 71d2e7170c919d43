"""The text-environment protocol (docs/contracts.md) and the action <-> tool-call grammar.

An environment turns action strings ("take apple from fridge") into observations. Envs with a
tool schema render each action as an assistant message with one function ``tool_call``; the
``ActionGrammar`` here does that conversion both ways for verb patterns such as
``take {item} from {source}``, so every env shares one deterministic rendering.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from trajinf.errors import TrajinfError


@dataclass
class Task:
    """One task instance: ``id`` is unique across splits (e.g. ``cook-17``), ``family`` its
    subtask family, ``seed`` the seed its layout was drawn from, ``data`` everything ``reset``
    needs (JSON-serializable)."""

    id: str
    family: str
    split: str
    seed: int
    goal: str
    data: dict = field(default_factory=dict)


@runtime_checkable
class TextEnv(Protocol):
    """A text environment holding ONE live episode at a time (use ``fork`` for more)."""

    name: str
    tool_schema: list[dict] | None

    def tasks(self, split: str, n: int, seed: int) -> list[Task]: ...

    def reset(self, task: Task) -> str: ...

    def step(self, action: str) -> tuple[str, float, bool, dict]: ...

    def valid_actions(self) -> list[str] | None: ...

    def expert(self, task: Task) -> list[str]: ...

    def action_to_message(self, action: str) -> dict: ...

    def message_to_action(self, message: dict) -> str: ...


def normalize_action(action: str) -> str:
    """Lower-case, single-spaced, without a trailing period: how envs compare action strings."""
    return " ".join(action.strip().rstrip(".").lower().split())


class ActionGrammar:
    """Two-way map between action strings and OpenAI function calls.

    ``patterns`` maps a tool name to a template like ``"take {item} from {source}"``; each
    ``{arg}`` becomes a required string parameter. Argument values must not contain the
    template's literal words (names like "front door" are fine, "box on shelf" is not).
    """

    def __init__(self, patterns: dict[str, str], descriptions: dict[str, str]) -> None:
        self.patterns = dict(patterns)
        self.descriptions = dict(descriptions)
        self._regex: list[tuple[str, re.Pattern[str], list[str]]] = []
        # longest literal prefix first, so "switch on {x}" wins over any one-word verb
        for name, pat in sorted(patterns.items(), key=lambda kv: -len(kv[1].split("{")[0])):
            args = re.findall(r"{(\w+)}", pat)
            rx = re.escape(pat)
            for a in args:
                rx = rx.replace(re.escape("{" + a + "}"), f"(?P<{a}>.+?)")
            self._regex.append((name, re.compile(f"^{rx}$"), args))

    def schema(self, names: list[str] | None = None) -> list[dict]:
        """OpenAI tool schemas for ``names`` (all tools when None), in pattern order."""
        out = []
        for name, pat in self.patterns.items():
            if names is not None and name not in names:
                continue
            args = re.findall(r"{(\w+)}", pat)
            out.append(
                {
                    "type": "function",
                    "function": {
                        "name": name,
                        "description": self.descriptions.get(name, pat),
                        "parameters": {
                            "type": "object",
                            "properties": {a: {"type": "string"} for a in args},
                            "required": args,
                        },
                    },
                }
            )
        return out

    def parse(self, action: str) -> tuple[str, dict[str, str]] | None:
        """(tool name, arguments) of an action string, or None when no pattern matches."""
        text = normalize_action(action)
        for name, rx, args in self._regex:
            m = rx.match(text)
            if m:
                return name, {a: m.group(a) for a in args}
        return None

    def to_message(self, action: str, call_id: str) -> dict:
        """Assistant message for ``action``: one tool call, or plain content if unparseable."""
        parsed = self.parse(action)
        if parsed is None:
            return {"role": "assistant", "content": action}
        name, args = parsed
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        return {"role": "assistant", "content": "", "tool_calls": [call]}

    def from_message(self, message: dict) -> str:
        """Inverse of ``to_message``: the action string of an assistant message.

        Raises TrajinfError naming the field when a tool call is unknown or lacks an argument.
        """
        calls = message.get("tool_calls") or []
        if not calls:
            return normalize_action(str(message.get("content") or ""))
        fn = calls[0].get("function", {})
        name = fn.get("name")
        if name not in self.patterns:
            raise TrajinfError(f"tool_calls[0].function.name: unknown tool {name!r}")
        raw = fn.get("arguments", "{}")
        try:
            args = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise TrajinfError(
                f"tool_calls[0].function.arguments: not a JSON object ({exc})"
            ) from exc
        if not isinstance(args, dict):
            raise TrajinfError("tool_calls[0].function.arguments: not a JSON object")
        out = self.patterns[name]
        for a in re.findall(r"{(\w+)}", out):
            if a not in args:
                raise TrajinfError(f"tool_calls[0].function.arguments: missing {a!r} for {name}")
            out = out.replace("{" + a + "}", normalize_action(str(args[a])))
        return out
