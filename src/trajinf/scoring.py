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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import scipy.linalg

from trajinf.errors import StoreMismatchError, TrajinfError
from trajinf.store import FeatureStore

_CHOICES = {
    "metric": ("cosine", "inner"),
    "aggregate": ("max", "mean"),
    "target_mode": ("subtask", "success_minus_failure", "advantage"),
    "preconditioner": ("none", "gram"),
}


@dataclass
class ScoreConfig:
    """How pool items are scored against a target (see module docstring)."""

    metric: str = "cosine"  # "cosine" | "inner"
    aggregate: str = "max"  # across target subtasks: "max" | "mean" (mean within subtask)
    remove_mean: bool = False  # subtract the pool's mean trajectory feature first
    target_mode: str = "subtask"  # "subtask" | "success_minus_failure" | "advantage"
    preconditioner: str = "none"  # "none" | "gram": damped (F + lambda I)^-1 on the targets
    damping: float = 1e-3  # lambda = damping * trace(F) / D (relative to the mean eigenvalue)
    chunk_rows: int = 65536  # pool rows per block
    subtask_field: str = "subtask"  # target items column of subtasks (falls back to task_id)
    group_field: str = "task_id"  # target items column of rollout groups (advantage mode)

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise TrajinfError(
                    f"ScoreConfig field '{name}': {getattr(self, name)!r} not in {allowed}"
                )
        if self.chunk_rows < 1 or self.damping < 0:
            raise TrajinfError("ScoreConfig fields 'chunk_rows' >= 1 and 'damping' >= 0 required")


@dataclass
class Directions:
    """Target directions: ``vectors[c]`` float32 [S, D] per checkpoint, one row per subtask,
    already preconditioned; ``pool_mean[c]`` float32 [D] is subtracted from pool features
    before scoring (None = no centering)."""

    subtasks: list[str]
    vectors: list[np.ndarray]
    lr: list[float]
    pool_mean: list[np.ndarray] | None = None


@dataclass
class ScoreResult:
    """``trajectories``: id, score, score_<subtask>..., best_subtask, n_steps, min_step_score,
    additivity_residual, finite. ``steps``: id, step, score (sum over an id == its score)."""

    trajectories: pd.DataFrame
    steps: pd.DataFrame
    info: dict = field(default_factory=dict)
    directions: Directions | None = None


