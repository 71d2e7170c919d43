"""Influence scores of pool trajectories (and their steps) against target gradient directions.

A target is turned into one direction per subtask and checkpoint (``Directions``); a pool item's
score for subtask s is ``sum_c lr_c * <x_c, u_{s,c}> / ||x_c||`` (cosine) or without the norm
(inner), and its score is the max (or mean) over subtasks. With cosine, ``u_s`` is the mean of the
subtask's unit-normalized target gradients, so this equals the LESS "mean of cosines".

Additivity: a step's score is ``<step_c, u> / ||traj_c||`` against the subtask that gives its
trajectory its score, so steps add up to the trajectory when the trajectory feature is the sum of
its steps (factorized mode). Any remainder (float16 rounding in the store, or the nonlinear Adam
preconditioner in LESS mode) is reported per trajectory as ``additivity_residual`` and spread
over the steps in proportion to their action tokens, so steps always sum to the trajectory
score. ``remove_mean`` subtracts the pool's mean trajectory feature from every trajectory and
the same token-proportional share of it from each step, which keeps that sum intact.

Everything streams over pool rows in blocks of ``chunk_rows`` with float32 math; memory holds
one block, the directions and a few numbers per item (plus one D x D Gram with "gram").
``ScoreConfig.workers`` scores blocks on a thread pool; blocks and the order their results are
combined in are the same for any number of workers, so the results are identical.
Directions live in :mod:`trajinf.scoring.directions`, preconditioners in
:mod:`trajinf.scoring.preconditioners`, the config and pool readers in
:mod:`trajinf.scoring.source`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from trajinf.errors import TrajinfError
from trajinf.scoring.directions import (
    Directions,
    check_pair,
    directions_from_stores,
    prepare_directions,
    target_directions,
    target_inputs,
)
from trajinf.scoring.preconditioners import PRECONDITIONERS, KfacFactors
from trajinf.scoring.source import (
    PoolSource,
    ScoreConfig,
    ordered_map,
    store_ids,
    store_trajectory_rows,
)
from trajinf.store.feature_store import FeatureStore


@dataclass
class ScoreResult:
    """``trajectories``: id, score, score_<subtask>..., best_subtask, n_steps, min_step_score,
    additivity_residual, finite. ``steps``: id, step, score (sum over an id == its score)."""

    trajectories: pd.DataFrame
    steps: pd.DataFrame
    info: dict = field(default_factory=dict)
    directions: Directions | None = None


def _dots(
    pool: PoolSource | FeatureStore,
    dirs: list[np.ndarray],
    mean: list[np.ndarray] | None,
    rows: np.ndarray,
    share: np.ndarray | None,
    c: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Centered features x [n, D] of ``rows`` at checkpoint c and their dots [n, V] with dirs."""
    x = pool.features(c, rows) if isinstance(pool, FeatureStore) else pool.read(c, rows)
    if mean is not None:
        x = x - (mean[c] if share is None else share[:, None] * mean[c])
    return x @ dirs[c].T, x


