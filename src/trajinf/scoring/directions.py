"""Target directions: one vector per target subtask and checkpoint, from target features
(subtask means, success minus failure, group advantages), centered against the pool
(``remove_mean``) and preconditioned by the config's scoring-time preconditioner
(:mod:`trajinf.scoring.preconditioners`: gram on the formed directions, fit on the pool's
feature moments; kfac on every target feature, fit on K-FAC factors)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from trajinf.errors import StoreMismatchError, TrajinfError
from trajinf.scoring.preconditioners import (
    PRECONDITIONERS,
    KfacFactors,
    PoolMoments,
    Preconditioner,
    scoring_preconditioner,
)
from trajinf.scoring.source import PoolSource, ScoreConfig, ordered_map, per_checkpoint
from trajinf.store.feature_store import FeatureStore


@dataclass
class Directions:
    """Target directions: ``vectors[c]`` float32 [S, D] per checkpoint, one row per subtask,
    already preconditioned; ``pool_mean[c]`` float32 [D] is subtracted from pool features
    before scoring (None = no centering)."""

    subtasks: list[str]
    vectors: list[np.ndarray]
    lr: list[float]
    pool_mean: list[np.ndarray] | None = None


def target_directions(
    target: np.ndarray | Sequence[np.ndarray],
    config: ScoreConfig,
    *,
    subtasks: Sequence[str] | None = None,
    success: Sequence[bool | None] | None = None,
    reward: Sequence[float] | None = None,
    groups: Sequence[str] | None = None,
    lr: Sequence[float] | None = None,
    kfac: KfacFactors | Sequence[KfacFactors] | None = None,
) -> Directions:
    """Directions [S, D] per checkpoint from target trajectory features [M, D] (per checkpoint).

    subtask: mean of the subtask's targets. success_minus_failure: mean over successes minus
    mean over failures. advantage: ``sum_i A_i t_i / n_s`` with ``A = (r - mean) / std`` within
    each rollout group (reward, else success as 0/1). With cosine the targets are unit-normalized
    first, so scores are means (or differences of means) of cosines.

    With ``preconditioner="kfac"`` each target t is replaced by H^-1 t (:class:`Kfac`;
    ``kfac``: factors of one checkpoint, or one set per checkpoint) before anything else, so
    cosine is ``<x / |x|, H^-1 t / |H^-1 t|>``: the pool feature normalized in plain space, the
    preconditioned target normalized by its own norm.
    """
    ts = per_checkpoint(target)
    prec = scoring_preconditioner(config, kfac)
    if prec.on_targets:
        prec.check(len(ts))
        ts = [prec.apply(c, t) for c, t in enumerate(ts)]
    m = ts[0].shape[0]
    labels = np.asarray(
        ["all"] * m if subtasks is None else [str(s) for s in subtasks], dtype=object
    )
    names = sorted(set(labels.tolist()))
    if config.target_mode == "subtask":
        weights = {s: (labels == s) / max(1, int((labels == s).sum())) for s in names}
    elif config.target_mode == "success_minus_failure":
        if success is None:
            raise TrajinfError("target field 'success' is required for success_minus_failure")
        flags = [_flag(s) for s in success]
        succ = np.array([f is True for f in flags])
        fail = np.array([f is False for f in flags])
        weights = {}
        for s in names:
            a, b = succ & (labels == s), fail & (labels == s)
            if a.any() and b.any():
                weights[s] = a / a.sum() - b / b.sum()
        if not weights:
            raise TrajinfError("target field 'success': no subtask has both successes and failures")
        names = sorted(weights)
    else:
        adv = group_advantages(reward if reward is not None else success, groups)
        weights = {s: adv * (labels == s) / max(1, int((labels == s).sum())) for s in names}
        if not any(np.abs(w).sum() > 0 for w in weights.values()):
            raise TrajinfError("target field 'reward': every rollout group has one outcome")
    vectors = []
    for t in ts:
        if config.metric == "cosine":
            nrm = np.linalg.norm(t, axis=1, keepdims=True)
            t = t / np.where(nrm > 0, nrm, 1.0)
        w = np.stack([weights[s] for s in names]).astype(np.float32)  # [S, M]
        vectors.append(w @ t)
    return Directions(names, vectors, list(lr) if lr is not None else [1.0] * len(ts))


def _flag(v: object) -> bool | None:
    return None if v is None or pd.isna(v) else bool(v)


def group_advantages(
    reward: Sequence[float | bool | None] | None, groups: Sequence[str] | None
) -> np.ndarray:
    """Group-normalized advantages float64 [M]: (r - mean_g) / std_g; 0 for one-outcome groups
    and missing rewards."""
    if reward is None:
        raise TrajinfError("target field 'reward' (or 'success') is required for advantage")
    r = pd.to_numeric(pd.Series(list(reward), dtype=object), errors="coerce").to_numpy(float)
    g = pd.Series(["all"] * len(r) if groups is None else [str(x) for x in groups])
    df = pd.DataFrame({"r": r, "g": g})
    mean = df.groupby("g")["r"].transform("mean").to_numpy()
    std = df.groupby("g")["r"].transform(lambda x: x.std(ddof=0)).to_numpy()
    ok = np.isfinite(r) & (std > 1e-8)
    return np.where(ok, (r - mean) / np.where(ok, std, 1.0), 0.0)


def pool_moments(pool: PoolSource, config: ScoreConfig, c: int, *, second: bool) -> PoolMoments:
    """Moments of checkpoint c's finite pool trajectory features (``second``: also the D x D
    sum of x x^T, float32 block products summed in float64). Blocks are added in block order
    whatever the workers, so the moments are identical; at most ``workers`` D x D block
    products wait in memory."""
    rows = pool.traj_rows[pool.finite]
    total = np.zeros(pool.dim)
    gram = np.zeros((pool.dim, pool.dim)) if second else None

    def block(a: int):
        x = pool.read(c, rows[a : a + config.chunk_rows])
        return x.sum(0, dtype=np.float64), (x.T @ x if second else None)

    blocks = range(0, len(rows), config.chunk_rows)
    for part, xtx in ordered_map(block, blocks, config.workers, window=config.workers):
        total += part
        if gram is not None:
            gram += xtx
    return PoolMoments(max(1, len(rows)), total, gram)


def prepare_directions(pool: PoolSource, directions: Directions, config: ScoreConfig) -> Directions:
    """Center (remove_mean) and precondition directions against the pool's finite trajectory
    features when the config's preconditioner fits on them (gram), one checkpoint at a time
    (one D x D float64 matrix in memory). K-FAC acts on the targets instead
    (:func:`target_directions`)."""
    cls = PRECONDITIONERS[config.preconditioner].cls
    fits_pool = cls is not None and cls.needs_pool
    if not (config.remove_mean or fits_pool):
        return directions
    prec = scoring_preconditioner(config) if fits_pool else Preconditioner()
    means, vectors = [], []
    for c in range(pool.n_ckpt):
        moments = pool_moments(pool, config, c, second=prec.needs_pool)
        means.append(moments.mean.astype(np.float32))
        if prec.needs_pool:
            prec.fit(c, moments)
        vectors.append(prec.apply(c, directions.vectors[c]))
    return Directions(
        directions.subtasks, vectors, directions.lr, means if config.remove_mean else None
    )


def target_inputs(
    target: FeatureStore, config: ScoreConfig, subtasks: Sequence[str] | None
) -> dict:
    it = target.items
    rows = it[(it["step"] == -1) & it["finite"]]
    if subtasks is None:
        for name in (config.subtask_column, "task_id"):
            if name in rows.columns and rows[name].notna().any():
                subtasks = rows[name].fillna("unknown").astype(str).tolist()
                break
    col = lambda name: rows[name].tolist() if name in rows.columns else None  # noqa: E731
    return {
        "target": [target.features(c, rows["row"].to_numpy()) for c in range(target.n_checkpoints)],
        "subtasks": subtasks,
        "success": col("success"),
        "reward": col("reward")
        if "reward" in rows.columns and rows["reward"].notna().any()
        else None,
        "groups": col(config.group_column),
    }


def check_pair(pool: FeatureStore, target: FeatureStore) -> None:
    if pool.dim != target.dim or pool.n_checkpoints != target.n_checkpoints:
        raise StoreMismatchError(
            f"{target.path}: target has dim {target.dim} x {target.n_checkpoints} checkpoints, "
            f"pool {pool.path} has dim {pool.dim} x {pool.n_checkpoints}"
        )


def directions_from_stores(
    pool: FeatureStore,
    target: FeatureStore,
    config: ScoreConfig,
    *,
    target_subtasks: Sequence[str] | None = None,
    kfac: KfacFactors | Sequence[KfacFactors] | None = None,
) -> Directions:
    """Prepared directions for ``pool`` from a target store (lr from the pool manifest;
    ``kfac``: factors for ``preconditioner="kfac"``)."""
    check_pair(pool, target)
    raw = target_directions(
        config=config,
        lr=pool.learning_rates,
        kfac=kfac,
        **target_inputs(target, config, target_subtasks),
    )
    return prepare_directions(PoolSource.from_store(pool), raw, config)
