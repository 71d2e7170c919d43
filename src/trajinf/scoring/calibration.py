"""Harm that looks like help: a per-step harm score and a flag calibrated on known-good
trajectories (issue 13).

Evidence of harm is a step whose gradient opposes the target's: its alignment with the target
direction is far below the rest of its own trajectory's steps. For every step k of a trajectory
the *step alignment* ``a_k = sum_c lr_c <x_kc, u_c> / |x_kc|`` (the step feature's cosine with
the target direction of the trajectory's best subtask, lr-weighted over checkpoints; the sign is
kept) is compared with the trajectory's other steps, and the trajectory's harm score is the
largest such drop::

    drop_k = median_{j != k} a_j - a_k          harm = max_k drop_k,  worst step = argmax_k

(one-step trajectories: ``drop = -a``). A plausible trajectory that is right for eight steps
and wrong at one has eight well-aligned steps and one opposing step: a large drop at that step.
Off-target trajectories have every step near 0 (no drop), noisy ones many low steps.

**Calibration.** The null is not a random direction (it describes no real pool) but what is
known to be good: the target itself. Each target trajectory's steps are scored, in the pool's
feature space (same extraction preconditioner), against the directions built from the *rest*
of the target (leave-one-out), and its harm score computed exactly as for a pool trajectory.
A pool trajectory is flagged when its harm score exceeds the threshold those known-good scores
give at level ``alpha``: the split-conformal quantile (the ceil((n+1)(1-alpha))-th smallest of
n scores) when ``n + 1 >= 1 / alpha``, else a Gaussian prediction bound
``mean + t_{1-alpha, n-1} sd sqrt(1 + 1/n)`` (exact for normal scores; ``info["method"]`` says
which). Either way the false-positive rate is a claim about trajectories exchangeable with the
target's: it must be measured on known-good trajectories (:func:`flag_rate`, with a
Clopper-Pearson or Wilson interval), not assumed.

Steps, not only totals: a step is *bad* when its own drop exceeds the threshold;
:mod:`trajinf.selection.repair` weights bad steps 0 instead of discarding the trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from trajinf.errors import TrajinfError
from trajinf.scoring.directions import (
    Directions,
    prepare_directions,
    target_directions,
    target_inputs,
)
from trajinf.scoring.preconditioners import KfacFactors
from trajinf.scoring.scores import score_directions
from trajinf.scoring.source import PoolSource, ScoreConfig, ordered_map
from trajinf.store.feature_store import FeatureStore

STATISTICS = ("drop", "min")
ONSET = 0.5  # the located bad step: the first whose drop reaches this share of the largest
SIGNALS = ("surprise", "alignment")


@dataclass
class HarmResult:
    """``trajectories``: id, harm, worst_step, harm_p (conformal p-value, or the Gaussian
    tail probability), harmful, n_bad_steps. ``steps``: id, step, alignment, drop, bad.
    ``info``: alpha, threshold, method, n_calibration, calibration scores summary."""

    trajectories: pd.DataFrame
    steps: pd.DataFrame
    info: dict


def step_alignment(
    pool: PoolSource,
    directions: Directions,
    config: ScoreConfig,
    vectors: list[np.ndarray] | None = None,
) -> np.ndarray:
    """float64 [K, G]: each step's lr-weighted cosine with the direction of its trajectory's best
    subtask (under each of G direction sets ``vectors[c]`` [G*S, D]; default the directions,
    G = 1). With ``metric="inner"`` the plain lr-weighted inner product. Centered like scoring
    (``directions.pool_mean``, a step taking its token share of the mean). Zero-norm steps: 0."""
    vectors = directions.vectors if vectors is None else vectors
    s = len(directions.subtasks)
    g = vectors[0].shape[0] // s
    best = score_directions(pool, directions, config, vectors)["best"]  # [N, G]
    k = len(pool.step_rows)
    out = np.zeros((k, g), np.float64)

    def block(a: int) -> tuple[np.ndarray, np.ndarray]:
        sel = np.arange(a, min(k, a + config.chunk_rows))
        total = np.zeros((len(sel), g * s), np.float64)
        for c in range(pool.n_ckpt):
            x = pool.read(c, pool.step_rows[sel])
            if directions.pool_mean is not None:
                x = x - pool.step_share[sel][:, None] * directions.pool_mean[c]
            dot = x @ vectors[c].T
            if config.metric == "cosine":
                nrm = np.linalg.norm(x, axis=1)
                dot = np.where(nrm[:, None] > 0, dot / np.where(nrm > 0, nrm, 1.0)[:, None], 0.0)
            total += directions.lr[c] * dot
        per = total.reshape(len(sel), g, s)
        own = best[pool.step_owner[sel]]  # [n, G]
        return sel, np.take_along_axis(per, own[:, :, None], axis=-1)[..., 0]

    for sel, values in ordered_map(block, range(0, k, config.chunk_rows), config.workers):
        out[sel] = values
    return out


def step_log_norms(pool: PoolSource, chunk_rows: int = 65536) -> np.ndarray:
    """float64 [K]: lr-weighted mean over checkpoints of log |x_kc| (the step feature's norm;
    -inf for an all-zero step)."""
    k = len(pool.step_rows)
    out = np.zeros(k, np.float64)
    total = float(sum(pool.lr)) or 1.0
    for a in range(0, k, chunk_rows):
        sel = slice(a, min(k, a + chunk_rows))
        for c in range(pool.n_ckpt):
            nrm = np.linalg.norm(pool.read(c, pool.step_rows[sel]).astype(np.float64), axis=1)
            with np.errstate(divide="ignore"):
                out[sel] += pool.lr[c] * np.log(nrm) / total
    return out


def step_values(
    pool: PoolSource,
    directions: Directions,
    config: ScoreConfig,
    signal: str = "surprise",
    vectors: list[np.ndarray] | None = None,
) -> np.ndarray:
    """float64 [K, G]: the per-step value whose drop below the trajectory's other steps is the
    evidence. ``alignment``: :func:`step_alignment` (the sign of the step's agreement with the
    target). ``surprise``: minus the step's log gradient norm (:func:`step_log_norms`), so a
    step whose gradient is far larger than its trajectory's others (the model, warmed up toward
    the target, disagrees with that action) drops; it does not depend on the direction, so all
    G columns are equal."""
    if signal not in SIGNALS:
        raise TrajinfError(f"harm signal must be one of {SIGNALS}, got {signal!r}")
    if signal == "alignment":
        return step_alignment(pool, directions, config, vectors)
    g = (directions.vectors if vectors is None else vectors)[0].shape[0] // len(directions.subtasks)
    v = -step_log_norms(pool, config.chunk_rows)
    return np.repeat(v[:, None], g, axis=1)


def step_drops(
    values: np.ndarray, owner: np.ndarray, n: int, statistic: str = "drop"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step drops float64 [K] and per-trajectory (harm [n], worst step position [n] into
    ``values``, -1 without steps) of step alignments ``values`` [K] owned by ``owner`` [K].

    drop: median of the trajectory's other steps minus the step (one step: minus the step);
    min: minus the step (the opposition alone). NaN alignments give NaN drops and are never
    the worst step."""
    if statistic not in STATISTICS:
        raise TrajinfError(f"harm statistic must be one of {STATISTICS}, got {statistic!r}")
    v = np.asarray(values, np.float64)
    owner = np.asarray(owner, np.int64)
    drops = -v.copy()
    if statistic == "drop":
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(n + 1))
        for i in range(n):
            idx = order[bounds[i] : bounds[i + 1]]
            if len(idx) < 2:
                continue
            vi = v[idx]
            for j, pos in enumerate(idx):
                others = np.delete(vi, j)
                others = others[np.isfinite(others)]
                if len(others):
                    drops[pos] = float(np.median(others)) - vi[j]
    harm = np.full(n, np.nan)
    worst = np.full(n, -1, np.int64)
    ok = np.isfinite(drops)
    for pos in np.flatnonzero(ok):
        i = owner[pos]
        if not np.isfinite(harm[i]) or drops[pos] > harm[i]:
            harm[i], worst[i] = drops[pos], pos
    return drops, harm, worst