@dataclass
class PoolSource:
    """Pool rows behind a reader: ``read(ckpt, rows int64 [n]) -> float32 [n, D]``.

    Trajectory i lives at row ``traj_rows[i]``; step k at ``step_rows[k]`` belongs to
    trajectory ``step_owner[k]`` and carries ``step_share[k]`` of its action tokens.
    """

    read: Callable[[int, np.ndarray], np.ndarray]
    n_ckpt: int
    dim: int
    lr: list[float]
    ids: np.ndarray
    traj_rows: np.ndarray
    finite: np.ndarray
    step_rows: np.ndarray
    step_owner: np.ndarray
    step_index: np.ndarray
    step_share: np.ndarray = field(init=False)
    step_tokens: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.traj_rows)
        k = len(self.step_rows)
        tok = np.ones(k) if self.step_tokens is None else np.asarray(self.step_tokens, float)
        total = np.bincount(self.step_owner, weights=tok, minlength=n)
        count = np.bincount(self.step_owner, minlength=n).astype(float)
        # Items whose steps carry no action tokens split evenly, so shares still sum to one.
        even = total[self.step_owner] <= 0
        share = np.where(even, 0.0, tok / np.where(even, 1.0, total[self.step_owner]))
        share[even] = 1.0 / count[self.step_owner][even]
        self.step_share = share.astype(np.float32)

    @classmethod
    def from_store(cls, store: FeatureStore) -> PoolSource:
        """Pool rows of a store: ``step == -1`` rows are trajectories, the rest their steps."""
        it = store.items
        traj = it[it["step"] == -1].drop_duplicates("id")
        owner = pd.Index(traj["id"]).get_indexer(it["id"])  # -1: step of no trajectory
        steps = it[(it["step"] >= 0).to_numpy() & (owner >= 0)]
        owner = owner[(it["step"] >= 0).to_numpy() & (owner >= 0)]
        return cls(
            read=lambda c, rows: store.features(c, rows),
            n_ckpt=store.n_checkpoints,
            dim=store.dim,
            lr=store.learning_rates,
            ids=traj["id"].to_numpy(dtype=object),
            traj_rows=traj["row"].to_numpy(np.int64),
            finite=traj["finite"].to_numpy(bool),
            step_rows=steps["row"].to_numpy(np.int64),
            step_owner=owner.astype(np.int64),
            step_index=steps["step"].to_numpy(np.int64),
            step_tokens=steps["n_action_tokens"].to_numpy(np.float64),
        )

    @classmethod
    def from_arrays(
        cls,
        traj: np.ndarray | Sequence[np.ndarray],
        *,
        steps: np.ndarray | Sequence[np.ndarray] | None = None,
        step_owner: np.ndarray | None = None,
        step_index: np.ndarray | None = None,
        step_tokens: np.ndarray | None = None,
        ids: Sequence[str] | None = None,
        finite: np.ndarray | None = None,
        lr: Sequence[float] | None = None,
    ) -> PoolSource:
        """In-memory pool: ``traj`` [N, D] (or one per checkpoint), ``steps`` [K, D] (or one per
        checkpoint) with ``step_owner`` int [K] indexing traj rows."""
        tr = _per_ckpt(traj)
        n, d = tr[0].shape
        if steps is None:
            st = [np.zeros((0, d), np.float32) for _ in tr]
            step_owner = np.zeros(0, np.int64)
        else:
            st = _per_ckpt(steps)
        k = len(st[0])
        owner = np.asarray(step_owner, np.int64)
        index = np.asarray(step_index, np.int64) if step_index is not None else _ranks(owner)
        allrows = [np.concatenate([t, s]) for t, s in zip(tr, st, strict=True)]
        return cls(
            read=lambda c, rows: allrows[c][rows],
            n_ckpt=len(tr),
            dim=d,
            lr=list(lr) if lr is not None else [1.0] * len(tr),
            ids=np.asarray(ids if ids is not None else [str(i) for i in range(n)], dtype=object),
            traj_rows=np.arange(n, dtype=np.int64),
            finite=np.ones(n, bool) if finite is None else np.asarray(finite, bool),
            step_rows=np.arange(n, n + k, dtype=np.int64),
            step_owner=owner,
            step_index=index,
            step_tokens=step_tokens,
        )


