"""Replaying recorded trajectories in their env, and the priors that need it: expert-aligned
steps (SRL) and tool-call correctness (ToolPO / DeepAgent).

A trajectory made by ``trajinf.envs.rollout`` records its task in ``meta`` (family, task_seed,
split); envs with ``make_task(family, seed, split)`` rebuild the task from that. ``replay``
resets the env, checks the first observation against the trajectory's, and applies the
recorded actions one by one, stopping where the env's observation differs from the recorded
one (the trajectory is then not from this env or task; the remaining steps are undefined).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from trajinf.data.schema import Trajectory
from trajinf.envs.base import Task, normalize_action
from trajinf.errors import TrajinfError


def task_for(env: Any, traj: Trajectory, tasks: Mapping[str, Task] | None = None) -> Task | None:
    """The env task a trajectory was recorded in: ``tasks[traj.task_id]`` when given, else
    ``env.make_task(meta["family"], meta["task_seed"], meta["split"])``; None if neither."""
    if tasks is not None and traj.task_id in tasks:
        return tasks[str(traj.task_id)]
    make, meta = getattr(env, "make_task", None), traj.meta
    if callable(make) and meta.get("family") is not None and meta.get("task_seed") is not None:
        return make(str(meta["family"]), int(meta["task_seed"]), str(meta.get("split", "train")))
    return None


def action_of(env: Any, message: dict) -> str:
    """The env's action string of an assistant message ('' for one the env cannot read)."""
    try:
        return env.message_to_action(message)
    except TrajinfError:
        return ""


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def replay(
    env: Any, traj: Trajectory, task: Task, on_state: Callable[[int, str], None] | None = None
) -> tuple[list[dict], str | None]:
    """Apply ``traj``'s actions to ``env`` from ``reset(task)``.

    ``on_state(k, action)`` runs before step k with the env in the state the trajectory was in
    (so it may ask ``env.next_action()`` or ``env.valid_actions()``). Returns (the env's info
    of every applied step, None or why the replay stopped early: "start differs",
    "diverged at step k", "episode ended at step k").
    """
    first = env.reset(task)
    steps = traj.steps()
    head = [m for m in traj.messages[: steps[0].action if steps else None] if m["role"] == "user"]
    if head and not _same(head[-1]["content"], first):
        return [], "start differs"
    infos: list[dict] = []
    done = False
    for k, st in enumerate(steps):
        if done:
            return infos, f"episode ended at step {k}"
        action = action_of(env, traj.messages[st.action])
        if on_state is not None:
            on_state(k, action)
        obs, _, done, info = env.step(action)
        infos.append(info)
        recorded = [traj.messages[i]["content"] for i in st.consequences]
        if recorded and not _same(recorded[0], obs):
            return infos, f"diverged at step {k}"
    return infos, None


def similarity(action: str, expert: str, *, exact: bool) -> float:
    """1/0 exact match of normalized actions, or difflib's ratio of the normalized strings."""
    a, e = normalize_action(action), normalize_action(expert)
    return float(a == e) if exact else difflib.SequenceMatcher(None, a, e).ratio()


def _frame(rows: list[tuple[str, int, float]], info: dict) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["id", "step", "value"])
    df = df.astype({"id": str, "step": "int64", "value": "float64"})
    df.attrs["info"] = info
    return df