def onset_steps(
    drops: np.ndarray,
    owner: np.ndarray,
    step_index: np.ndarray,
    harm: np.ndarray,
    worst: np.ndarray,
    onset: float = ONSET,
) -> np.ndarray:
    """Per trajectory, the position (into ``drops``) of its located bad step: the earliest step
    (by ``step_index``) whose drop reaches ``onset`` times the trajectory's largest drop
    ``harm``; ``worst`` (the largest drop's position, -1 without steps) where ``harm <= 0`` or
    ``onset >= 1``. A wrong action takes the episode off the target's path, so the steps after
    it drop too, sometimes further (measured: one-bad-step top-1 0.42 -> 0.46 on TextWorld
    Express, 0.40 -> 0.45 on ToolWorld, planted steps unchanged; docs/benchmarks.md)."""
    if not 0 < onset <= 1:
        raise TrajinfError(f"harm onset must be in (0, 1], got {onset}")
    out = np.asarray(worst, np.int64).copy()
    if onset >= 1:
        return out
    drops = np.asarray(drops, np.float64)
    owner = np.asarray(owner, np.int64)
    step_index = np.asarray(step_index, np.int64)
    largest = np.asarray(harm, np.float64)[owner]  # each step's trajectory's largest drop
    with np.errstate(invalid="ignore"):
        reach = np.isfinite(drops) & (drops >= onset * largest) & (largest > 0)
    pos = np.flatnonzero(reach)
    # earliest step per owner: sort by (owner, step) and keep each owner's first
    order = pos[np.lexsort((step_index[pos], owner[pos]))]
    first = np.unique(owner[order], return_index=True)
    out[first[0]] = order[first[1]]
    return out


