"""Harm: scores of the pool against a null of random target directions, and the harmful flag
calibrated on that null (trajectory score or minimum step score below a null quantile)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from trajinf.errors import TrajinfError
from trajinf.scoring.directions import Directions, directions_from_stores
from trajinf.scoring.preconditioners import KfacFactors, scoring_preconditioner
from trajinf.scoring.scores import ScoreResult, score_directions
from trajinf.scoring.source import PoolSource, ScoreConfig
from trajinf.store.feature_store import FeatureStore


def null_scores(
    pool: FeatureStore | PoolSource,
    target: FeatureStore | Directions,
    config: ScoreConfig,
    *,
    n_directions: int = 32,
    seed: int = 0,
    kfac: KfacFactors | Sequence[KfacFactors] | None = None,
) -> ScoreResult:
    """Scores of the pool against ``n_directions`` random targets: each draw replaces every
    subtask direction by an isotropic Gaussian one of the same norm (per checkpoint), and is
    aggregated exactly like the real score. A preconditioner that acts on every target (kfac,
    factors ``kfac`` as for scoring) maps checkpoint c's Gaussian draws before the norm
    rescale, so the null has the anisotropy of preconditioned targets rather than of white
    noise; one that acts on the formed directions (gram) is already in ``target``'s norms.
    ``trajectories``: draw, id, score, min_step_score (N * n_directions rows); ``steps`` is
    empty."""
    src = PoolSource.from_store(pool) if isinstance(pool, FeatureStore) else pool
    if isinstance(target, FeatureStore):
        if not isinstance(pool, FeatureStore):
            raise TrajinfError("null_scores: pass Directions as target for an in-memory pool")
        target = directions_from_stores(pool, target, config, kfac=kfac)
    prec = scoring_preconditioner(config, kfac)
    rng = np.random.default_rng(seed)
    vectors = []
    for c, u in enumerate(target.vectors):  # [S, D]
        g = rng.standard_normal((n_directions, *u.shape)).astype(np.float32)
        if prec.on_targets:
            g = prec.apply(c, g.reshape(-1, u.shape[1])).reshape(n_directions, *u.shape)
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
    if prec.on_targets:
        info["preconditioned"] = prec.name
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
    flags = flags_at_thresholds(result.trajectories, ts, tm)
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


def flags_at_thresholds(
    trajectories: pd.DataFrame, score_threshold: float, step_threshold: float
) -> pd.DataFrame:
    """The harmful flag of each row of a score table (id, score, min_step_score) at given
    thresholds: ``score < score_threshold`` ("score") or ``min_step_score < step_threshold``
    ("step"); NaN scores are never flagged. Returns a DataFrame id, harmful, reason.
    :func:`harmful_flags` calibrates the thresholds; appending reuses the stored ones."""
    s = trajectories["score"].to_numpy(float)
    m = trajectories["min_step_score"].to_numpy(float)
    with np.errstate(invalid="ignore"):
        by_score, by_step = s < score_threshold, m < step_threshold
    reason = np.where(
        by_score & by_step, "score+step", np.where(by_score, "score", np.where(by_step, "step", ""))
    )
    return pd.DataFrame({"id": trajectories["id"], "harmful": by_score | by_step, "reason": reason})