def _traj_scores(
    pool: PoolSource | FeatureStore,
    rows: np.ndarray,
    directions: Directions,
    config: ScoreConfig,
    vectors: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """(per-direction scores float32 [n, V], norms [n, C]) of trajectory ``rows``."""
    n_ckpt = len(vectors)
    total = np.zeros((len(rows), vectors[0].shape[0]), np.float32)
    norms = np.ones((len(rows), n_ckpt), np.float32)
    for c in range(n_ckpt):
        dot, x = _dots(pool, vectors, directions.pool_mean, rows, None, c)
        if config.metric == "cosine":
            norms[:, c] = np.linalg.norm(x, axis=1)
            dot /= np.where(norms[:, c] > 0, norms[:, c], 1.0)[:, None]
        total += directions.lr[c] * dot
    return total, norms


def traj_blocks(
    pool: PoolSource, directions: Directions, config: ScoreConfig, vectors: list[np.ndarray]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(positions [n], per-direction scores float32 [n, V], norms [n, C])`` over the
    pool's trajectories, ``vectors[c]`` being [V, D] directions (checkpoints lr-weighted)."""
    n = len(pool.traj_rows)

    def block(a: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.arange(a, min(n, a + config.chunk_rows))
        total, norms = _traj_scores(pool, pool.traj_rows[pos], directions, config, vectors)
        return pos, total, norms

    # blocks are the same for any number of workers and come back in order: identical scores
    yield from ordered_map(block, range(0, n, config.chunk_rows), config.workers)


def _aggregate(per: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """[n, G, S] -> (score [n, G], best subtask [n, G])."""
    best = per.argmax(-1)
    score = per.max(-1) if how == "max" else per.mean(-1)
    return score, best


def score_directions(
    pool: PoolSource,
    directions: Directions,
    config: ScoreConfig,
    vectors: list[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Core scorer. ``vectors[c]`` [G*S, D] holds G draws of the S subtask directions (default:
    ``directions.vectors``, G = 1). Returns ``score`` float32 [N, G] (NaN for non-finite
    items), ``per_subtask`` float32 [N, S] (G = 1 only), ``best`` int [N, G], ``step`` float64
    [K, G] (summing to ``score`` per trajectory) and ``residual`` float64 [N, G]."""
    vectors = directions.vectors if vectors is None else vectors
    s = len(directions.subtasks)
    g = vectors[0].shape[0] // s
    n, k = len(pool.traj_rows), len(pool.step_rows)
    score = np.zeros((n, g), np.float32)
    best = np.zeros((n, g), np.int64)
    per_sub = np.zeros((n, s), np.float32) if g == 1 else None
    norms = np.ones((n, pool.n_ckpt), np.float32)
    for pos, total, nrm in traj_blocks(pool, directions, config, vectors):
        per = total.reshape(len(pos), g, s)
        score[pos], best[pos] = _aggregate(per, config.aggregate)
        norms[pos] = nrm
        if per_sub is not None:
            per_sub[pos] = per[:, 0]
    # float64 so the additive correction below is exact even when step scores cancel
    step = np.zeros((k, g), np.float64)

    def step_block(a: int) -> tuple[np.ndarray, np.ndarray]:
        sel = np.arange(a, min(k, a + config.chunk_rows))
        own = pool.step_owner[sel]
        total = np.zeros((len(sel), g * s), np.float32)
        for c in range(pool.n_ckpt):
            rows, share = pool.step_rows[sel], pool.step_share[sel]
            dot, _ = _dots(pool, vectors, directions.pool_mean, rows, share, c)
            nc = norms[own, c]
            # a zero-norm trajectory scores 0 under cosine, and so do its steps
            total += directions.lr[c] * np.where(
                nc[:, None] > 0, dot / np.where(nc > 0, nc, 1.0)[:, None], 0.0
            )
        per = total.reshape(len(sel), g, s)
        if config.aggregate == "max":
            return sel, np.take_along_axis(per, best[own][:, :, None], axis=-1)[..., 0]
        return sel, per.mean(-1)

    for sel, values in ordered_map(step_block, range(0, k, config.chunk_rows), config.workers):
        step[sel] = values
    raw = np.zeros((n, g), np.float64)
    np.add.at(raw, pool.step_owner, step)
    has = np.bincount(pool.step_owner, minlength=n) > 0
    residual = np.where(has[:, None], score - raw, 0.0)
    step += residual[pool.step_owner] * pool.step_share[:, None]
    bad = ~pool.finite
    score[bad] = np.nan
    step[bad[pool.step_owner]] = np.nan
    return {
        "score": score,
        "per_subtask": per_sub,
        "best": best,
        "step": step,
        "residual": residual,
    }


def score_tables(pool: PoolSource, directions: Directions, config: ScoreConfig) -> ScoreResult:
    """The trajectory and step score tables of a pool against prepared ``directions`` (see
    :func:`prepare_directions`); the scoring job is :func:`trajinf.job.run.score_pool`."""
    out = score_directions(pool, directions, config)
    n = len(pool.traj_rows)
    min_step = np.full(n, np.nan, np.float32)
    if len(pool.step_owner):
        np.fmin.at(min_step, pool.step_owner, out["step"][:, 0])
    traj = pd.DataFrame({"id": pool.ids, "score": out["score"][:, 0]})
    for j, name in enumerate(directions.subtasks):
        traj[f"score_{name}"] = out["per_subtask"][:, j]
    traj["best_subtask"] = np.asarray(directions.subtasks, dtype=object)[out["best"][:, 0]]
    traj["n_steps"] = np.bincount(pool.step_owner, minlength=n)
    traj["min_step_score"] = min_step
    traj["additivity_residual"] = out["residual"][:, 0]
    traj["finite"] = pool.finite
    steps = pd.DataFrame(
        {"id": pool.ids[pool.step_owner], "step": pool.step_index, "score": out["step"][:, 0]}
    )
    info = {"config": asdict(config), "subtasks": directions.subtasks, "lr": directions.lr}
    return ScoreResult(traj, steps, info, directions)


def score_stores(
    pool: FeatureStore,
    target: FeatureStore,
    config: ScoreConfig,
    *,
    target_subtasks: Sequence[str] | None = None,
    kfac: KfacFactors | Sequence[KfacFactors] | None = None,
) -> ScoreResult:
    """Score every pool trajectory and step against a target store.

    Target trajectories are grouped by ``config.subtask_column`` of the target items (or by
    ``target_subtasks``, one label per target trajectory row in row order). ``kfac``: factors
    for ``preconditioner="kfac"`` (:func:`trajinf.gradients.kfac.kfac_factors`).
    """
    dirs = directions_from_stores(pool, target, config, target_subtasks=target_subtasks, kfac=kfac)
    return score_tables(PoolSource.from_store(pool), dirs, config)


def score_features(
    pool_traj: np.ndarray | Sequence[np.ndarray],
    target: np.ndarray | Sequence[np.ndarray],
    config: ScoreConfig,
    *,
    subtasks: Sequence[str] | None = None,
    pool_steps: np.ndarray | Sequence[np.ndarray] | None = None,
    step_owner: np.ndarray | None = None,
    step_index: np.ndarray | None = None,
    step_tokens: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    success: Sequence[bool | None] | None = None,
    reward: Sequence[float] | None = None,
    groups: Sequence[str] | None = None,
    lr: Sequence[float] | None = None,
    kfac: KfacFactors | Sequence[KfacFactors] | None = None,
) -> ScoreResult:
    """Array-level :func:`score_stores`: pool [N, D] / steps [K, D] / target [M, D] (or a list
    of such, one per checkpoint, weighted by ``lr``; ``kfac`` as in :func:`score_stores`)."""
    pool = PoolSource.from_arrays(
        pool_traj, steps=pool_steps, step_owner=step_owner, step_index=step_index,
        step_tokens=step_tokens, ids=ids, lr=lr,
    )  # fmt: skip
    raw = target_directions(
        target, config, subtasks=subtasks, success=success, reward=reward, groups=groups,
        lr=pool.lr, kfac=kfac,
    )  # fmt: skip
    return score_tables(pool, prepare_directions(pool, raw, config), config)


def top_k(
    pool: FeatureStore | PoolSource,
    directions: Directions | FeatureStore,
    config: ScoreConfig,
    k: int,
    *,
    kfac: KfacFactors | Sequence[KfacFactors] | None = None,
) -> pd.DataFrame:
    """The ``k`` best-scoring trajectories (id, score; descending, ties by position) without
    holding all N scores: memory is one block plus k. ``directions`` may be a target store
    (``kfac``: factors for ``preconditioner="kfac"``, as in :func:`score_stores`).

    From a store the scan reads one shard's ``step`` column and row flags at a time and keeps
    row numbers and scores of the running top k; ids are read for the k winners only, so
    memory does not grow with the pool (except with ``remove_mean`` or ``gram`` from a target
    store, whose pool pass builds a :class:`PoolSource`)."""
    if isinstance(directions, FeatureStore):
        if not isinstance(pool, FeatureStore):
            raise TrajinfError("top_k: pass Directions for an in-memory pool")
        directions = _store_directions(pool, directions, config, kfac)
    if isinstance(pool, FeatureStore) and not pool.is_view:
        top = _top_k_rows(pool, directions, config, k)
        if top is not None:
            return top
    src = PoolSource.from_store(pool) if isinstance(pool, FeatureStore) else pool
    best_s = np.zeros(0, np.float32)
    best_p = np.zeros(0, np.int64)
    for pos, total, _ in traj_blocks(src, directions, config, directions.vectors):
        s, _ = _aggregate(total[:, None, :], config.aggregate)
        s = np.where(src.finite[pos], s[:, 0], -np.inf)
        best_s, best_p = _merge_top(best_s, best_p, s, pos, k)
    keep = np.isfinite(best_s)
    return pd.DataFrame({"id": src.ids[best_p[keep]], "score": best_s[keep]})


def _merge_top(
    best_s: np.ndarray, best_p: np.ndarray, s: np.ndarray, pos: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the running top and a new block (score descending, then position)."""
    cand_s, cand_p = np.concatenate([best_s, s]), np.concatenate([best_p, pos])
    order = np.lexsort((cand_p, -cand_s))[:k]
    return cand_s[order], cand_p[order]


def _store_directions(
    pool: FeatureStore,
    target: FeatureStore,
    config: ScoreConfig,
    kfac: KfacFactors | Sequence[KfacFactors] | None,
) -> Directions:
    """:func:`directions_from_stores`, without its pool pass when the config needs none (no
    ``remove_mean``, no preconditioner fit on the pool): that pass builds a
    :class:`PoolSource` of every pool row."""
    cls = PRECONDITIONERS[config.preconditioner].cls
    if config.remove_mean or (cls is not None and cls.needs_pool):
        return directions_from_stores(pool, target, config, kfac=kfac)
    check_pair(pool, target)
    # prepare_directions returns the raw directions unchanged under this config
    return target_directions(
        config=config, lr=pool.learning_rates, kfac=kfac, **target_inputs(target, config, None)
    )


def _top_k_rows(
    store: FeatureStore, directions: Directions, config: ScoreConfig, k: int
) -> pd.DataFrame | None:
    """Streaming top k over a store's trajectory rows (same blocks, scores and ties as over
    ``PoolSource.from_store``, positions being row numbers in the same order); None when a
    winner's id also has an earlier trajectory row (from_store would have dropped the row)."""

    def block(item: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        rows, finite = item
        total, _ = _traj_scores(store, rows, directions, config, directions.vectors)
        s, _ = _aggregate(total[:, None, :], config.aggregate)
        return rows, np.where(finite, s[:, 0], -np.inf)

    best_s = np.zeros(0, np.float32)
    best_p = np.zeros(0, np.int64)
    blocks = store_trajectory_rows(store, config.chunk_rows)
    for rows, s in ordered_map(block, blocks, config.workers):
        best_s, best_p = _merge_top(best_s, best_p, s, rows, k)
    keep = np.isfinite(best_s)
    ids, unique = store_ids(store, best_p[keep])
    if not unique:
        return None
    return pd.DataFrame({"id": ids, "score": best_s[keep]})