def loo_directions(
    target: Sequence[np.ndarray],
    config: ScoreConfig,
    *,
    subtasks: Sequence[str] | None = None,
    lr: Sequence[float] | None = None,
    kfac: KfacFactors | Sequence[KfacFactors] | None = None,
    success: Sequence[bool | None] | None = None,
    reward: Sequence[float] | None = None,
    groups: Sequence[str] | None = None,
) -> tuple[Directions, list[np.ndarray], list[str]]:
    """Leave-one-out target directions: for each target trajectory i, the directions of every
    subtask built from the target without i. Returns (the full-target Directions as a template,
    ``vectors[c]`` float32 [M*S, D] (draw i = the directions without target i), subtask names).
    A subtask that would be empty without i keeps its full direction."""
    ts = [np.asarray(t, np.float32) for t in target]
    m = ts[0].shape[0]
    labels = ["all"] * m if subtasks is None else [str(x) for x in subtasks]
    kw = dict(lr=lr, kfac=kfac)
    full = target_directions(
        ts, config, subtasks=labels, success=success, reward=reward, groups=groups, **kw
    )
    names = full.subtasks
    per_ckpt: list[list[np.ndarray]] = [[] for _ in ts]
    pick = lambda seq, keep: None if seq is None else [seq[j] for j in keep]  # noqa: E731
    for i in range(m):
        keep = [j for j in range(m) if j != i]
        try:
            d = target_directions(
                [t[keep] for t in ts],
                config,
                subtasks=pick(labels, keep),
                success=pick(success, keep),
                reward=pick(reward, keep),
                groups=pick(groups, keep),
                **kw,
            )
        except TrajinfError:
            d = full  # e.g. the only failure of a success-minus-failure target left out
        for c in range(len(ts)):
            rows = {n: v for n, v in zip(d.subtasks, d.vectors[c], strict=True)}
            per_ckpt[c].append(
                np.stack([rows.get(n, full.vectors[c][names.index(n)]) for n in names])
            )
    vectors = [np.concatenate(v, axis=0).astype(np.float32) for v in per_ckpt]
    return full, vectors, names


