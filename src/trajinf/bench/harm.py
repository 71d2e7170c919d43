"""Benchmark rows for harm that looks like help (issue 13), measured without retraining:
planted-harmful vs helpful AUROC of the harm score, the calibrated flag's false-positive rate on
known-good demos and its recall on planted ones (with exact and Wilson intervals), the
planted share of the 10 % selections kept / dropped / repaired, and one-bad-step localization
by the harm score's worst step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.data.schema import Trajectory
from trajinf.envs.evaluate import auroc
from trajinf.scoring.calibration import flag_rate
from trajinf.selection.repair import repair_plan, select_repaired


def is_planted(t: Trajectory) -> bool:
    return bool(t.meta.get("planted"))


def is_known_good(t: Trajectory) -> bool:
    """An expert demo that is what it says (not planted): the flag should not fire on it."""
    return t.source == "expert" and not is_planted(t)


def reference_dir(data_dir: Path, ref: str) -> Path:
    """A harm bench's reference model under its ``data`` directory: ``base`` (the base agent) or
    ``warm`` (the last warm-up checkpoint by step number, the model the job's harm flag reads)."""
    if ref == "base":
        return Path(data_dir) / "models" / "base"
    if ref == "warm":
        found = sorted((Path(data_dir) / "models" / "warmup").glob("checkpoint-*"),
                       key=lambda p: int(p.name.rsplit("-", 1)[1]))  # fmt: skip
        if found:
            return found[-1]
        raise FileNotFoundError(f"{data_dir}: no warm-up checkpoint under models/warmup")
    raise ValueError(f"reference {ref!r}: choose base or warm")


def read_harm_steps(scores_dir: Path) -> pd.DataFrame | None:
    p = Path(scores_dir) / "harm_steps.parquet"
    return pd.read_parquet(p) if p.exists() else None


def harm_report(
    pool: Sequence[Trajectory],
    scores: pd.DataFrame,
    steps: pd.DataFrame,
    harm_steps: pd.DataFrame | None,
    *,
    budget: float = 0.1,
    families: Sequence[str] = (),
) -> dict:
    """Harm rows of one scored pool (see module docstring). ``scores`` needs the job's harm
    columns (harm, harmful, worst_step); ``harm_steps`` its per-step table (id, step, drop,
    bad); ``families``: the target families (FPR is also reported on their known-good demos)."""
    if "harm" not in scores.columns or harm_steps is None:
        return {"available": False}
    by_id = scores.set_index(scores["id"].astype(str))
    ids = [t.id for t in pool]
    planted = np.array([is_planted(t) for t in pool])
    good = np.array([is_known_good(t) for t in pool])
    on_target = np.array([t.meta.get("family") in set(families) for t in pool])
    harm = by_id.loc[ids, "harm"].to_numpy(float)
    flag = by_id.loc[ids, "harmful"].fillna(False).to_numpy(bool)
    assessed = np.ones(len(ids), bool)
    if "assessed" in by_id:
        assessed = by_id.loc[ids, "assessed"].astype(object).fillna(True).to_numpy(bool)
    both = planted | good
    out: dict = {
        "available": True,
        "n_planted": int(planted.sum()),
        "n_known_good": int(good.sum()),
        "fpr_known_good": flag_rate(flag[good]),
        "fpr_known_good_target_families": flag_rate(flag[good & on_target]),
        "recall_planted": flag_rate(flag[planted]),
        "n_flagged": int(flag.sum()),
        "n_unassessed": int((~assessed).sum()),
    }
    if planted.any() and good.any():
        out["auroc_planted_vs_good"] = auroc(harm[both], planted[both])
        # the same comparison within the families planted demos come from: families differ in
        # length and structure, so a score can separate them by family alone
        fam = np.array([t.meta.get("family") for t in pool], dtype=object)
        same = both & np.isin(fam, list({f for f, p in zip(fam, planted, strict=True) if p}))
        if (good & same).any():
            out["auroc_planted_vs_good_same_family"] = auroc(harm[same], planted[same])
        out["auroc_planted_vs_pool"] = auroc(harm, planted)
        if not assessed.all() and (good & assessed).any() and (planted & assessed).any():
            # among the trajectories the flag assesses (--harm-scope subtask)
            m = both & assessed
            out["auroc_planted_vs_good_assessed"] = auroc(harm[m], planted[m])
        for col, key in (("score", "auroc_low_score_vs_good"),
                         ("min_step_score", "auroc_min_step_vs_good")):  # fmt: skip
            if col in by_id:
                out[key] = auroc(-by_id.loc[ids, col].to_numpy(float)[both], planted[both])
    worst = by_id["worst_step"] if "worst_step" in by_id else None
    out["localization"] = _localization(pool, harm_steps, worst, families)
    plan = repair_plan(by_id.loc[ids, ["harmful"]].reset_index(names="id"), harm_steps)
    out["choices"] = {c: int((plan["choice"] == c).sum()) for c in ("kept", "repaired", "dropped")}
    out["choices_planted"] = {
        c: int(((plan["choice"] == c).to_numpy() & planted).sum())
        for c in ("kept", "repaired", "dropped")
    }
    k = max(1, math.ceil(budget * len(pool)))
    shares = {"base_rate": float(planted.mean()), "budget": k}
    for mode in ("keep", "drop", "repair"):
        sel = select_repaired(pool, fraction=budget, scores=scores, step_scores=steps, plan=plan,
                              mode=mode)  # fmt: skip
        chosen = set(sel.ids)
        shares[mode] = float(np.mean([i in chosen for i, p in zip(ids, planted, strict=True) if p])
                             * planted.sum() / max(1, len(sel.ids)))  # fmt: skip
    out["planted_share_top"] = shares
    return out


# a harm result's columns a report reads (assessed: only with a harm scope)
FLAG_COLUMNS = ("harm", "harmful", "worst_step", "assessed")


def flag_report(
    pool: Sequence[Trajectory],
    scores: pd.DataFrame,
    steps: pd.DataFrame,
    harm,
    *,
    budget: float = 0.1,
    families: Sequence[str] = (),
) -> dict:
    """:func:`harm_report` of a harm result (``HarmResult``: trajectories, steps) recomputed
    outside the job: its flag columns replace the ones ``scores`` carries."""
    cols = [c for c in FLAG_COLUMNS if c in harm.trajectories]
    table = scores.drop(columns=list(FLAG_COLUMNS), errors="ignore")
    table = table.merge(harm.trajectories[["id", *cols]], on="id")
    return harm_report(pool, table, steps, harm.steps, budget=budget, families=families)


def _localization(
    pool: Sequence[Trajectory],
    harm_steps: pd.DataFrame,
    worst: pd.Series | None = None,
    families: Sequence[str] = (),
) -> dict:
    """Top-1 of the harm score's located step at the known bad step: one-bad-step demos
    (``meta["bad_step"]``) and planted ones (``meta["planted_steps"]``), with chance; one-bad-step
    also split by whether the demo's family is one of the target's ``families``
    (``one_bad_step_target`` / ``one_bad_step_other``: a target can only teach against actions
    of its own skills). ``worst``: the job's ``worst_step`` by id (its onset rule); without it,
    the step of the largest drop."""
    by_id = {i: g for i, g in harm_steps.groupby(harm_steps["id"].astype(str))}
    fams = set(families)
    one_bad = lambda t: {int(t.meta["bad_step"])} if "bad_step" in t.meta else None  # noqa: E731
    cases = {
        "one_bad_step": (one_bad, lambda t: True),
        "one_bad_step_target": (one_bad, lambda t: t.meta.get("family") in fams),
        "one_bad_step_other": (one_bad, lambda t: t.meta.get("family") not in fams),
        "planted": (lambda t: set(t.meta.get("planted_steps") or []) or None, lambda t: True),
    }
    res: dict = {}
    for key, (bad_of, keep) in cases.items():
        hits, chance = [], []
        for t in pool:
            bad, g = bad_of(t), by_id.get(t.id)
            if not bad or g is None or not keep(t):
                continue
            d = g["drop"].to_numpy(float)
            if not np.isfinite(d).any():
                continue
            step = worst.get(t.id) if worst is not None else None
            if step is None or not np.isfinite(step) or step < 0:
                step = g["step"].to_numpy()[int(np.nanargmax(d))]
            hits.append(int(step) in bad)
            chance.append(len(bad & set(g["step"].astype(int))) / len(g))
        res[key] = {
            "n": len(hits),
            "top1": float(np.mean(hits)) if hits else None,
            "chance": float(np.mean(chance)) if chance else None,
        }
    return res


def oracle_plan(pool: Sequence[Trajectory], *, max_bad_fraction: float = 0.34) -> pd.DataFrame:
    """A repair plan from the pool's labels instead of the flag (what repair is worth with a
    perfect detector): trajectories with known bad steps (noisy, one-bad-step, planted) are
    repaired when few enough of their steps are bad, else dropped; the rest kept."""
    harm = pd.DataFrame({"id": [t.id for t in pool], "harmful": [bool(_bad(t)) for t in pool]})
    steps = pd.DataFrame(
        [{"id": t.id, "step": k, "bad": k in _bad(t)} for t in pool for k in range(len(t.steps()))]
    )
    return repair_plan(harm, steps, max_bad_fraction=max_bad_fraction)


def _bad(t: Trajectory) -> set[int]:
    bad = {int(s) for s in (t.meta.get("noisy_steps") or []) + (t.meta.get("planted_steps") or [])}
    return bad | ({int(t.meta["bad_step"])} if "bad_step" in t.meta else set())


def harm_selection(pool: Sequence[Trajectory], scored, budget: float, mode: str):
    """The bench's keep / drop / repair selection of a scored variant (``scored``: bench
    ``Scored`` with the job's harm columns and ``harm_steps``), at ``budget`` of the pool.
    ``mode`` "repair-oracle" / "drop-oracle" take the plan from the labels (:func:`oracle_plan`);
    "repair-inplace" repairs without re-ranking (``select_repaired(rerank=False)``)."""
    from trajinf.errors import TrajinfError

    n_steps = {t.id: len(t.steps()) for t in pool}
    rerank = mode != "repair-inplace"
    mode = mode.removesuffix("-inplace")
    if mode.endswith("-oracle"):
        plan, mode = oracle_plan(pool), mode.removesuffix("-oracle")
    else:
        if scored.harm_steps is None or "harm" not in scored.scores.columns:
            raise TrajinfError("bench: harm selection needs the job's harm scores (harm_steps)")
        plan = repair_plan(scored.scores[["id", "harmful"]], scored.harm_steps)
    return select_repaired(pool, fraction=budget, scores=scored.scores,
                           step_scores=scored.steps, plan=plan, mode=mode, n_steps=n_steps,
                           rerank=rerank)  # fmt: skip
