"""Early-experience data (arXiv 2510.08558): learn from the outcomes of one's own alternative
actions, without rewards.

From every state of an expert trajectory, K alternative actions are tried in the env (each from
a fresh ``reset`` + replay of the expert's prefix, so any env works) and their observations are
recorded. Two kinds of examples are built, each a valid ``Trajectory`` that joins a pool:

- world model (source "world_model"): the state as text (first observation, then a line
  ``> action`` and the observation for every step so far) plus ``> action`` as the user turn;
  the next observation as the assistant's answer. One per alternative and one for the expert's
  own action.
- self-reflection (source "reflection"): the state as the user turn; an assistant message
  that lists what each alternative and the expert action led to and concludes with the expert
  action; then the expert's own action message (its tool call) as a second assistant step.
  The paper has a language model write the reflection; here it is a fixed template filled with
  the observed outcomes only (no reward, no success flag).

Ids: ``ee-wm-{traj id}-s{k}-a{j}`` (j = K for the expert's action) and ``ee-refl-{id}-s{k}``;
``task_id`` is the expert trajectory's, ``success`` and ``reward`` are None, and ``meta`` says
where each example came from (``early_experience``, ``from``, ``state_step``, ``family``).
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from trajinf.data.schema import Trajectory
from trajinf.data.trajectories import trajectory_from_messages
from trajinf.envs.base import Task, normalize_action
from trajinf.errors import TrajinfError
from trajinf.selection.priors.replay import action_of, replay, task_for

WORLD_MODEL_PROMPT = (
    "You model a text world. Given the history and the next action, reply with exactly the "
    "observation the world returns."
)
REFLECTION_PROMPT = (
    "You act in a text world to reach the goal. Think about what each possible action leads "
    "to, then act."
)


def _state_text(first: str, actions: list[str], observations: list[str], k: int) -> str:
    lines = [first]
    for a, o in zip(actions[:k], observations[:k], strict=True):
        lines += [f"> {a}", o]
    return "\n".join(lines)


def _reflection(goal: str, outcomes: list[tuple[str, str]], expert: str, expert_obs: str) -> str:
    goal = goal.strip().rstrip(".")
    lines = [goal + "." if goal.lower().startswith("goal") else f"Goal: {goal}." if goal else ""]
    lines += [f"If I {a}: {o}" for a, o in outcomes]
    lines.append(f"If I {expert}: {expert_obs}")
    lines.append(f"Of these, '{expert}' is the step toward the goal, so I {expert}.")
    return "\n".join(x for x in lines if x)


def _branch(env: Any, task: Task, prefix: list[str], action: str) -> str:
    """Observation of ``action`` in the state after ``prefix`` (fresh reset + replay)."""
    env.reset(task)
    for a in prefix:
        env.step(a)
    return env.step(action)[0]


def _examples_of(
    env: Any, t: Trajectory, task: Task, k: int, seed: int
) -> tuple[list[Trajectory], str | None]:
    steps = t.steps()
    actions = [action_of(env, t.messages[s.action]) for s in steps]
    observations = [
        str(t.messages[s.consequences[0]]["content"]) if s.consequences else "" for s in steps
    ]
    choices: dict[int, list[str]] = {}

    def record(i: int, action: str) -> None:
        valid = env.valid_actions()
        if valid is None:
            raise TrajinfError(
                f"early_experience: env {getattr(env, 'name', '?')} lists no valid actions; "
                "alternatives cannot be proposed"
            )
        others = [a for a in valid if normalize_action(a) != normalize_action(action)]
        rng = random.Random(f"{seed}/{t.id}/{i}")  # str seed: stable across processes
        choices[i] = rng.sample(others, min(k, len(others)))

    infos, why = replay(env, t, task, record)
    n_ok = len(infos) if why is None or why.startswith("episode") else len(infos) - 1
    head = [m for m in t.messages[: steps[0].action] if m["role"] == "user"]
    first = str(head[-1]["content"]) if head else task.goal
    base_meta = {"from": t.id, "family": t.meta.get("family", task.family)}
    out: list[Trajectory] = []
    for i in range(max(n_ok, 0)):
        state = _state_text(first, actions, observations, i)
        outcomes = [(a, _branch(env, task, actions[:i], a)) for a in choices[i]]
        for j, (a, o) in enumerate([*outcomes, (actions[i], observations[i])]):
            msgs = [
                {"role": "system", "content": WORLD_MODEL_PROMPT},
                {"role": "user", "content": f"{state}\n> {a}"},
                {"role": "assistant", "content": o},
            ]
            meta = {**base_meta, "early_experience": "world_model", "state_step": i, "action": a}
            meta["expert_action"] = j == len(outcomes)
            out.append(
                trajectory_from_messages(
                    msgs,
                    id=f"ee-wm-{t.id}-s{i}-a{j}",
                    task_id=t.task_id,
                    source="world_model",
                    meta=meta,
                )  # fmt: skip
            )
        expert_msg = {
            key: copy.deepcopy(v)
            for key, v in t.messages[steps[i].action].items()
            if key != "weight"
        }
        msgs = [
            {"role": "system", "content": REFLECTION_PROMPT},
            {"role": "user", "content": state},
            {
                "role": "assistant",
                "content": _reflection(task.goal, outcomes, actions[i], observations[i]),
            },
            expert_msg,
        ]
        meta = {**base_meta, "early_experience": "reflection", "state_step": i}
        meta["alternatives"] = [a for a, _ in outcomes]
        out.append(
            trajectory_from_messages(
                msgs,
                id=f"ee-refl-{t.id}-s{i}",
                task_id=t.task_id,
                source="reflection",
                tools=copy.deepcopy(t.tools),
                meta=meta,
            )  # fmt: skip
        )
    return out, why


def early_experience(
    env: Any,
    expert_trajs: Sequence[Trajectory],
    *,
    k: int,
    seed: int,
    tasks: Mapping[str, Task] | None = None,
) -> list[Trajectory]:
    """World-model and self-reflection examples from the states of ``expert_trajs``.

    ``k`` alternatives per state are drawn (without replacement, seeded by ``seed``, the
    trajectory id and the step) from the env's valid actions other than the expert's; fewer
    when fewer exist. Each trajectory's task is rebuilt from its meta (``env.make_task``) or
    taken from ``tasks[task_id]``. Deterministic in (env, trajectories, k, seed). A trajectory
    whose replay diverges from its recorded observations contributes only the states before
    the divergence (with a warning). Raises TrajinfError when a task cannot be rebuilt or the
    env lists no valid actions.
    """
    if k < 1:
        raise TrajinfError(f"early_experience: k must be >= 1, got {k}")
    out: list[Trajectory] = []
    for t in expert_trajs:
        task = task_for(env, t, tasks)
        if task is None:
            raise TrajinfError(
                f"early_experience: trajectory {t.id!r}: no task for env "
                f"{getattr(env, 'name', '?')} (meta needs family and task_seed, or pass tasks=)"
            )
        examples, why = _examples_of(env, t, task, k, seed)
        if why and not why.startswith("episode"):
            warnings.warn(f"early_experience: trajectory {t.id!r}: replay {why}", stacklevel=2)
        out.extend(examples)
    return out