def calibration_scores(
    calib: PoolSource,
    target: Sequence[np.ndarray],
    config: ScoreConfig,
    *,
    pool: PoolSource | None = None,
    statistic: str = "drop",
    signal: str = "surprise",
    known_good: np.ndarray | None = None,
    **target_kw,
) -> np.ndarray:
    """Harm scores float64 [M'] of the known-good target trajectories, leave-one-out.

    ``calib``: the M target trajectories (and their steps) in the POOL's feature space (same
    extraction as the pool), in the same order as ``target`` (per-checkpoint plain target
    features [M, D], what the directions are built from). ``pool``: the pool, when the config
    centers or preconditions against it (remove_mean, gram). ``target_kw``: subtasks, lr, kfac,
    success, reward, groups as in :func:`trajinf.scoring.directions.target_directions`.
    ``known_good`` bool [M]: which target trajectories count as good (default: success is not
    False)."""
    m = len(calib.traj_rows)
    if m != np.asarray(target[0]).shape[0]:
        raise TrajinfError(
            f"harm calibration: {m} target trajectories in the pool-space store, "
            f"{np.asarray(target[0]).shape[0]} target features"
        )
    full, vectors, names = loo_directions(target, config, **target_kw)
    s = len(names)
    mean = None
    if pool is not None:  # centering / a pool-fitted preconditioner (gram) act as in scoring
        stacked = Directions([f"{i}/{n}" for i in range(m) for n in names], vectors, full.lr)
        prep = prepare_directions(pool, stacked, config)
        vectors, mean = prep.vectors, prep.pool_mean
    elif config.remove_mean or config.preconditioner == "gram":
        raise TrajinfError("harm calibration: remove_mean / gram need the pool")
    template = Directions(names, [v[:s] for v in vectors], full.lr, mean)
    values = step_values(calib, template, config, signal, vectors)  # [K, M]
    own = values[np.arange(len(calib.step_owner)), calib.step_owner]
    _, harm, _ = step_drops(own, calib.step_owner, m, statistic)
    if known_good is not None:
        good = np.asarray(known_good, bool)
    elif target_kw.get("success") is not None:  # failures of an outcome target are not good
        good = np.array([v is None or pd.isna(v) or bool(v) for v in target_kw["success"]])
    else:
        good = np.ones(m, bool)
    good &= calib.finite
    return harm[good & np.isfinite(harm)]


def harm_threshold(calibration: np.ndarray, alpha: float) -> tuple[float, str]:
    """(threshold, method): flag harm > threshold. Split conformal when the calibration set
    allows level alpha (n + 1 >= 1 / alpha), else a Gaussian prediction bound."""
    from scipy import stats

    if not 0 < alpha < 1:
        raise TrajinfError(f"harm alpha must be in (0, 1), got {alpha}")
    c = np.sort(np.asarray(calibration, np.float64)[np.isfinite(calibration)])
    n = len(c)
    if n < 2:
        raise TrajinfError(
            f"harm calibration: {n} known-good target trajectories with steps; need >= 2 "
            "(a larger target calibrates the flag)"
        )
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank <= n:
        return float(c[rank - 1]), "conformal"
    sd = float(c.std(ddof=1))
    t = float(stats.t.ppf(1 - alpha, n - 1))
    return float(c.mean() + t * sd * math.sqrt(1 + 1 / n)), "gaussian"


def harm_p_values(harm: np.ndarray, calibration: np.ndarray, method: str) -> np.ndarray:
    """Per-trajectory p-values of harm under the known-good calibration scores: conformal
    ``(1 + #{c >= h}) / (n + 1)``, or the Student-t predictive tail for ``gaussian``."""
    from scipy import stats

    h = np.asarray(harm, np.float64)
    c = np.sort(np.asarray(calibration, np.float64)[np.isfinite(calibration)])
    n = len(c)
    if method == "conformal":
        ge = n - np.searchsorted(c, h, side="left")
        p = (1.0 + ge) / (n + 1.0)
    else:
        z = (h - c.mean()) / (c.std(ddof=1) * math.sqrt(1 + 1 / n))
        p = stats.t.sf(z, n - 1)
    return np.where(np.isfinite(h), p, np.nan)


