"""A selection (or any pool) as a ``datasets.Dataset`` in TRL's conversational format, and back.

Columns: ``messages`` (OpenAI chat messages; assistant messages carry their step ``weight``),
``tools`` (the tool schemas as a JSON string, which TRL's own tokenization parses, or None), and
``id``, ``task_id``, ``source``, ``success``, ``reward``. Arrow gives every message the union of
all messages' keys, filled with None; :func:`row_trajectory` strips those again, as ``load_pool``
does for HF datasets.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from trajinf.data.schema import Trajectory
from trajinf.data.trajectories import load_pool, trajectory_from_messages
from trajinf.errors import TrajinfError

COLUMNS = ("id", "messages", "tools", "task_id", "source", "success", "reward")


def _weighted_messages(t: Trajectory, weights: Sequence[float] | None) -> list[dict]:
    msgs = copy.deepcopy(t.messages)
    for m in msgs:  # weights are floats in the dataset, whatever the file wrote
        if "weight" in m:
            m["weight"] = float(m["weight"])
    if weights is None:
        return msgs
    actions = [m for m in msgs if m.get("role") == "assistant"]
    if len(weights) != len(actions):
        raise TrajinfError(
            f"step_weights[{t.id!r}] has {len(weights)} entries but the trajectory has "
            f"{len(actions)} steps"
        )
    for m, w in zip(actions, weights, strict=True):
        m["weight"] = float(w)
    return msgs


def to_dataset(
    source: str | os.PathLike | Sequence[Trajectory] | Any,
    *,
    step_weights: Mapping[str, Sequence[float]] | None = None,
):
    """A ``datasets.Dataset`` (columns :data:`COLUMNS`) of a selection or pool.

    ``source``: a JSONL/JSON file (e.g. written by ``trajinf select``: its per-message ``weight``
    fields are kept), an HF dataset or a list of record dicts (read with ``load_pool``), or a list
    of ``Trajectory`` objects. ``step_weights[id][k]`` sets the weight of the k-th assistant
    message (as ``write_pool`` does). Trajectories whose steps all weigh 0 teach nothing and are
    left out with a warning (as ``train_sft`` does).
    """
    from datasets import Dataset

    if isinstance(source, Sequence) and source and all(isinstance(t, Trajectory) for t in source):
        trajs = list(source)
    else:
        trajs = load_pool(source)
    rows, empty = [], []
    for t in trajs:
        msgs = _weighted_messages(t, (step_weights or {}).get(t.id))
        weights = [m.get("weight", 1.0) for m in msgs if m.get("role") == "assistant"]
        if not any(w != 0 for w in weights):
            empty.append(t.id)
            continue
        rows.append(
            {
                "id": t.id,
                "messages": msgs,
                "tools": json.dumps(t.tools, ensure_ascii=False) if t.tools else None,
                "task_id": t.task_id,
                "source": t.source,
                "success": t.success,
                "reward": t.reward,
            }
        )
    if empty:
        warnings.warn(
            f"to_dataset: left out {len(empty)} trajectories whose steps all weigh 0 "
            f"(first: {empty[0]})",
            stacklevel=2,
        )
    if not rows:
        raise TrajinfError("to_dataset: no trajectory with a nonzero step weight")
    return Dataset.from_list(rows)


def _strip_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_strip_none(v) for v in x]
    return x


def row_trajectory(row: Mapping[str, Any], index: int = 0) -> Trajectory:
    """The validated Trajectory of one dataset row (``messages``, optional ``tools``, ``id``).

    ``index`` names the row in errors when it has no id.
    """
    if "messages" not in row:
        raise TrajinfError(
            f"dataset row {index}: no 'messages' column (got {sorted(row)}); build the dataset "
            "with trajinf.integrations.to_dataset, and keep the column (remove_unused_columns=False)"
        )
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    elif tools is not None:
        tools = _strip_none(list(tools))
    rid = row.get("id") if row.get("id") is not None else f"row-{index}"
    return trajectory_from_messages(_strip_none(list(row["messages"])), id=str(rid), tools=tools)
