"""Selection from a scored pool: top-k by influence (or a baseline), harmful flags calibrated
against random target directions, per-step weights, zero-variance and near-duplicate filters.

The budget is always ``k = ceil(fraction * N)`` trajectories of the pool given, so every
method is compared at the same size (success-only may fall short; ``info`` says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from trajinf.errors import TrajinfError
from trajinf.priors.combine import trajectory_prior, weights_from_steps
from trajinf.scoring import (
    Directions,
    PoolSource,
    ScoreConfig,
    ScoreResult,
    directions_from_stores,
    score_directions,
)
from trajinf.store import FeatureStore

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


def null_scores(
    pool: FeatureStore | PoolSource,
    target: FeatureStore | Directions,
    config: ScoreConfig,
    *,
    n_directions: int = 32,
    seed: int = 0,
    transform: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> ScoreResult:
    """Scores of the pool against ``n_directions`` random targets: each draw replaces every
    subtask direction by an isotropic Gaussian one of the same norm (per checkpoint), and is
    aggregated exactly like the real score. ``transform(c, draws [n_directions * S, D])``, if
    given, maps checkpoint c's Gaussian draws before the norm rescale (K-FAC scoring passes its
    preconditioner so the null has the targets' anisotropy). ``trajectories``: draw, id, score,
    min_step_score (N * n_directions rows); ``steps`` is empty."""
    src = PoolSource.from_store(pool) if isinstance(pool, FeatureStore) else pool
    if isinstance(target, FeatureStore):
        if not isinstance(pool, FeatureStore):
            raise TrajinfError("null_scores: pass Directions as target for an in-memory pool")
        target = directions_from_stores(pool, target, config)
    rng = np.random.default_rng(seed)
    vectors = []
    for c, u in enumerate(target.vectors):  # [S, D]
        g = rng.standard_normal((n_directions, *u.shape)).astype(np.float32)
        if transform is not None:
            g = transform(c, g.reshape(-1, u.shape[1])).reshape(n_directions, *u.shape)
        g *= (np.linalg.norm(u, axis=1)[None, :, None]) / np.linalg.norm(g, axis=2, keepdims=True)
        vectors.append(g.reshape(-1, u.shape[1]))
    out = score_directions(src, target, config, vectors)
    n = len(src.traj_rows)
    min_step = np.full((n, n_directions), np.nan, np.float32)
    if len(src.step_owner):
        np.fmin.at(min_step, src.step_owner, out["step"])
    traj = pd.DataFrame(
        {
            "draw": np.repeat(np.arange(n_directions), n),
            "id": np.tile(src.ids, n_directions),
            "score": out["score"].T.ravel(),
            "min_step_score": min_step.T.ravel(),
        }
    )
    steps = pd.DataFrame({"id": [], "step": [], "score": []})
    info = {"null": True, "n_directions": n_directions, "seed": seed}
    if transform is not None:
        info["transformed"] = True
    return ScoreResult(traj, steps, info)


def _thresholds(s0: np.ndarray, m0: np.ndarray, q: float) -> tuple[float, float, float]:
    ts = float(np.quantile(s0, q)) if len(s0) else -np.inf
    fin = m0[np.isfinite(m0)]
    tm = float(np.quantile(fin, q)) if len(fin) else -np.inf
    with np.errstate(invalid="ignore"):
        fpr = float(np.mean((s0 < ts) | (m0 < tm))) if len(s0) else 0.0
    return ts, tm, fpr


def harmful_flags(
    result: ScoreResult, null: ScoreResult, alpha: float = 0.05, *, joint: bool = True
) -> tuple[pd.DataFrame, dict]:
    """Flag trajectories whose score, or whose worst step, is implausibly low under the null.

    A trajectory is flagged if ``score < T_score`` ("score") or ``min_step_score < T_step``
    ("step"); T_* are the q-quantiles of the null trajectory scores and the null per-trajectory
    step minima. With ``joint`` (default) q <= alpha is the largest level at which the fraction
    of null (draw, trajectory) pairs flagged by either rule is <= alpha, so the OR of the two
    rules keeps the false-positive rate at alpha; otherwise q = alpha (FPR up to 2 alpha).
    Returns (DataFrame id, harmful, reason; info dict with thresholds, level, fpr_estimate).
    """
    if not 0 < alpha < 1:
        raise TrajinfError(f"harmful_flags: alpha must be in (0, 1), got {alpha}")
    nt = null.trajectories
    ok = np.isfinite(nt["score"].to_numpy(float))
    s0 = nt["score"].to_numpy(float)[ok]
    m0 = nt["min_step_score"].to_numpy(float)[ok]
    q = alpha
    if joint:
        lo, hi = 0.0, alpha
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _thresholds(s0, m0, mid)[2] <= alpha else (lo, mid)
        q = lo
    ts, tm, fpr = _thresholds(s0, m0, q)
    tr = result.trajectories
    s = tr["score"].to_numpy(float)
    m = tr["min_step_score"].to_numpy(float)
    with np.errstate(invalid="ignore"):
        by_score, by_step = s < ts, m < tm
    reason = np.where(
        by_score & by_step, "score+step", np.where(by_score, "score", np.where(by_step, "step", ""))
    )
    flags = pd.DataFrame({"id": tr["id"], "harmful": by_score | by_step, "reason": reason})
    info = {
        "alpha": alpha,
        "level": q,
        "score_threshold": ts,
        "step_threshold": tm,
        "fpr_estimate": fpr,
        "n_flagged": int(flags["harmful"].sum()),
        "n_null": int(len(s0)),
    }
    return flags, info


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
    trajectory's finite ``step_values`` first (``trajinf.priors.trajectory_prior``).
    ``drop_harmful`` removes ids whose ``harmful`` score column is true before choosing.
    ``step_weights`` gives every chosen trajectory per-step weights: from ``step_values``
    (id, step, value: a step prior or a combination) when given, else from the influence step
    scores with 0 on negative-score steps (1 elsewhere); ``weight_mode`` "binary" or "soft"
    as in ``trajinf.priors.weights_from_steps``. Lists have one entry per step when ``pool``
    holds Trajectory objects, else max step + 1.
    """
    if method not in METHODS:
        raise TrajinfError(f"select: method '{method}' not in {METHODS}")
    if not 0 < fraction <= 1:
        raise TrajinfError(f"select: fraction must be in (0, 1], got {fraction}")
    if weight_mode not in ("binary", "soft"):
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