def harm_flags(
    pool: PoolSource,
    directions: Directions,
    config: ScoreConfig,
    calibration: np.ndarray,
    *,
    alpha: float = 0.05,
    statistic: str = "drop",
    signal: str = "surprise",
) -> HarmResult:
    """Harm score, worst step, p-value and calibrated flag of every pool trajectory, and the
    per-step drops with their bad-step marks (drop > threshold)."""
    values = step_values(pool, directions, config, signal)[:, 0]
    return flags_from_step_values(
        pool.ids, values, pool.step_owner, pool.step_index, pool.finite, calibration,
        alpha=alpha, statistic=statistic, signal=signal,
    )  # fmt: skip


def flags_from_step_values(
    ids: np.ndarray,
    values: np.ndarray,
    owner: np.ndarray,
    step_index: np.ndarray,
    finite: np.ndarray,
    calibration: np.ndarray,
    *,
    alpha: float = 0.05,
    statistic: str = "drop",
    signal: str = "surprise",
    onset: float = ONSET,
) -> HarmResult:
    """:class:`HarmResult` of per-step values (float [K] owned by trajectory ``owner`` [K] of
    ``ids`` [N], at step ``step_index`` [K]; ``finite`` bool [N]: trajectories with usable
    features) against the known-good ``calibration`` harm scores: harm = the largest drop
    (:func:`step_drops`), flagged above the threshold at level ``alpha``; the worst step is the
    first whose drop reaches ``onset`` times that (:func:`onset_steps`)."""
    threshold, method = harm_threshold(calibration, alpha)
    n = len(ids)
    owner = np.asarray(owner, np.int64)
    step_index = np.asarray(step_index, np.int64)
    finite = np.asarray(finite, bool)
    drops, harm, worst = step_drops(values, owner, n, statistic)
    worst = onset_steps(drops, owner, step_index, harm, worst, onset)
    harm[~finite] = np.nan
    p = harm_p_values(harm, calibration, method)
    with np.errstate(invalid="ignore"):
        flagged = harm > threshold
        bad = drops > threshold
    bad &= finite[owner]
    worst_step = np.where(worst >= 0, step_index[np.maximum(worst, 0)], -1)
    traj = pd.DataFrame(
        {
            "id": ids,
            "harm": harm,
            "worst_step": worst_step,
            "harm_p": p,
            "harmful": flagged,
            "n_bad_steps": np.bincount(owner, weights=bad, minlength=n).astype(int),
        }
    )
    steps = pd.DataFrame(
        {"id": np.asarray(ids)[owner], "step": step_index, "value": values, "drop": drops,
         "bad": bad}
    )  # fmt: skip
    c = np.asarray(calibration, float)
    info = {
        "alpha": alpha,
        "statistic": statistic,
        "signal": signal,
        "onset": onset,
        "threshold": threshold,
        "method": method,
        "n_calibration": int(np.isfinite(c).sum()),
        "calibration_mean": float(np.nanmean(c)),
        "calibration_max": float(np.nanmax(c)),
        "n_flagged": int(flagged.sum()),
    }
    return HarmResult(traj, steps, info)


def store_harm(
    pool_store: FeatureStore,
    target_store: FeatureStore,
    calib_store: FeatureStore,
    directions: Directions,
    config: ScoreConfig,
    *,
    alpha: float = 0.05,
    statistic: str = "drop",
    signal: str = "surprise",
    kfac: KfacFactors | Sequence[KfacFactors] | None = None,
) -> HarmResult:
    """:func:`harm_flags` of a scoring job's stores: ``calib_store`` holds the target
    trajectories extracted like the pool (the job's ``store/target_calib``, or the target store
    itself when the extraction has no preconditioner), ``directions`` are the job's."""
    pool = PoolSource.from_store(pool_store)
    calib = PoolSource.from_store(calib_store)
    inputs = target_inputs(target_store, config, None)
    t_ids = target_store.items
    t_ids = t_ids[(t_ids["step"] == -1) & t_ids["finite"]]["id"].astype(str).tolist()
    pos = pd.Index(calib.ids.astype(str)).get_indexer(t_ids)
    if (pos < 0).any():
        raise TrajinfError(
            f"{calib_store.path}: target trajectory {t_ids[int(np.argmax(pos < 0))]!r} missing"
        )
    calib = subset_source(calib, pos)
    calibration = calibration_scores(
        calib,
        inputs["target"],
        config,
        pool=pool,
        statistic=statistic,
        signal=signal,
        subtasks=inputs["subtasks"],
        lr=pool_store.learning_rates,
        kfac=kfac,
        success=inputs["success"],
        reward=inputs["reward"],
        groups=inputs["groups"],
    )
    res = harm_flags(
        pool, directions, config, calibration, alpha=alpha, statistic=statistic, signal=signal
    )
    res.info["calibration"] = calibration.tolist()
    return res


