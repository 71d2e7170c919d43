"""Text environments: the protocol, the built-in ToolWorld, the TextWorld Express adapter.

``make_env(name, **kw)`` builds one by name: "toolworld" (alias "builtin") or "twx"
(alias "textworld_express", needs Java).
"""

from __future__ import annotations

from typing import Any

from trajinf.envs.base import ActionGrammar, Task, TextEnv, normalize_action
from trajinf.envs.builtin import ToolWorld
from trajinf.envs.families import FAMILIES
from trajinf.errors import TrajinfError

ENV_NAMES = ("toolworld", "builtin", "twx", "textworld_express")

__all__ = [
    "ENV_NAMES",
    "FAMILIES",
    "ActionGrammar",
    "Task",
    "TextEnv",
    "ToolWorld",
    "make_env",
    "normalize_action",
]


def make_env(name: str, **kw: Any) -> TextEnv:
    """A text env by registry name; keyword arguments go to its constructor.

    Raises TrajinfError for an unknown name, EnvUnavailableError when a dependency is missing.
    """
    key = name.strip().lower()
    if key in ("toolworld", "builtin"):
        return ToolWorld(**kw)
    if key in ("twx", "textworld_express"):
        from trajinf.envs.twx import TwxEnv  # imported lazily: it starts a JVM

        return TwxEnv(**kw)
    raise TrajinfError(f"env name {name!r}: unknown; choose from {', '.join(ENV_NAMES)}")
