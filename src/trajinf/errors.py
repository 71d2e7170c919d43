"""Errors a user can cause. Each carries a one-line message that names what to fix."""

from __future__ import annotations


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
