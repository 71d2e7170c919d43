"""Trajectory loaders (OpenAI chat JSONL, ShareGPT, HF datasets); the schema and writer are
re-exported here (:mod:`trajinf.data.schema`, :mod:`trajinf.data.write`).

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
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trajinf.data.schema import (
    RecordContext,
    Trajectory,
    check_messages,
    parse_record,
)
from trajinf.errors import TrajectoryFormatError


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
    trajs = [parse_record(rec, format, RecordContext(label, line)) for line, rec in records]
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
    msgs = check_messages(list(messages), names, RecordContext(None, None))
    known = {f.name for f in dataclasses.fields(Trajectory)} - {"messages"}
    kw = {k: v for k, v in fields.items() if k in known}
    kw["extra"] = {**kw.get("extra", {}), **{k: v for k, v in fields.items() if k not in known}}
    if not kw.get("id"):
        digest = hashlib.sha1(json.dumps(msgs, sort_keys=True, default=str).encode()).hexdigest()
        kw["id"] = f"traj-{digest[:12]}"
    kw["id"] = str(kw["id"])
    return Trajectory(messages=msgs, **kw)
