"""Benchmark metrics that need no retraining per method: detection, localization, LDS, and the
summaries of retrained cells (mean, std, paired tests)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from trajinf.data.schema import Trajectory
from trajinf.envs.evaluate import auroc


def bad_step_localization(pool: Sequence[Trajectory], steps: pd.DataFrame) -> dict:
    """Do a corrupted step's scores rank lowest within its trajectory?

    Uses trajectories whose meta names their corrupted steps (``bad_step`` of one-bad-step demos,
    ``noisy_steps`` of noisy experts). Reports the pooled AUROC of ``-step score`` for bad vs
    clean steps of those trajectories, the mean within-trajectory AUROC, and for one-bad-step
    demos the rate at which the bad step has the minimum score (chance = mean 1/n_steps).
    """
    by_id = {i: g for i, g in steps.groupby(steps["id"].astype(str))}
    pooled_s, pooled_y, within, top1, chance = [], [], [], [], []
    for t in pool:
        bad = set(t.meta.get("noisy_steps") or [])
        if "bad_step" in t.meta:
            bad = {int(t.meta["bad_step"])}
        g = by_id.get(t.id)
        if not bad or g is None or g.empty:
            continue
        s = g["score"].to_numpy(float)
        y = np.isin(g["step"].to_numpy(int), list(bad))
        ok = np.isfinite(s)
        s, y = s[ok], y[ok]
        if y.sum() == 0 or y.all():
            continue
        pooled_s.append(-s)
        pooled_y.append(y)
        within.append(auroc(-s, y))
        if "bad_step" in t.meta:
            top1.append(bool(y[int(np.argmin(s))]))
            chance.append(1.0 / len(s))
    if not pooled_s:
        return {"n_trajectories": 0}
    return {
        "n_trajectories": len(pooled_s),
        "auroc_pooled": auroc(np.concatenate(pooled_s), np.concatenate(pooled_y)),
        "auroc_within_mean": float(np.nanmean(within)),
        "one_bad_step_top1": float(np.mean(top1)) if top1 else None,
        "one_bad_step_top1_chance": float(np.mean(chance)) if chance else None,
        "n_one_bad_step": len(top1),
    }


def target_losses(model, tokenizer, target: Sequence[Trajectory], field: str = "family") -> dict:
    """Mean action-token loss of ``model`` on the target trajectories of each ``meta[field]``
    (each trajectory's own mean loss, averaged): {subtask: loss}."""
    import torch

    from trajinf.data.tokenize import tokenize_pool
    from trajinf.train.sft import collate, pad_id, sft_loss

    items = tokenize_pool(list(target), tokenizer, max_length=None)
    pad = pad_id(tokenizer)
    per: dict[str, list[float]] = {}
    model.eval()
    with torch.inference_mode():
        for t, it in zip(target, items, strict=True):
            batch = collate([it], pad)
            loss = float(sft_loss(model, batch).sum() / batch.loss_weights.sum().clamp_min(1e-9))
            per.setdefault(str(t.meta.get(field, "all")), []).append(loss)
    return {k: float(np.mean(v)) for k, v in per.items()}


def lds_per_query(subsets: np.ndarray, losses: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Linear datamodeling score of each query.

    subsets: bool [M, N] (model m trained on pool items where True); losses: float [M, Q]
    (model m's target loss on query q); values: float [N, Q] or [N] (a method's per-item
    influence on each query; higher = more helpful, so it should predict LOWER loss). Returns
    float [Q]: Spearman over the M models of (sum of values over the subset) vs (-loss); 0.0
    where the method's predictions are constant (no ranking information), NaN where the
    losses are (the query cannot rank anything).
    """
    from scipy.stats import spearmanr

    values = np.asarray(values, dtype=np.float64)
    v = values if values.ndim == 2 else np.repeat(values[:, None], losses.shape[1], axis=1)
    if v.shape != (subsets.shape[1], losses.shape[1]):
        raise ValueError(
            f"values shape {values.shape} != (n_train, n_query) "
            f"{(subsets.shape[1], losses.shape[1])}"
        )
    pred = subsets.astype(np.float64) @ np.nan_to_num(v, nan=0.0)  # [M, Q]
    out = np.empty(losses.shape[1])
    for q in range(losses.shape[1]):
        if np.ptp(losses[:, q]) == 0:
            out[q] = np.nan
        elif np.ptp(pred[:, q]) == 0:
            out[q] = 0.0
        else:
            out[q] = float(spearmanr(pred[:, q], -losses[:, q]).statistic)
    return out


def lds(
    subsets: np.ndarray, losses: np.ndarray, values: np.ndarray
) -> tuple[float, float, list[float]]:
    """(mean over queries of :func:`lds_per_query`, its standard error over queries, the
    per-query values); queries whose losses are constant are left out of the mean."""
    rs = lds_per_query(subsets, losses, values)
    arr = rs[np.isfinite(rs)]
    if len(arr) == 0:
        return float("nan"), float("nan"), rs.tolist()
    se = float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return float(arr.mean()), se, rs.tolist()


def summarize_cells(cells: Sequence[dict]) -> dict:
    """Per (scenario, method, budget): success and agreement mean/std/per seed, and paired
    t-tests against random (same budget) and full, over matching seeds."""
    from trajinf.loop.steps import paired_tests

    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["scenario"], c["method"], float(c["budget"])), []).append(c)
    out: dict = {}
    for (scn, method, budget), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r["seed"])
        succ = [r["success_rate"] for r in rows]
        agr = [r["step_agreement"] for r in rows]
        entry = {
            "scenario": scn,
            "method": method,
            "budget": budget,
            "n_seeds": len(rows),
            "n_selected": rows[0].get("n_selected"),
            "success_mean": float(np.mean(succ)),
            "success_std": float(np.std(succ, ddof=1)) if len(succ) > 1 else 0.0,
            "success_per_seed": succ,
            "agreement_mean": float(np.mean(agr)),
            "agreement_std": float(np.std(agr, ddof=1)) if len(agr) > 1 else 0.0,
            "seconds_mean": float(np.mean([r.get("seconds", np.nan) for r in rows])),
        }
        tests = {}
        for base_method, base_budget in (("random", budget), ("full", 1.0)):
            base = groups.get((scn, base_method, base_budget))
            if not base or base_method == method:
                continue
            b = {r["seed"]: r for r in base}
            seeds = [r["seed"] for r in rows if r["seed"] in b]
            if len(seeds) < 2:
                continue
            a_s = [next(r for r in rows if r["seed"] == s)["success_rate"] for s in seeds]
            b_s = [b[s]["success_rate"] for s in seeds]
            t = paired_tests({"m": a_s, base_method: b_s}, against=(base_method,))
            tests[base_method] = t.get(f"m vs {base_method}")
        entry["paired"] = tests
        out[f"{scn}|{method}|{budget:g}"] = entry
    return out
