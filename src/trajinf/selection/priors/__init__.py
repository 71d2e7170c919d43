"""Step priors: per-step credit from trajectory structure, rollout groups and the env, to use
alone or combined with per-step influence (docs/architecture.md, "Step priors").

``step_prior(name, pool, env=..., **options)`` returns a DataFrame id, step, value (higher =
more credit, NaN = undefined) with one row per step of every trajectory in ``pool``. The priors
are registered by name in :data:`PRIORS` with their options: "branch" (Tree-GRPO,
:func:`~trajinf.selection.priors.groups.branch_values`), "group_variance" (DRO,
:func:`~trajinf.selection.priors.groups.variance_values`), "expert_aligned" (SRL,
:func:`~trajinf.selection.priors.replay.expert_values`) and "tool_call" (ToolPO,
:func:`~trajinf.selection.priors.replay.tool_call_values`).

Filters: :func:`group_filter` (DAPO) and :func:`variance_filter` (DRO). Combination and export:
:func:`trajectory_prior`, :func:`combine_steps`, :func:`weights_from_steps`. Also
:func:`tool_call_mask` (tokens inside tool calls), :func:`mask_stats` (update-mask overlap)
and :func:`trajinf.envs.early_experience.early_experience`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from trajinf.data.schema import Trajectory
from trajinf.errors import TrajinfError
from trajinf.selection.priors.combine import combine_steps, trajectory_prior, weights_from_steps
from trajinf.selection.priors.groups import (
    action_key,
    branch_values,
    group_filter,
    variance_filter,
    variance_values,
)
from trajinf.selection.priors.masks import mask_stats
from trajinf.selection.priors.replay import expert_values, tool_call_values
from trajinf.selection.priors.tool_spans import tool_call_mask, tool_call_spans


@dataclass(frozen=True)
class StepPrior:
    """A registered step prior: ``values(pool, env, **options) -> DataFrame id, step, value``,
    the options it takes (name -> help) and a one-line description."""

    values: Callable[..., pd.DataFrame]
    options: dict[str, str]
    help: str


def _expert(pool: Sequence[Trajectory], env: Any, *, similarity: str = "auto", **kw: Any):
    return expert_values(pool, env, similarity_mode=similarity, **kw)


_TASKS = "prebuilt tasks by trajectory id (default: rebuilt from the trajectory meta)"

# name -> prior; the CLI's --prior choices and step_prior's names and options come from here
PRIORS: dict[str, StepPrior] = {
    "branch": StepPrior(
        lambda pool, env, **o: branch_values(pool, **o),
        {
            "shared": "value of steps that are no branch choice: group | zero | nan",
            "tree_field": "meta field naming a rollout's tree (default: same start context)",
        },
        "Tree-GRPO branch-point credit (needs rollout groups)",
    ),
    "group_variance": StepPrior(
        lambda pool, env, **o: variance_values(pool, **o),
        {"stat": "per-step statistic frame (id, step, value); default: prefix value"},
        "DRO variance of a per-step statistic across the task's rollouts",
    ),
    "expert_aligned": StepPrior(
        _expert,
        {"similarity": "exact | ratio | auto (exact when the env lists actions)", "tasks": _TASKS},
        "SRL agreement with the env's expert action in the same state (needs env)",
    ),
    "tool_call": StepPrior(
        tool_call_values,
        {"invalid": "value of an invalid tool call (default -1)", "tasks": _TASKS},
        "ToolPO tool-call correctness (env optional)",
    ),
}

__all__ = [
    "PRIORS",
    "StepPrior",
    "action_key",
    "combine_steps",
    "group_filter",
    "mask_stats",
    "step_prior",
    "tool_call_mask",
    "tool_call_spans",
    "trajectory_prior",
    "variance_filter",
    "weights_from_steps",
]


def step_prior(
    name: str, pool: Sequence[Trajectory], *, env: Any = None, **options: Any
) -> pd.DataFrame:
    """Per-step values of prior ``name`` (a key of :data:`PRIORS`) for every step of
    ``pool``: DataFrame id (str), step (int), value (float; higher = more credit, NaN where
    undefined).

    ``env`` is a ``trajinf.envs`` env (needed by "expert_aligned", used by "tool_call" when
    given). ``options``: the prior's, listed in :data:`PRIORS`; unknown options raise.
    Details (e.g. how many replays stopped) are in ``df.attrs.get("info")``.
    """
    prior = PRIORS.get(name)
    if prior is None:
        raise TrajinfError(f"prior '{name}': unknown; choose from {', '.join(PRIORS)}")
    extra = set(options) - set(prior.options)
    if extra:
        raise TrajinfError(
            f"prior '{name}': unknown option(s) {sorted(extra)}; allowed: {sorted(prior.options)}"
        )
    return prior.values(pool, env, **options)
