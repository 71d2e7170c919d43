"""Errors a user can cause. Each carries a one-line message that names what to fix; and the
one check every config dataclass runs on its fields (:func:`check_fields`)."""

from __future__ import annotations

from dataclasses import fields
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints


class TrajinfError(Exception):
    """Base class of every error trajinf raises for bad input or configuration."""


class TrajectoryFormatError(TrajinfError):
    """A trajectory file is malformed; the message names file, line and field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path, self.line, self.field = path, line, field
        where = ""
        if path is not None:
            where = f"{path}:{line}" if line is not None else str(path)
        if field is not None:
            where = f"{where} field '{field}'" if where else f"field '{field}'"
        super().__init__(f"{where}: {message}" if where else message)


class TemplateError(TrajinfError):
    """A chat template cannot be used to find message boundaries."""


class StoreMismatchError(TrajinfError):
    """A feature store was opened with a different model, tokenizer or projection."""


class StoreCorruptError(TrajinfError):
    """A feature store shard is missing, truncated or fails its checksum."""


class EnvUnavailableError(TrajinfError):
    """An environment's dependency (e.g. Java for TextWorld Express) is missing."""


class ConfigError(TrajinfError):
    """A config dataclass field holds a bad value; ``field`` names it (the CLI maps it to its
    option)."""

    def __init__(self, owner: str, field: str, problem: str) -> None:
        self.owner, self.field, self.problem = owner, field, problem
        super().__init__(f"{owner} field '{field}': {problem}")


def literal_choices(tp: object) -> tuple | None:
    """The values a ``Literal[...]`` type (or ``Literal[...] | None``) allows; None for any
    other type."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (Union, UnionType):
        parts = [literal_choices(a) for a in get_args(tp) if a is not type(None)]
        if parts and all(p is not None for p in parts):
            return (*sum(parts, ()), *((None,) if type(None) in get_args(tp) else ()))
    return None


def check_fields(config: object) -> None:
    """Raise :class:`ConfigError` for the first field of a dataclass ``config`` whose value is
    not among its ``Literal[...]`` type's values or is below its ``metadata["min"]``: the one
    validation every config runs in ``__post_init__``."""
    hints = get_type_hints(type(config))
    for f in fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        choices = literal_choices(hints[f.name])
        if choices is not None and value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ConfigError(type(config).__name__, f.name, f"{value!r} not in ({shown})")
        low = f.metadata.get("min")
        if low is not None and value is not None and value < low:
            raise ConfigError(type(config).__name__, f.name, f"must be >= {low}, got {value}")