def _per_ckpt(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """[N, D] -> one checkpoint; [C, N, D] or a list of [N, D] -> one array per checkpoint."""
    if isinstance(x, np.ndarray) and x.ndim == 2:
        return [x.astype(np.float32, copy=False)]
    return [np.asarray(a, np.float32) for a in x]


def _ranks(owner: np.ndarray) -> np.ndarray:
    """Position of each step within its owner, in order of appearance."""
    return pd.Series(owner).groupby(owner).cumcount().to_numpy(np.int64)


def target_directions(
    target: np.ndarray | Sequence[np.ndarray],
    config: ScoreConfig,
    *,
    subtasks: Sequence[str] | None = None,
    success: Sequence[bool | None] | None = None,
    reward: Sequence[float] | None = None,
    groups: Sequence[str] | None = None,
    lr: Sequence[float] | None = None,
) -> Directions:
    """Directions [S, D] per checkpoint from target trajectory features [M, D] (per checkpoint).

    subtask: mean of the subtask's targets. success_minus_failure: mean over successes minus
    mean over failures. advantage: ``sum_i A_i t_i / n_s`` with ``A = (r - mean) / std`` within
    each rollout group (reward, else success as 0/1). With cosine the targets are unit-normalized
    first, so scores are means (or differences of means) of cosines.
    """
    ts = _per_ckpt(target)
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
        for a in range(0, len(rows), config.chunk_rows):
            x = pool.read(c, rows[a : a + config.chunk_rows])
            total += x.sum(0, dtype=np.float64)
            if gram is not None:
                gram += x.T @ x  # float32 block product, float64 running sum
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


def _dots(
    pool: PoolSource,
    dirs: list[np.ndarray],
    mean: list[np.ndarray] | None,
    rows: np.ndarray,
    share: np.ndarray | None,
    c: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Centered features x [n, D] of ``rows`` at checkpoint c and their dots [n, V] with dirs."""
    x = pool.read(c, rows)
    if mean is not None:
        x = x - (mean[c] if share is None else share[:, None] * mean[c])
    return x @ dirs[c].T, x


def traj_blocks(
    pool: PoolSource, directions: Directions, config: ScoreConfig, vectors: list[np.ndarray]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(positions [n], per-direction scores float32 [n, V], norms [n, C])`` over the
    pool's trajectories, ``vectors[c]`` being [V, D] directions (checkpoints lr-weighted)."""
    n = len(pool.traj_rows)
    for a in range(0, n, config.chunk_rows):
        pos = np.arange(a, min(n, a + config.chunk_rows))
        total = np.zeros((len(pos), vectors[0].shape[0]), np.float32)
        norms = np.ones((len(pos), pool.n_ckpt), np.float32)
        for c in range(pool.n_ckpt):
            dot, x = _dots(pool, vectors, directions.pool_mean, pool.traj_rows[pos], None, c)
            if config.metric == "cosine":
                norms[:, c] = np.linalg.norm(x, axis=1)
                dot /= np.where(norms[:, c] > 0, norms[:, c], 1.0)[:, None]
            total += directions.lr[c] * dot
        yield pos, total, norms


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
    for a in range(0, k, config.chunk_rows):
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
            step[sel] = np.take_along_axis(per, best[own][:, :, None], axis=-1)[..., 0]
        else:
            step[sel] = per.mean(-1)
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


def score_pool(pool: PoolSource, directions: Directions, config: ScoreConfig) -> ScoreResult:
    """Score a pool against prepared ``directions`` (see :func:`prepare_directions`)."""
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


def _target_inputs(
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


def _check_pair(pool: FeatureStore, target: FeatureStore) -> None:
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
) -> Directions:
    """Prepared directions for ``pool`` from a target store (lr from the pool manifest)."""
    _check_pair(pool, target)
    raw = target_directions(
        config=config, lr=pool.learning_rates, **_target_inputs(target, config, target_subtasks)
    )
    return prepare_directions(PoolSource.from_store(pool), raw, config)


def score_stores(
    pool: FeatureStore,
    target: FeatureStore,
    config: ScoreConfig,
    *,
    target_subtasks: Sequence[str] | None = None,
) -> ScoreResult:
    """Score every pool trajectory and step against a target store.

    Target trajectories are grouped by ``config.subtask_field`` of the target items (or by
    ``target_subtasks``, one label per target trajectory row in row order).
    """
    dirs = directions_from_stores(pool, target, config, target_subtasks=target_subtasks)
    return score_pool(PoolSource.from_store(pool), dirs, config)


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
) -> ScoreResult:
    """Array-level :func:`score_stores`: pool [N, D] / steps [K, D] / target [M, D] (or a list
    of such, one per checkpoint, weighted by ``lr``)."""
    pool = PoolSource.from_arrays(
        pool_traj, steps=pool_steps, step_owner=step_owner, step_index=step_index,
        step_tokens=step_tokens, ids=ids, lr=lr,
    )  # fmt: skip
    raw = target_directions(
        target, config, subtasks=subtasks, success=success, reward=reward, groups=groups, lr=pool.lr
    )
    return score_pool(pool, prepare_directions(pool, raw, config), config)


def top_k(
    pool: FeatureStore | PoolSource,
    directions: Directions | FeatureStore,
    config: ScoreConfig,
    k: int,
) -> pd.DataFrame:
    """The ``k`` best-scoring trajectories (id, score; descending, ties by position) without
    holding all N scores: memory is one block plus k. ``directions`` may be a target store."""
    src = PoolSource.from_store(pool) if isinstance(pool, FeatureStore) else pool
    if isinstance(directions, FeatureStore):
        if not isinstance(pool, FeatureStore):
            raise TrajinfError("top_k: pass Directions for an in-memory pool")
        directions = directions_from_stores(pool, directions, config)
    best_s = np.zeros(0, np.float32)
    best_p = np.zeros(0, np.int64)
    for pos, total, _ in traj_blocks(src, directions, config, directions.vectors):
        s, _ = _aggregate(total[:, None, :], config.aggregate)
        s = np.where(src.finite[pos], s[:, 0], -np.inf)
        cand_s, cand_p = np.concatenate([best_s, s]), np.concatenate([best_p, pos])
        order = np.lexsort((cand_p, -cand_s))[:k]
        best_s, best_p = cand_s[order], cand_p[order]
    keep = np.isfinite(best_s)
    return pd.DataFrame({"id": src.ids[best_p[keep]], "score": best_s[keep]})
