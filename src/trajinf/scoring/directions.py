"""Target directions: one vector per target subtask and checkpoint, from target features
(subtask means, success minus failure, group advantages), centered and preconditioned
against the pool (``remove_mean``, damped Gram inverse), or K-FAC-preconditioned per target
(``preconditioner="kfac"``, :func:`kfac_precondition`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg

from trajinf.errors import StoreMismatchError, TrajinfError
from trajinf.scoring.source import PoolSource, ScoreConfig, ordered_map, per_checkpoint
from trajinf.store.feature_store import FeatureStore

# {module name: (A [k, k], G [k, k])} in feature (tracked-module) order: see gradients/kfac.py
KfacFactors = Mapping[str, tuple[np.ndarray, np.ndarray]]


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

    With ``preconditioner="kfac"`` each target t is replaced by H^-1 t (:func:`kfac_precondition`;
    ``kfac``: factors of one checkpoint, or one set per checkpoint) before anything else, so
    cosine is ``<x / |x|, H^-1 t / |H^-1 t|>``: the pool feature normalized in plain space, the
    preconditioned target normalized by its own norm.
    """
    ts = per_checkpoint(target)
    if config.preconditioner == "kfac":
        ts = [
            kfac_precondition(t, f, config.kfac_damping)
            for t, f in zip(ts, _per_ckpt_factors(kfac, len(ts)), strict=True)
        ]
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


def _per_ckpt_factors(
    kfac: KfacFactors | Sequence[KfacFactors] | None, n_ckpt: int
) -> list[KfacFactors]:
    if kfac is None:
        raise TrajinfError(
            "ScoreConfig field 'preconditioner': 'kfac' needs factors (kfac=, from "
            "trajinf.gradients.kfac.kfac_factors)"
        )
    sets = [kfac] if isinstance(kfac, Mapping) else list(kfac)
    if len(sets) != n_ckpt:
        raise TrajinfError(f"kfac: {len(sets)} factor sets for {n_ckpt} checkpoints")
    return sets


def _damped_inverse(m: np.ndarray, damping: float) -> np.ndarray:
    """(M + lambda I)^-1 of a symmetric PSD factor, lambda = damping * trace(M) / k; an all-zero
    factor gets lambda = 1 (the identity)."""
    k = m.shape[0]
    lam = damping * float(np.trace(m)) / k
    lam = lam if lam > 0 else (0.0 if np.trace(m) > 0 else 1.0)
    w, v = np.linalg.eigh((m + m.T) / 2)  # symmetrize float rounding away
    w = w + lam
    if w.min() <= 1e-12 * max(1.0, float(w.max())):
        raise TrajinfError(
            f"kfac preconditioner: factor + lambda I is singular; increase ScoreConfig field "
            f"'kfac_damping' (now {damping})"
        )
    return (v / w) @ v.T


def kfac_precondition(vectors: np.ndarray, factors: KfacFactors, damping: float) -> np.ndarray:
    """float32 [M, D]: per layer l, block F_l (row-major k_out x k_in, blocks in ``factors``
    order, as the factorized features lay them out) -> (G_l + lambda_G I)^-1 F_l
    (A_l + lambda_A I)^-1, lambda = damping * trace(factor) / k."""
    v = np.asarray(vectors, np.float64)
    m, d = v.shape
    blocks = list(factors.values())
    k = blocks[0][0].shape[0] if blocks else 0
    if not blocks or len(blocks) * k * k != d:
        raise StoreMismatchError(
            f"kfac: {len(blocks)} layers of {k} x {k} factors do not match feature dim {d}"
        )
    out = np.empty_like(v)
    for i, (a, g) in enumerate(blocks):
        sl = slice(i * k * k, (i + 1) * k * k)
        f = v[:, sl].reshape(m, k, k)
        out[:, sl] = (_damped_inverse(g, damping) @ f @ _damped_inverse(a, damping)).reshape(m, -1)
    return out.astype(np.float32)


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


def prepare_directions(pool: PoolSource, directions: Directions, config: ScoreConfig) -> Directions:
    """Center (remove_mean) and precondition (gram) directions against the pool's finite
    trajectory features, one checkpoint at a time (one D x D float64 Gram in memory)."""
    if not (config.remove_mean or config.preconditioner == "gram"):
        return directions
    rows = pool.traj_rows[pool.finite]
    n, d = max(1, len(rows)), pool.dim
    means, vectors = [], []
    for c in range(pool.n_ckpt):
        total = np.zeros(d)
        gram = np.zeros((d, d)) if config.preconditioner == "gram" else None

        def block(a: int, c: int = c, want_gram: bool = gram is not None):
            x = pool.read(c, rows[a : a + config.chunk_rows])
            return x.sum(0, dtype=np.float64), (x.T @ x if want_gram else None)

        # block sums are added in block order whatever the workers: identical directions; at
        # most `workers` D x D block products wait in memory
        blocks = range(0, len(rows), config.chunk_rows)
        for part, xtx in ordered_map(block, blocks, config.workers, window=config.workers):
            total += part
            if gram is not None:
                gram += xtx  # float32 block product, float64 running sum
        mu = total / n
        means.append(mu.astype(np.float32))
        u = directions.vectors[c]
        if gram is not None:
            raw_tr = np.trace(gram) / n
            if config.remove_mean:
                gram -= n * np.outer(mu, mu)
            gram /= n
            # Centering cancels digits of the float32 block sums, so lambda never drops below
            # their rounding level; an all-zero pool (F == 0) falls back to the identity.
            lam = max(config.damping * np.trace(gram) / d, 1e-5 * raw_tr / d)
            lam = lam if lam > 0 else 1.0
            gram[np.diag_indices(d)] += lam
            try:
                factor = scipy.linalg.cho_factor(gram)
            except np.linalg.LinAlgError as e:
                raise TrajinfError(
                    f"gram preconditioner: (F + lambda I) is not positive definite at checkpoint "
                    f"{c}; increase ScoreConfig field 'damping' (now {config.damping})"
                ) from e
            u = scipy.linalg.cho_solve(factor, u.T.astype(np.float64))
            u = u.T.astype(np.float32)
        vectors.append(u)
    return Directions(
        directions.subtasks, vectors, directions.lr, means if config.remove_mean else None
    )


def target_inputs(
    target: FeatureStore, config: ScoreConfig, subtasks: Sequence[str] | None
) -> dict:
    it = target.items
    rows = it[(it["step"] == -1) & it["finite"]]
    if subtasks is None:
        for name in (config.subtask_field, "task_id"):
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
        "groups": col(config.group_field),
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