def subset_source(src: PoolSource, pos: np.ndarray) -> PoolSource:
    """A :class:`PoolSource` of the trajectories of ``src`` at positions ``pos`` (int [M], in
    that order) with their steps (e.g. the target in the order its features are read)."""
    new_of_old = np.full(len(src.traj_rows), -1, np.int64)
    new_of_old[pos] = np.arange(len(pos))
    keep = new_of_old[src.step_owner] >= 0
    return PoolSource(
        read=src.read,
        n_ckpt=src.n_ckpt,
        dim=src.dim,
        lr=src.lr,
        ids=src.ids[pos],
        traj_rows=src.traj_rows[pos],
        finite=src.finite[pos],
        step_rows=src.step_rows[keep],
        step_owner=new_of_old[src.step_owner[keep]],
        step_index=src.step_index[keep],
        step_tokens=None if src.step_tokens is None else src.step_tokens[keep],
    )


def flag_rate(flags: np.ndarray, *, confidence: float = 0.95) -> dict:
    """Rate of True in ``flags`` with Clopper-Pearson (exact) and Wilson intervals:
    {k, n, rate, ci_exact: [lo, hi], ci_wilson: [lo, hi]} (n = 0: rate None)."""
    from scipy import stats

    f = np.asarray(flags, bool)
    n, k = len(f), int(f.sum())
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci_exact": None, "ci_wilson": None}
    a = 1 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    z = float(stats.norm.ppf(1 - a / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {
        "k": k,
        "n": n,
        "rate": p,
        "ci_exact": [lo, hi],
        "ci_wilson": [max(0.0, centre - half), min(1.0, centre + half)],
    }


def harm_features(
    pool_traj: np.ndarray,
    pool_steps: np.ndarray,
    pool_owner: np.ndarray,
    target_traj: np.ndarray,
    target_steps: np.ndarray,
    target_owner: np.ndarray,
    config: ScoreConfig,
    *,
    subtasks: Sequence[str] | None = None,
    alpha: float = 0.05,
    statistic: str = "drop",
    signal: str = "surprise",
    ids: Sequence[str] | None = None,
) -> HarmResult:
    """Array-level :func:`store_harm` for one checkpoint without an extraction preconditioner
    (target features are already in the pool's space): pool trajectories [N, D], steps [K, D]
    owned by ``pool_owner`` [K]; target trajectories [M, D] and their steps [K', D] owned by
    ``target_owner`` [K'] (the calibration set, and the directions' source)."""
    pool = PoolSource.from_arrays(pool_traj, steps=pool_steps, step_owner=pool_owner, ids=ids)
    calib = PoolSource.from_arrays(target_traj, steps=target_steps, step_owner=target_owner)
    calibration = calibration_scores(
        calib, [target_traj], config, pool=pool, statistic=statistic, signal=signal,
        subtasks=subtasks,
    )  # fmt: skip
    raw = target_directions([target_traj], config, subtasks=subtasks)
    directions = prepare_directions(pool, raw, config)
    res = harm_flags(
        pool, directions, config, calibration, alpha=alpha, statistic=statistic, signal=signal
    )
    res.info["calibration"] = calibration.tolist()
    return res
