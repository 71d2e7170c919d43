"""Priors from rollout groups: prefix trees and branch-point credit (Tree-GRPO), per-step
variance across the group as a weight and per task as a filter (DRO), and the all-same-outcome
group filter (DAPO dynamic sampling).

A *group* is every trajectory of one ``task_id``. A trajectory's action sequence is its list of
canonical action strings (:func:`action_key`); rollouts of one task that start from the same
context (the messages before the first action) share a prefix tree, whose nodes are action
prefixes. A *branch point* is a node with more than one continuation (a rollout ending there
counts as one); the step that leaves it is a choice between siblings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from trajinf.data.schema import Trajectory
from trajinf.errors import TrajinfError

_END = "\x00end"  # continuation marker of a rollout that stops at a node


def action_key(message: dict) -> str:
    """Canonical action string of an assistant message: stripped content plus each tool call as
    ``name(json args with sorted keys)``, so formatting differences do not split a tree."""
    parts = [str(message.get("content") or "").strip()]
    for call in message.get("tool_calls") or []:
        fn = call.get("function", {})
        raw = fn.get("arguments", "{}")
        try:
            args = json.dumps(json.loads(raw) if isinstance(raw, str) else raw, sort_keys=True)
        except (TypeError, ValueError):
            args = str(raw).strip()  # malformed arguments still identify the action
        parts.append(f"{fn.get('name')}({args})")
    return "\n".join(p for p in parts if p)


def outcome(t: Trajectory) -> float:
    """Reward if present, else success as 0/1, else NaN."""
    if t.reward is not None and math.isfinite(float(t.reward)):
        return float(t.reward)
    return float(t.success) if t.success is not None else math.nan


def groups(pool: Sequence[Trajectory]) -> dict[str, list[Trajectory]]:
    """Trajectories by task_id (those without one are left out), in pool order."""
    out: dict[str, list[Trajectory]] = {}
    for t in pool:
        if t.task_id is not None:
            out.setdefault(str(t.task_id), []).append(t)
    return out


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    total: float = 0.0  # sum of outcomes of the rollouts through this node
    count: int = 0
    ends: int = 0  # rollouts that stop here


def _actions(t: Trajectory) -> list[str]:
    return [action_key(t.messages[s.action]) for s in t.steps()]


def _context(t: Trajectory, tree_field: str | None) -> str:
    if tree_field and t.meta.get(tree_field) is not None:
        return str(t.meta[tree_field])
    first = t.steps()[0].action if t.steps() else len(t.messages)
    return json.dumps([[m.get("role"), m.get("content")] for m in t.messages[:first]])


def _paths(trajs: list[Trajectory], outs: np.ndarray) -> list[list[_Node]]:
    """Insert every rollout into one trie; returns each rollout's node path (root first)."""
    root, paths = _Node(), []
    for t, o in zip(trajs, outs, strict=True):
        node, path = root, [root]
        node.total, node.count = node.total + o, node.count + 1
        for a in _actions(t):
            node = node.children.setdefault(a, _Node())
            node.total, node.count = node.total + o, node.count + 1
            path.append(node)
        node.ends += 1
        paths.append(path)
    return paths


