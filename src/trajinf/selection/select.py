"""Selection from a scored pool: top-k by influence (or a baseline), harmful flags calibrated
against random target directions, per-step weights, zero-variance and near-duplicate filters.

The budget is always ``k = ceil(fraction * N)`` trajectories of the pool given, so every
method is compared at the same size (success-only may fall short; ``info`` says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from trajinf.errors import TrajinfError
from trajinf.scoring.scores import ScoreResult
from trajinf.selection.priors.combine import WEIGHT_MODES, trajectory_prior, weights_from_steps
from trajinf.store.feature_store import FeatureStore

METHODS = (
    "influence", "random", "full", "success", "rds", "loss", "gradnorm", "length", "prior",
)  # fmt: skip
# statistics column each ranking baseline reads (first present wins); higher = picked first.
_STAT_COLUMNS = {
    "rds": ("rds",),
    "loss": ("loss",),  # highest loss first: the examples the model gets most wrong
    "gradnorm": ("grad_norm", "gradnorm"),
    "length": ("length", "n_action_tokens"),
}


@dataclass
class Selection:
    """Chosen trajectory ids (in selection order), optional per-step weights, and details."""

    ids: list[str]
    step_weights: dict[str, list[float]] | None
    info: dict


def pool_frame(pool: FeatureStore | pd.DataFrame | Sequence[Any]) -> pd.DataFrame:
    """Trajectory table (id, task_id, success, reward, source, ...) of a store's items, a
    DataFrame, or a sequence of Trajectory objects."""
    if isinstance(pool, FeatureStore):
        it = pool.items
        return it[it["step"] == -1].reset_index(drop=True)
    if isinstance(pool, pd.DataFrame):
        if "id" not in pool.columns:
            raise TrajinfError("pool table: missing column 'id'")
        return pool.reset_index(drop=True)
    cols = ("id", "task_id", "success", "reward", "source")
    return pd.DataFrame({c: [getattr(t, c, None) for t in pool] for c in cols})


def _table(scores: ScoreResult | pd.DataFrame | None) -> pd.DataFrame | None:
    return scores.trajectories if isinstance(scores, ScoreResult) else scores


def _ranked(ids: np.ndarray, values: pd.Series, what: str) -> np.ndarray:
    """ids by descending value (NaN/missing excluded; ties keep pool order)."""
    v = pd.to_numeric(pd.Series(ids).map(values), errors="coerce").to_numpy(float)
    if not np.isfinite(v).any():
        raise TrajinfError(f"select: no finite '{what}' values for the pool ids")
    order = np.lexsort((np.arange(len(ids)), -np.nan_to_num(v, nan=-np.inf)))
    return ids[order][np.isfinite(v[order])]


def select(
    method: str,
    pool: FeatureStore | pd.DataFrame | Sequence[Any],
    *,
    fraction: float,
    scores: ScoreResult | pd.DataFrame | None = None,
    step_scores: pd.DataFrame | None = None,
    drop_harmful: bool = False,
    step_weights: bool = False,
    seed: int = 0,
    statistics: pd.DataFrame | None = None,
    step_values: pd.DataFrame | None = None,
    weight_mode: str = "binary",
) -> Selection:
    """Choose ``ceil(fraction * N)`` trajectories of ``pool`` by ``method``.

    influence: highest score first. random: uniform. full: everything (fraction ignored).
    success: successes only, a random subset if more than k. rds / loss / gradnorm / length:
    highest ``statistics`` value first (columns rds, loss, grad_norm, length; loss and length
    fall back to the pool table's loss / n_action_tokens). prior: highest mean of the
    trajectory's finite ``step_values`` first (``trajinf.selection.priors.trajectory_prior``).
    ``drop_harmful`` removes ids whose ``harmful`` score column is true before choosing.
    ``step_weights`` gives every chosen trajectory per-step weights: from ``step_values``
    (id, step, value: a step prior or a combination) when given, else from the influence step
    scores with 0 on negative-score steps (1 elsewhere); ``weight_mode`` "binary" or "soft"
    as in ``trajinf.selection.priors.weights_from_steps``. Lists have one entry per step when ``pool``
    holds Trajectory objects, else max step + 1.
    """
    if method not in METHODS:
        raise TrajinfError(f"select: method '{method}' not in {METHODS}")
    if not 0 < fraction <= 1:
        raise TrajinfError(f"select: fraction must be in (0, 1], got {fraction}")
    if weight_mode not in WEIGHT_MODES:
        raise TrajinfError(f"select: weight_mode must be binary or soft, got {weight_mode!r}")
    frame = pool_frame(pool)
    n = len(frame)
    k = math.ceil(fraction * n)
    ids = frame["id"].astype(str).to_numpy(dtype=object)
    table = _table(scores)
    info: dict[str, Any] = {"method": method, "n_pool": n, "budget": k, "seed": seed}
    if drop_harmful:
        if table is None or "harmful" not in table.columns:
            raise TrajinfError("select: drop_harmful needs scores with a 'harmful' column")
        bad = set(table.loc[table["harmful"].fillna(False).astype(bool), "id"].astype(str))
        info["dropped_harmful"] = int(sum(i in bad for i in ids))
        keep = np.array([i not in bad for i in ids], dtype=bool)
        ids, frame = ids[keep], frame[keep].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    if method == "influence":
        if table is None:
            raise TrajinfError("select: method 'influence' needs scores")
        chosen = _ranked(ids, table.set_index(table["id"].astype(str))["score"], "score")[:k]
    elif method == "random":
        chosen = ids[rng.permutation(len(ids))[:k]]
    elif method == "full":
        chosen = ids
    elif method == "success":
        if "success" not in frame.columns:
            raise TrajinfError("select: method 'success' needs a pool column 'success'")
        succ = ids[frame["success"].fillna(False).astype(bool).to_numpy()]
        chosen = succ[np.sort(rng.permutation(len(succ))[:k])] if len(succ) > k else succ
        info["budget_met"] = len(chosen) == k
    elif method == "prior":
        if step_values is None:
            raise TrajinfError("select: method 'prior' needs step_values (id, step, value)")
        prior = trajectory_prior(step_values)
        chosen = _ranked(ids, prior.set_index("id")["value"], "prior value")[:k]
    else:
        chosen = _ranked(ids, _statistic(method, frame, statistics), method)[:k]
    info["n_selected"] = len(chosen)
    weights = None
    if step_weights:
        n_steps = None
        if not isinstance(pool, FeatureStore | pd.DataFrame):
            n_steps = {str(t.id): len(t.steps()) for t in pool if hasattr(t, "steps")}
        if step_values is not None:
            weights = weights_from_steps(step_values, chosen, mode=weight_mode, n_steps=n_steps)
        elif weight_mode == "soft":
            steps = scores.steps if isinstance(scores, ScoreResult) else step_scores
            if steps is None:
                raise TrajinfError("select: step_weights needs step scores")
            weights = weights_from_steps(steps, chosen, mode="soft", n_steps=n_steps)
        else:
            weights = _step_weights(chosen, scores, step_scores)
    return Selection([str(i) for i in chosen], weights, info)


def _statistic(method: str, frame: pd.DataFrame, statistics: pd.DataFrame | None) -> pd.Series:
    """The ranking column of a baseline: from ``statistics``, else from the pool table."""
    for src in (statistics, frame):
        for col in _STAT_COLUMNS[method] if src is not None else ():
            if col in src.columns:
                return src.set_index(src["id"].astype(str))[col]
    raise TrajinfError(
        f"select: method '{method}' needs a statistics column {_STAT_COLUMNS[method][0]!r}"
    )


def _step_weights(
    chosen: np.ndarray, scores: ScoreResult | pd.DataFrame | None, step_scores: pd.DataFrame | None
) -> dict[str, list[float]]:
    steps = scores.steps if isinstance(scores, ScoreResult) else step_scores
    if steps is None:
        raise TrajinfError("select: step_weights needs step scores")
    out: dict[str, list[float]] = {}
    groups = {str(i): g for i, g in steps.groupby(steps["id"].astype(str))}
    for i in chosen:
        g = groups.get(str(i))
        if g is None or g.empty:
            continue
        w = [1.0] * (int(g["step"].max()) + 1)  # steps truncated away keep weight 1
        for st, sc in zip(g["step"].to_numpy(int), g["score"].to_numpy(float), strict=True):
            w[st] = 0.0 if sc < 0 else 1.0
        out[str(i)] = w
    return out


def zero_variance_filter(
    pool: FeatureStore | pd.DataFrame | Sequence[Any], *, group_field: str = "task_id"
) -> tuple[pd.DataFrame, dict]:
    """Drop rollout groups (>= 2 rollouts of one ``task_id``) whose outcomes (reward, else
    success) are all equal: they carry no learning signal for group-relative methods.
    Returns (kept trajectory table, {"groups_removed", "trajectories_removed"})."""
    frame = pool_frame(pool)
    outcome = np.full(len(frame), np.nan)
    if "success" in frame.columns:
        outcome = frame["success"].astype("Float64").to_numpy(float, na_value=np.nan)
    if "reward" in frame.columns:
        reward = pd.to_numeric(frame["reward"], errors="coerce").to_numpy(float)
        outcome = np.where(np.isnan(reward), outcome, reward)
    g = frame[group_field] if group_field in frame.columns else pd.Series([None] * len(frame))
    df = pd.DataFrame({"g": g.to_numpy(), "o": outcome})
    grouped = df[df["g"].notna()].groupby("g")["o"]
    size, known, spread = grouped.size(), grouped.count(), grouped.agg(lambda x: x.max() - x.min())
    flat = size[(size >= 2) & (known == size) & (spread == 0)].index
    drop = df["g"].isin(flat).to_numpy()
    info = {"groups_removed": len(flat), "trajectories_removed": int(drop.sum())}
    return frame[~drop].reset_index(drop=True), info


def near_duplicate_filter(
    features: np.ndarray,
    threshold: float = 0.98,
    *,
    scores: np.ndarray | None = None,
    block: int = 256,
) -> np.ndarray:
    """Greedy cosine clustering of ``features`` [N, D]: visit items by descending score (input
    order without scores); each unassigned item keeps itself and absorbs every unassigned item
    with cosine >= threshold. Returns kept indices int64 [M], ascending."""
    x = np.asarray(features, np.float32)
    nrm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(nrm > 0, nrm, 1.0)
    n = len(x)
    order = np.arange(n) if scores is None else np.lexsort((np.arange(n), -np.asarray(scores)))
    assigned = np.zeros(n, bool)
    keep = []
    for a in range(0, n, block):
        cand = order[a : a + block]
        cand = cand[~assigned[cand]]
        if not len(cand):
            continue
        sims = x[cand] @ x.T  # [b, N]: one BLAS-3 product per block of candidates
        for j, i in enumerate(cand):
            if assigned[i]:
                continue
            keep.append(i)
            assigned |= sims[j] >= threshold
            assigned[i] = True
    return np.sort(np.asarray(keep, np.int64))
