"""Step priors: per-step credit from trajectory structure, rollout groups and the env, to use
alone or combined with per-step influence (docs/architecture.md, "Step priors").

``step_prior(name, pool, env=..., **options)`` returns a DataFrame id, step, value (higher =
more credit, NaN = undefined) with one row per step of every trajectory in ``pool``:

- "branch": Tree-GRPO branch-point credit (:func:`trajinf.selection.priors.groups.branch_values`);
  options shared ("group" | "zero" | "nan"), tree_field.
- "group_variance": DRO variance of a per-step statistic across the task group
  (:func:`trajinf.selection.priors.groups.variance_values`); option stat (id, step, value frame).
- "expert_aligned": SRL agreement with the env's expert action in the same state
  (:func:`trajinf.selection.priors.replay.expert_values`); needs ``env``; options similarity, tasks.
- "tool_call": ToolPO tool-call correctness (:func:`trajinf.selection.priors.replay.tool_call_values`);
  ``env`` optional; options invalid, tasks.

Filters: :func:`group_filter` (DAPO) and :func:`variance_filter` (DRO). Combination and export:
:func:`trajectory_prior`, :func:`combine_steps`, :func:`weights_from_steps`. Also
:func:`tool_call_mask` (tokens inside tool calls), :func:`mask_stats` (update-mask overlap)
and :func:`trajinf.envs.early_experience.early_experience`.
"""

from __future__ import annotations

from collections.abc import Sequence
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

PRIORS = ("branch", "group_variance", "expert_aligned", "tool_call")

__all__ = [
    "PRIORS",
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
    """Per-step values of prior ``name`` for every step of ``pool``: DataFrame id (str),
    step (int), value (float; higher = more credit, NaN where undefined).

    ``env`` is a ``trajinf.envs`` env (needed by "expert_aligned", used by "tool_call" when
    given). Options per prior are listed in the module docstring; unknown options raise.
    Details (e.g. how many replays stopped) are in ``df.attrs.get("info")``.
    """
    allowed = {
        "branch": {"shared", "tree_field"},
        "group_variance": {"stat"},
        "expert_aligned": {"similarity", "tasks"},
        "tool_call": {"invalid", "tasks"},
    }
    if name not in allowed:
        raise TrajinfError(f"prior '{name}': unknown; choose from {', '.join(PRIORS)}")
    extra = set(options) - allowed[name]
    if extra:
        raise TrajinfError(
            f"prior '{name}': unknown option(s) {sorted(extra)}; allowed: {sorted(allowed[name])}"
        )
    if name == "branch":
        return branch_values(pool, **options)
    if name == "group_variance":
        return variance_values(pool, **options)
    if name == "expert_aligned":
        opts = dict(options)
        if "similarity" in opts:
            opts["similarity_mode"] = opts.pop("similarity")
        return expert_values(pool, env, **opts)
    return tool_call_values(pool, env, **options)