def _frame(rows: list[tuple[str, int, float]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["id", "step", "value"])
    return df.astype({"id": str, "step": "int64", "value": "float64"})


def _nan_rows(t: Trajectory) -> list[tuple[str, int, float]]:
    return [(t.id, k, math.nan) for k in range(len(t.steps()))]


def branch_values(
    pool: Sequence[Trajectory], *, shared: str = "group", tree_field: str | None = None
) -> pd.DataFrame:
    """Tree-GRPO branch-point credit per step: DataFrame id, step, value.

    Per tree (rollouts of one task with one start context, or one ``meta[tree_field]``), with
    outcome o (reward, else success) and sigma_tree the population std of o over its rollouts:
    a step leaving branch point p into child n gets
    ``(mean o under n - mean o under p's other continuations) / sigma_tree`` (0 if sigma is 0).
    Across the task's trees, Tree-GRPO's inter-tree term ``(mean o of the tree - mean o of the
    task) / sigma_task`` is added to every step of the tree (0 with a single tree).
    Steps that are not branch choices (a prefix all of the tree's rollouts through it share, or
    a tail only one rollout walks) get ``shared``: "group" the inter-tree term alone (so 0 with
    one tree), "zero" 0, "nan" NaN. Groups of one rollout and rollouts without task_id or
    outcome are NaN.
    """
    if shared not in ("group", "zero", "nan"):
        raise TrajinfError(f"branch prior option 'shared': group, zero or nan, got {shared!r}")
    rows: list[tuple[str, int, float]] = []
    grouped = groups(pool)
    ok_ids: set[str] = set()
    for trajs in grouped.values():
        trajs = [t for t in trajs if math.isfinite(outcome(t))]
        if len(trajs) < 2:
            continue
        outs_task = np.array([outcome(t) for t in trajs])
        mu_task, sd_task = float(outs_task.mean()), float(outs_task.std())
        trees: dict[str, list[int]] = {}
        for i, t in enumerate(trajs):
            trees.setdefault(_context(t, tree_field), []).append(i)
        for members in trees.values():
            sub, outs = [trajs[i] for i in members], outs_task[members]
            sd = float(outs.std())
            inter = (float(outs.mean()) - mu_task) / sd_task if sd_task > 0 else 0.0
            fill = {"group": inter, "zero": 0.0, "nan": math.nan}[shared]
            for t, path in zip(sub, _paths(sub, outs), strict=True):
                ok_ids.add(t.id)
                for k in range(len(path) - 1):
                    p, n = path[k], path[k + 1]
                    if p.count == n.count:  # every rollout through p took this action
                        rows.append((t.id, k, fill))
                        continue
                    diff = n.total / n.count - (p.total - n.total) / (p.count - n.count)
                    rows.append((t.id, k, (diff / sd if sd > 0 else 0.0) + inter))
    for t in pool:
        if t.id not in ok_ids:
            rows.extend(_nan_rows(t))
    return _frame(rows)


def _prefix_values(pool: Sequence[Trajectory]) -> pd.DataFrame:
    """Monte Carlo value of the state after each step: the mean outcome of the group's rollouts
    that share the trajectory's action prefix through that step (id, step, value)."""
    rows: list[tuple[str, int, float]] = []
    for trajs in groups(pool).values():
        trajs = [t for t in trajs if math.isfinite(outcome(t))]
        outs = np.array([outcome(t) for t in trajs])
        for t, path in zip(trajs, _paths(trajs, outs), strict=True):
            rows.extend((t.id, k, n.total / n.count) for k, n in enumerate(path[1:]))
    return _frame(rows)


def _stat_frame(stat: pd.DataFrame | None, pool: Sequence[Trajectory]) -> pd.DataFrame:
    if stat is None:
        return _prefix_values(pool)
    col = "value" if "value" in stat.columns else "score"
    missing = {"id", "step", col} - set(stat.columns)
    if missing:
        raise TrajinfError(f"group_variance option 'stat': missing columns {sorted(missing)}")
    return pd.DataFrame(
        {"id": stat["id"].astype(str), "step": stat["step"].astype(int), "value": stat[col]}
    )


def _position_variance(pool: Sequence[Trajectory], stat: pd.DataFrame | None) -> pd.DataFrame:
    """id, step, task, value = variance over the task's rollouts of the statistic at the step's
    index (NaN where fewer than 2 rollouts of the task have that step)."""
    s = _stat_frame(stat, pool)
    task_of = {t.id: str(t.task_id) for t in pool if t.task_id is not None}
    s = s[s["id"].isin(task_of)].copy()
    s["task"] = s["id"].map(task_of)
    fin = s[np.isfinite(s["value"].to_numpy(float))]
    by = fin.groupby(["task", "step"])["value"]
    var = (by.var(ddof=0).where(by.count() >= 2)).rename("var")
    out = s.join(var, on=["task", "step"])
    return out.assign(value=out["var"])[["id", "step", "task", "value"]]


def variance_values(
    pool: Sequence[Trajectory], *, stat: pd.DataFrame | None = None
) -> pd.DataFrame:
    """DRO-style step weights: DataFrame id, step, value.

    A step's value is the population variance, over the rollouts of its task that reach step
    index k, of a per-step statistic at k. ``stat`` (id, step, value or score: e.g. per-step
    influence or loss) is that statistic; by default it is the prefix value (mean outcome of
    the group's rollouts sharing the action prefix through step k), whose variance is high where
    the rollouts' choices lead to states of different worth. NaN where undefined.
    """
    v = _position_variance(pool, stat)
    known = set(v["id"])
    rows = [r for t in pool if t.id not in known for r in _nan_rows(t)]
    return pd.concat([v[["id", "step", "value"]], _frame(rows)], ignore_index=True)


def variance_filter(
    pool: Sequence[Trajectory], *, stat: pd.DataFrame | None = None, min_signal: float = 0.0
) -> tuple[list[str], dict]:
    """DRO-style task filter from the same measure as :func:`variance_values`: a task's signal
    is the mean over step indices of the per-index variance; tasks with signal <= ``min_signal``
    are dropped. Trajectories without task_id and tasks with no defined signal (one rollout)
    are kept. Returns (kept ids in pool order, info with tasks/items removed and the signals).
    """
    v = _position_variance(pool, stat)
    # one value per (task, step index): the rows of a position all carry the same variance
    per_pos = v.drop_duplicates(["task", "step"])
    signal = per_pos.groupby("task")["value"].mean()  # NaN-skipping: defined positions only
    bad = {str(k) for k, x in signal.items() if np.isfinite(x) and x <= min_signal}
    kept = [t.id for t in pool if t.task_id is None or str(t.task_id) not in bad]
    info = {
        "min_signal": min_signal,
        "tasks_total": len(groups(pool)),
        "tasks_removed": len(bad),
        "items_removed": len(pool) - len(kept),
        "signal": {str(k): float(x) for k, x in signal.items()},
    }
    return kept, info


def group_filter(
    pool: Sequence[Trajectory], *, drop_singletons: bool = False
) -> tuple[list[str], dict]:
    """DAPO dynamic sampling: drop tasks whose rollouts' outcomes (reward, else success) are all
    equal (all success or all fail), since a group-relative advantage is zero for all of them.

    Tasks with one rollout are kept unless ``drop_singletons``; trajectories without task_id or
    with an unknown outcome are kept (nothing is known about them). Returns (kept ids in pool
    order, info: tasks_total, tasks_removed, all_success, all_fail, items_removed, items_kept).
    """
    bad: set[str] = set()
    n_succ = n_fail = 0
    grouped = groups(pool)
    for task, trajs in grouped.items():
        outs = [outcome(t) for t in trajs]
        if not all(math.isfinite(o) for o in outs) or (len(outs) < 2 and not drop_singletons):
            continue
        if max(outs) == min(outs):
            bad.add(task)
            n_succ += outs[0] > 0
            n_fail += outs[0] <= 0
    kept = [t.id for t in pool if t.task_id is None or str(t.task_id) not in bad]
    info = {
        "tasks_total": len(grouped),
        "tasks_removed": len(bad),
        "all_success": int(n_succ),
        "all_fail": int(n_fail),
        "items_removed": len(pool) - len(kept),
        "items_kept": len(kept),
    }
    return kept, info
