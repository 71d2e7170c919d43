"""Repair instead of discard: per trajectory, keep it, weight its bad steps 0, or drop it.

Input is the harm flag and its per-step marks (:mod:`trajinf.scoring.calibration`: a step is
bad when its drop below the rest of its trajectory exceeds the calibrated threshold). A
trajectory that is right for eight steps and wrong at one is worth more with that step masked
than thrown away; one that is wrong at most of its steps, or whose only step is bad, is not::

    not flagged                                     -> kept      (every step weight 1)
    flagged, 1 <= bad steps <= max_bad_fraction * n -> repaired  (bad steps weight 0)
    flagged otherwise                               -> dropped

The selection ranks kept and repaired trajectories together by influence; a repaired
trajectory's score is its score minus its bad steps' scores (step scores add up to the
trajectory's), i.e. the influence of what will actually be trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from trajinf.errors import TrajinfError
from trajinf.selection.select import Selection, pool_frame, select

CHOICES = ("kept", "repaired", "dropped")


def repair_plan(
    harm: pd.DataFrame,
    harm_steps: pd.DataFrame,
    *,
    max_bad_fraction: float = 0.34,
) -> pd.DataFrame:
    """One row per trajectory of ``harm`` (id, harmful): id, choice (kept / repaired /
    dropped), n_steps, bad_steps (sorted list of step indices), reason.

    ``harm_steps``: id, step, bad (bool). A flagged trajectory is repaired when it has at least
    one bad step and at most ``max(1, floor(max_bad_fraction * n_steps))`` of them, with at least
    one good step left; otherwise dropped."""
    if not 0 < max_bad_fraction <= 1:
        raise TrajinfError(f"repair: max_bad_fraction must be in (0, 1], got {max_bad_fraction}")
    for name, table, cols in (("harm", harm, ("id", "harmful")), ("harm_steps", harm_steps,
                                                                   ("id", "step", "bad"))):  # fmt: skip
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise TrajinfError(f"repair: {name} table lacks column(s) {missing}")
    steps = {str(i): g for i, g in harm_steps.groupby(harm_steps["id"].astype(str))}
    rows = []
    for i, flagged in zip(harm["id"].astype(str), harm["harmful"].fillna(False), strict=True):
        g = steps.get(i)
        n = 0 if g is None else len(g)
        bad = [] if g is None else sorted(int(s) for s in g.loc[g["bad"].astype(bool), "step"])
        if not flagged:
            choice, reason = "kept", ""
        elif not bad:
            choice, reason = "dropped", "flagged, no single bad step"
        elif len(bad) >= n or len(bad) > max(1, math.floor(max_bad_fraction * n)):
            choice, reason = "dropped", f"{len(bad)} of {n} steps bad"
        else:
            choice, reason = "repaired", f"{len(bad)} of {n} steps weighted 0"
        rows.append({"id": i, "choice": choice, "n_steps": n, "bad_steps": bad, "reason": reason})
    return pd.DataFrame(rows, columns=["id", "choice", "n_steps", "bad_steps", "reason"])


def select_repaired(
    pool: Any,
    *,
    fraction: float,
    scores: pd.DataFrame,
    step_scores: pd.DataFrame,
    plan: pd.DataFrame,
    mode: str = "repair",
    n_steps: dict[str, int] | None = None,
    rerank: bool = True,
) -> Selection:
    """Influence top ``ceil(fraction * N)`` after harm handling (N: the whole pool given).

    mode "repair": dropped trajectories are removed, repaired ones given weight 0 on their bad
    steps and ranked by their score minus those steps' scores (``rerank``) or by their score as
    it was (``rerank=False``: repair never moves a trajectory into the budget). mode "drop":
    every flagged trajectory (repaired or dropped) is removed. mode "keep": the plain influence
    top k.
    ``info["harm"]`` counts kept / repaired / dropped in the pool and in the selection;
    ``info["choices"]`` is the choice of every selected trajectory."""
    if mode not in ("repair", "drop", "keep"):
        raise TrajinfError(f"select_repaired: mode must be repair, drop or keep, got {mode!r}")
    frame = pool_frame(pool)
    n = len(frame)
    k = math.ceil(fraction * n)
    choice = plan.set_index(plan["id"].astype(str))
    ids = frame["id"].astype(str)
    missing = sorted(set(ids) - set(choice.index))
    if missing:
        raise TrajinfError(f"select_repaired: no repair choice for id {missing[0]!r}")
    ch = ids.map(choice["choice"])
    drop = {"repair": ch == "dropped", "drop": ch != "kept", "keep": ch != ch}[mode]
    table = scores.assign(id=scores["id"].astype(str)).set_index("id")
    adjusted = table["score"].astype(float).copy()
    bad_steps = {i: choice.at[i, "bad_steps"] for i in ids[ch == "repaired"]}
    if mode == "repair" and bad_steps and rerank:
        st = step_scores.assign(id=step_scores["id"].astype(str))
        st = st[st["id"].isin(bad_steps)]
        is_bad = [int(s) in bad_steps[i] for i, s in zip(st["id"], st["step"], strict=True)]
        adjusted = adjusted.sub(st[is_bad].groupby("id")["score"].sum(), fill_value=0.0)
    kept = frame[~drop.to_numpy()]
    ranked = table.assign(score=adjusted).reset_index()
    if len(kept):
        sel = select("influence", kept, fraction=min(1.0, k / max(1, len(kept))), scores=ranked)
        sel.ids = sel.ids[:k]
    else:  # every trajectory flagged and dropped: an empty selection, not an error
        sel = Selection(ids=[], step_weights=None, info={})
    weights = None
    if mode == "repair":
        weights = {}
        for i in sel.ids:
            if i in bad_steps:
                count = (n_steps or {}).get(i) or int(choice.at[i, "n_steps"])
                count = max(count, max(bad_steps[i]) + 1)
                weights[i] = [0.0 if s in bad_steps[i] else 1.0 for s in range(count)]
    chosen = ch.set_axis(ids)
    sel.info.update(
        method=f"influence+{mode}",
        n_pool=n,
        budget=k,
        n_selected=len(sel.ids),
        harm={
            "mode": mode,
            "pool": {c: int((ch == c).sum()) for c in CHOICES},
            "selected": {c: int(sum(chosen[i] == c for i in sel.ids)) for c in CHOICES},
        },
        choices={i: str(chosen[i]) for i in sel.ids},
    )
    return Selection(sel.ids, weights, sel.info)


def choice_counts(plan: pd.DataFrame, ids: Sequence[str] | None = None) -> dict[str, int]:
    """kept / repaired / dropped counts of ``plan`` (restricted to ``ids`` when given)."""
    p = plan if ids is None else plan[plan["id"].astype(str).isin(set(map(str, ids)))]
    return {c: int(np.sum(p["choice"] == c)) for c in CHOICES}
