"""Step values -> trajectory values, combinations with per-step influence, per-step loss weights.

Every step frame has columns id, step, value (a ``score`` column, as in ``step_scores.parquet``,
is read as the value). NaN means undefined and is skipped by every aggregate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from trajinf.errors import TrajinfError

AGGREGATES = ("mean", "sum", "min", "max")
COMBINES = ("product", "rank")
WEIGHT_MODES = ("binary", "soft")  # step weights from values: 0/1, or rescaled to [0, 1]


def as_steps(frame: pd.DataFrame, what: str = "steps") -> pd.DataFrame:
    """A copy with columns id (str), step (int), value (float); ``score`` is read as value."""
    col = "value" if "value" in frame.columns else "score"
    missing = {"id", "step", col} - set(frame.columns)
    if missing:
        raise TrajinfError(f"{what}: missing columns {sorted(missing)} (need id, step, value)")
    return pd.DataFrame(
        {
            "id": frame["id"].astype(str).to_numpy(),
            "step": frame["step"].astype("int64").to_numpy(),
            "value": pd.to_numeric(frame[col], errors="coerce").astype(float).to_numpy(),
        }
    )


def trajectory_prior(steps: pd.DataFrame, how: str = "mean") -> pd.DataFrame:
    """Per-trajectory value (id, value): mean / sum / min / max of its finite step values
    (NaN when it has none)."""
    if how not in AGGREGATES:
        raise TrajinfError(f"trajectory_prior: how must be one of {AGGREGATES}, got {how!r}")
    s = as_steps(steps)
    agg = s.groupby("id", sort=False)["value"].agg(how)
    if how == "sum":  # pandas sums an all-NaN group to 0; undefined is NaN here
        agg = agg.where(s.groupby("id", sort=False)["value"].count() > 0)
    return agg.rename("value").reset_index()


def _z(x: np.ndarray) -> np.ndarray:
    fin = np.isfinite(x)
    if not fin.any():
        return x
    sd = x[fin].std()
    return (x - x[fin].mean()) / (sd if sd > 0 else 1.0)


def _pct_rank(x: np.ndarray) -> np.ndarray:
    """Average-tie percentile rank in (0, 1] among the finite values (NaN stays NaN)."""
    return pd.Series(x).rank(method="average", pct=True).to_numpy(float)


def combine_steps(a: pd.DataFrame, b: pd.DataFrame, how: str = "rank") -> pd.DataFrame:
    """Combine two per-step frames (e.g. influence step scores and a prior) on (id, step).

    rank: ``value = mean(pct_rank_a, pct_rank_b) - 0.5``, percentile ranks in (0, 1] within the
    pool (ties averaged), centred so that below-median steps are negative; a step undefined in
    one frame uses the other's rank alone.
    product: each frame is z-scored over the pool, ``z``, and shifted to ``u = z - min z``
    (>= 0, so signs cannot flip the product); ``value = u_a * u_b - mean(u_a) * mean(u_b)``,
    i.e. the product centred at the product of two average steps, so a step low on either
    factor is pulled below zero. A step undefined in one frame takes that frame's mean (z = 0).
    Both NaN -> NaN. Returns id, step, value over the union of the two frames' steps.
    """
    if how not in COMBINES:
        raise TrajinfError(f"combine_steps: how must be one of {COMBINES}, got {how!r}")
    m = as_steps(a, "combine a").merge(
        as_steps(b, "combine b"), on=["id", "step"], how="outer", suffixes=("_a", "_b")
    )
    va, vb = m["value_a"].to_numpy(float), m["value_b"].to_numpy(float)
    if how == "rank":
        value = np.nanmean(np.stack([_pct_rank(va), _pct_rank(vb)]), axis=0) - 0.5
    else:
        za, zb = _z(va), _z(vb)
        ma = -np.nanmin(za) if np.isfinite(za).any() else 0.0  # mean of u = z - min z
        mb = -np.nanmin(zb) if np.isfinite(zb).any() else 0.0
        ua = np.where(np.isfinite(za), za + ma, ma)
        ub = np.where(np.isfinite(zb), zb + mb, mb)
        value = ua * ub - ma * mb
        value[~np.isfinite(va) & ~np.isfinite(vb)] = np.nan
    return pd.DataFrame({"id": m["id"], "step": m["step"], "value": value})


def weights_from_steps(
    steps: pd.DataFrame,
    ids: Iterable[str],
    *,
    mode: str = "binary",
    threshold: float | None = None,
    n_steps: Mapping[str, int] | None = None,
) -> dict[str, list[float]]:
    """Per-step loss weights {id: [weight of step 0, 1, ...]} for ``ids``.

    binary: weight 0 below ``threshold``, 1 elsewhere. Without a threshold: 0 on negative
    values when any value of the frame is negative (signed scores: negative = harmful), else 0
    on the frame's lowest value (e.g. an invalid tool call, a step off the expert's action),
    unless all values are equal. soft: values min-max rescaled to [0, 1] over the frame.
    NaN (undefined) and missing steps keep weight 1. Lists have ``n_steps[id]`` entries when
    given (what ``write_pool`` needs), else max step + 1; ids without any step are left out.
    """
    if mode not in WEIGHT_MODES:
        raise TrajinfError(f"weights_from_steps: mode must be binary or soft, got {mode!r}")
    s = as_steps(steps)
    v = s["value"].to_numpy(float)
    fin = v[np.isfinite(v)]
    lo, hi = (float(fin.min()), float(fin.max())) if len(fin) else (0.0, 0.0)
    with np.errstate(invalid="ignore"):
        if mode == "soft":
            w = (v - lo) / (hi - lo) if hi > lo else np.ones_like(v)
        elif threshold is not None:
            w = np.where(v < threshold, 0.0, 1.0)
        elif lo < 0:
            w = np.where(v < 0, 0.0, 1.0)
        else:
            w = np.where((v <= lo) & (hi > lo), 0.0, 1.0)
    w = np.where(np.isfinite(v), w, 1.0)
    s = s.assign(w=w)
    groups = {i: g for i, g in s.groupby("id", sort=False)}
    out: dict[str, list[float]] = {}
    for i in map(str, ids):
        g = groups.get(i)
        n = (n_steps or {}).get(i)
        if g is None and n is None:
            continue
        size = n if n is not None else int(g["step"].max()) + 1
        ws = [1.0] * size
        if g is not None:
            for st, x in zip(g["step"].to_numpy(int), g["w"].to_numpy(float), strict=True):
                if 0 <= st < size:
                    ws[st] = float(x)
        out[i] = ws
    return out