def expert_values(
    pool: Sequence[Trajectory],
    env: Any,
    *,
    similarity_mode: str = "auto",
    tasks: Mapping[str, Task] | None = None,
) -> pd.DataFrame:
    """SRL-style expert agreement per step: DataFrame id, step, value in [0, 1].

    The expert action in a step's state comes from the env: re-planned from the replayed state
    when the env has a planner (``next_action``, ToolWorld), else the env's fixed expert path
    (``expert(task)``, TextWorld Express gold paths), defined only while the trajectory is still
    on that path (its actions so far equal the path's): NaN after it leaves the path.
    ``similarity_mode``: "exact" (1/0), "ratio" (difflib), "auto" (exact when the env lists
    valid actions, i.e. actions are discrete, else ratio). ``df.attrs["info"]`` counts the
    trajectories whose task could not be rebuilt or whose replay stopped early (their steps
    from there on are NaN).
    """
    if similarity_mode not in ("auto", "exact", "ratio"):
        raise TrajinfError(
            f"expert_aligned option 'similarity': auto, exact or ratio, got {similarity_mode!r}"
        )
    if env is None:
        raise TrajinfError("prior 'expert_aligned' needs an env (--env toolworld or twx)")
    planner = callable(getattr(env, "next_action", None))
    rows: list[tuple[str, int, float]] = []
    info: dict = {
        "no_task": 0,
        "stopped": {},
        "off_path_steps": 0,
        "expert": "planner" if planner else "gold path",
    }
    for t in pool:
        n = len(t.steps())
        values = [math.nan] * n
        task = task_for(env, t, tasks)
        if task is None:
            info["no_task"] += 1
        elif planner:
            why = _replanned(env, t, task, values, similarity_mode)
            if why:
                info["stopped"][t.id] = why
        else:
            gold = list(env.expert(task))
            exact = (
                similarity_mode == "exact" or similarity_mode == "auto"
            )  # gold envs list actions
            actions = [action_of(env, t.messages[s.action]) for s in t.steps()]
            for k, a in enumerate(actions):
                if k >= len(gold) or any(
                    normalize_action(x) != normalize_action(g)
                    for x, g in zip(actions[:k], gold[:k], strict=True)
                ):
                    info["off_path_steps"] += n - k
                    break
                values[k] = similarity(a, gold[k], exact=exact)
        rows.extend((t.id, k, v) for k, v in enumerate(values))
    return _frame(rows, info)


def _replanned(env: Any, t: Trajectory, task: Task, values: list[float], mode: str) -> str | None:
    """Fill ``values[k]`` with the agreement of step k and the planner's action in its state."""

    def score(k: int, action: str) -> None:
        exact = mode == "exact" or (mode == "auto" and env.valid_actions() is not None)
        expert = env.next_action()
        if expert is not None:
            values[k] = similarity(action, expert, exact=exact)

    return replay(env, t, task, score)[1]


def _schema_valid(call: dict, tools: list[dict] | None) -> bool:
    """Arguments are a JSON object and, with tool schemas, the tool exists and has its
    required arguments."""
    fn = call.get("function", {})
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except (TypeError, ValueError):
        return False
    if not isinstance(args, dict):
        return False
    if not tools:
        return True
    by_name = {s.get("function", {}).get("name"): s.get("function", {}) for s in tools}
    spec = by_name.get(fn.get("name"))
    if spec is None:
        return False
    required = (spec.get("parameters") or {}).get("required") or []
    return all(r in args for r in required)


def tool_call_values(
    pool: Sequence[Trajectory],
    env: Any = None,
    *,
    invalid: float = -1.0,
    tasks: Mapping[str, Task] | None = None,
) -> pd.DataFrame:
    """ToolPO-style tool-call credit per step: 1.0 for a valid tool call, ``invalid`` for an
    invalid one, NaN for a step without a tool call. DataFrame id, step, value.

    Validity, first available: the env's ``info["valid"]`` from replaying the trajectory (env
    given and its task rebuildable); the rollout's own record (``meta["invalid_steps"]`` of a
    trajectory with ``meta["env"]``); the trajectory's tool schemas (tool exists, arguments a
    JSON object with the required keys); arguments a JSON object. ``df.attrs["info"]`` counts
    steps per source.
    """
    rows: list[tuple[str, int, float]] = []
    info: dict = {"env": 0, "rollout_meta": 0, "schema": 0, "json": 0, "stopped": {}}
    for t in pool:
        steps = t.steps()
        calls = [t.messages[s.action].get("tool_calls") or [] for s in steps]
        valid: list[bool | None] = [None] * len(steps)
        task = task_for(env, t, tasks) if env is not None else None
        if task is not None:
            infos, why = replay(env, t, task)
            if why:
                info["stopped"][t.id] = why
            for k, i in enumerate(infos):
                valid[k] = bool(i.get("valid", True))
            info["env"] += sum(bool(c) for c in calls[: len(infos)])
        for k, c in enumerate(calls):
            if not c or valid[k] is not None:
                continue
            if "env" in t.meta:  # made by trajinf.envs.rollout: it records the env's verdicts
                valid[k] = k not in set(t.meta.get("invalid_steps", []))
                info["rollout_meta"] += 1
            else:
                valid[k] = all(_schema_valid(x, t.tools) for x in c)
                info["schema" if t.tools else "json"] += 1
        for k, c in enumerate(calls):
            rows.append((t.id, k, math.nan if not c else (1.0 if valid[k] else float(invalid))))
    return _frame(rows, info)
