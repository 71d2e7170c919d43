"""ToolWorld: a fast, deterministic, pure-Python tool-use world (the built-in env).

The family rules live in ``families.py`` (cook, unlock, repair, sort: each with an observable cue
and an irreversible wrong choice at its decision point). This module wraps them in the
``TextEnv`` protocol: seeded task splits, reset/step, tool-call messages, and the planner that
the scripted policies use.
"""

from __future__ import annotations

import copy
import random

from trajinf.envs import families as F
from trajinf.envs.base import Task, normalize_action
from trajinf.envs.families import FAMILIES, FAMILY_TOOLS, GRAMMAR
from trajinf.errors import TrajinfError

SPLITS = ("train", "test", "dev")  # task seed % 3 == index: the splits never share a seed
_FAMILY_SCHEMA = {f: GRAMMAR.schema(names) for f, names in FAMILY_TOOLS.items()}

__all__ = ["FAMILIES", "SPLITS", "ToolWorld"]


class ToolWorld:
    """The built-in env (name "toolworld"). One live episode per instance; ``fork()`` for more.

    ``families`` restricts which families ``tasks`` draws (round robin, so they are balanced);
    ``slack`` extra steps over the expert's length form each task's step limit;
    ``show_actions`` appends "Actions: a; b; ..." to every observation (off: the list is in
    ``info["valid_actions"]`` and ``valid_actions()``).
    """

    name = "toolworld"
    max_batch = 256  # rollout may fork this many instances at once: they are cheap

    def __init__(
        self,
        families: list[str] | tuple[str, ...] | None = None,
        *,
        slack: int = 4,
        show_actions: bool = False,
    ) -> None:
        self.families = tuple(families or FAMILIES)
        for f in self.families:
            if f not in FAMILIES:
                raise TrajinfError(
                    f"toolworld field 'families': unknown {f!r}; choose from {FAMILIES}"
                )
        self.slack, self.show_actions = slack, show_actions
        self.tool_schema = GRAMMAR.schema()
        self._task: Task | None = None
        self._s: dict = {}

    # -- protocol --------------------------------------------------------------------------------
    def fork(self) -> ToolWorld:
        """A fresh instance with the same configuration (no episode)."""
        return ToolWorld(self.families, slack=self.slack, show_actions=self.show_actions)

    def tools_for(self, task: Task) -> list[dict]:
        """The tool schemas the task's family uses (a short prompt for small models)."""
        return copy.deepcopy(_FAMILY_SCHEMA[task.family])

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        """``n`` tasks, deterministic in (split, seed); task seeds of different splits differ."""
        if split not in SPLITS:
            raise TrajinfError(
                f"toolworld.tasks field 'split': expected one of {SPLITS}, got {split!r}"
            )
        rng, used, out = random.Random(f"toolworld-{split}-{seed}"), set(), []
        for i in range(n):
            family = self.families[i % len(self.families)]
            s = rng.randrange(10**6) * 3 + SPLITS.index(split)
            while (family, s) in used:
                s = rng.randrange(10**6) * 3 + SPLITS.index(split)
            used.add((family, s))
            out.append(self.make_task(family, s, split))
        return out

    def make_task(self, family: str, seed: int, split: str = "train") -> Task:
        """The task of ``family`` drawn from ``seed`` (layout, goal and step limit)."""
        goal, data = F.layout(family, random.Random(f"{family}-{seed}"))
        task = Task(
            id=f"{family}-{seed}", family=family, split=split, seed=seed, goal=goal, data=data
        )
        task.data["max_steps"] = len(self.expert(task)) + self.slack
        return task

    def reset(self, task: Task) -> str:
        """Start ``task``; returns the first observation (goal included)."""
        self._task, self._s = task, F.start_state(task)
        return self._decorate(F.first_observation(task, self._s))

    def valid_actions(self) -> list[str] | None:
        """Actions that change the world now (3-10 in expert play); None before ``reset``."""
        return F.valid_actions(self._task, self._s) if self._task is not None else None

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """Apply ``action``. An action not in ``valid_actions()`` costs a step and changes nothing.

        info: success, valid (action accepted), doomed (task unsolvable now), truncated (step
        limit hit), valid_actions.
        """
        task, s = self._require_episode()
        if s["done"]:
            raise TrajinfError(
                f"toolworld: step() after the episode of {task.id} ended; reset first"
            )
        a = normalize_action(action)
        valid = a in F.valid_actions(task, s)
        if valid:
            obs = F.apply_action(task, s, a)
        else:
            obs = f"Nothing happens: '{action.strip()[:60]}' is not possible here."
        s["steps"] += 1
        truncated = not s["done"] and s["steps"] >= task.data["max_steps"]
        s["done"] = s["done"] or truncated
        success = s["done"] and s["success"]
        info = {
            "success": success,
            "valid": valid,
            "doomed": F.is_doomed(task, s),
            "truncated": truncated,
            "valid_actions": [] if s["done"] else F.valid_actions(task, s),
        }
        return self._decorate(obs), 1.0 if success else 0.0, s["done"], info

    def expert(self, task: Task) -> list[str]:
        """The expert's action sequence from the start of ``task`` (it solves it)."""
        return F.simulate_plan(task, F.start_state(task), wrong=False)

    def plan(self, *, wrong_rule: bool = False) -> list[str]:
        """Remaining actions from the CURRENT state (re-planned, so it works mid-episode).

        The planner only uses what the agent has observed (it searches containers in listed
        order). ``wrong_rule=True`` follows the family's wrong rule at the decision point. From
        a doomed state it still finishes the procedure (the episode then fails).
        """
        task, s = self._require_episode()
        return [] if s["done"] else F.simulate_plan(task, s, wrong=wrong_rule)

    def next_action(self, *, wrong_rule: bool = False) -> str | None:
        """``plan(wrong_rule=...)[0]`` without simulating the rest (None once done)."""
        task, s = self._require_episode()
        return None if s["done"] else F.next_action(task, s, wrong_rule)

    def action_to_message(self, action: str, call_id: str | None = None) -> dict:
        """Assistant message with one tool call (id ``call_{step}`` unless given)."""
        step = self._s.get("steps", 0)
        return GRAMMAR.to_message(action, call_id or f"call_{step}")

    def message_to_action(self, message: dict) -> str:
        """Action string of an assistant message (tool call or plain content)."""
        return GRAMMAR.from_message(message)

    def close(self) -> None:
        """Nothing to release (pure Python)."""

    # -- helpers ---------------------------------------------------------------------------------
    def _require_episode(self) -> tuple[Task, dict]:
        if self._task is None:
            raise TrajinfError("toolworld: no episode; call reset(task) first")
        return self._task, self._s

    def _decorate(self, obs: str) -> str:
        if not self.show_actions or self._s.get("done"):
            return obs
        return f"{obs} Actions: {'; '.join(F.valid_actions(self._task, self._s))}."
