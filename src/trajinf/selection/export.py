"""A scored pool to a selection file: read the score tables, pre-filter, select, write the pool
back in its input format with per-step weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.atomic import atomic_write
from trajinf.data.trajectories import load_pool
from trajinf.data.write import write_pool
from trajinf.errors import TrajinfError
from trajinf.selection.select import Selection, select


def read_scores(scores_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """(trajectory scores, step scores, baseline statistics or None) of a score directory."""
    d = Path(scores_dir)
    if not (d / "scores.parquet").exists():
        raise TrajinfError(f"{d}: no scores.parquet here; run `trajinf score --out {d}` first")
    stats = d / "statistics.parquet"
    return (
        pd.read_parquet(d / "scores.parquet"),
        pd.read_parquet(d / "step_scores.parquet"),
        pd.read_parquet(stats) if stats.exists() else None,
    )


def select_to_file(
    scores_dir: str | Path,
    pool: str | Path,
    out: str | Path,
    *,
    method: str = "influence",
    fraction: float = 0.05,
    drop_harmful: bool | None = None,
    step_weights: bool = False,
    seed: int = 0,
    drop_zero_variance: bool = False,
    dedup: float | None = None,
    prior: str | None = None,
    combine: str | None = None,
    env: str | None = None,
    weight_mode: str = "binary",
    repair: bool = False,
) -> Selection:
    """Select from a scored pool and write the selection (with step weights) as JSONL.

    ``repair`` (influence only): every trajectory is kept, repaired or dropped by the scoring
    job's calibrated harm flag and its bad steps (``harm_steps.parquet``;
    :mod:`trajinf.selection.repair`); repaired trajectories are written with weight 0 on their
    bad steps. The choice of every pool trajectory is written next to ``out`` as
    ``{stem}.repair.jsonl`` (id, choice, n_steps, bad_steps, reason) and counted in
    ``sel.info["harm"]``.

    ``drop_harmful`` None (the default) drops the trajectories the scoring job's calibrated harm
    flag marks when the selection ranks by influence (method "influence", no ``repair``, no
    ``prior``) and the scores carry the flag; every other selection keeps them. True / False
    force it. ``sel.info["drop_harmful"]`` says what was done and whether it was the default.

    ``drop_zero_variance`` first removes rollout groups (same task_id) whose outcomes are all
    equal; ``dedup`` (a cosine threshold) then keeps one trajectory per near-duplicate cluster
    of stored features (the highest-scored). Both filters run before the budget is applied;
    ``sel.info["filters"]`` says how much each removed.
    ``prior`` (a name in ``trajinf.selection.priors.PRIORS``) computes per-step prior values on the pool
    (``env``: an env name, for priors that replay trajectories); ``combine`` ("product" or
    "rank") combines them with the influence step scores of ``scores_dir``. The resulting
    values drive ``step_weights`` (``weight_mode`` binary or soft) and the "prior" method.
    """
    if not 0 < fraction <= 1:
        raise TrajinfError(f"--fraction must be in (0, 1], got {fraction}")
    trajs = load_pool(pool)
    scores, steps, stats = read_scores(scores_dir)
    missing = set(scores["id"]) ^ {t.id for t in trajs}
    if missing:
        raise TrajinfError(
            f"{pool}: pool does not match {scores_dir}/scores.parquet "
            f"({len(missing)} ids differ, e.g. '{sorted(map(str, missing))[0]}')"
        )
    kept, filters = _prefilter(trajs, scores, Path(scores_dir), drop_zero_variance, dedup)
    values = None
    if prior is not None:
        values = prior_step_values(prior, trajs, env=env, combine=combine, step_scores=steps)
    elif combine is not None:
        raise TrajinfError("--combine needs --prior NAME (the prior to combine influence with)")
    elif method == "prior":
        raise TrajinfError("--method prior needs --prior NAME")
    auto = drop_harmful is None
    if auto:
        drop_harmful = default_drop_harmful(scores, method=method, repair=repair, prior=prior)
    if repair:
        return _select_repaired(scores_dir, trajs, kept, scores, steps, out, fraction, filters,
                                method=method, exclusive=(step_weights, prior, drop_harmful))  # fmt: skip
    sel = select(
        method,
        kept,
        fraction=fraction,
        scores=scores,
        step_scores=steps,
        statistics=stats,
        drop_harmful=drop_harmful,
        step_weights=step_weights,
        seed=seed,
        step_values=values,
        weight_mode=weight_mode,
    )
    sel.info["filters"] = filters
    sel.info["drop_harmful"] = {"applied": bool(drop_harmful), "default": auto,
                                "dropped": int(sel.info.get("dropped_harmful", 0))}  # fmt: skip
    if prior is not None:
        sel.info["prior"] = {"name": prior, "combine": combine, "env": env}
    by_id = {t.id: t for t in trajs}
    write_pool([by_id[i] for i in sel.ids], out, step_weights=sel.step_weights)
    return sel


def default_drop_harmful(
    scores: pd.DataFrame, *, method: str, repair: bool = False, prior: str | None = None
) -> bool:
    """Whether a selection drops the harm flag's trajectories by default: when it ranks by
    influence alone (the flag and the ranking come from the same scoring job) and the job ran
    its harm step. Measured in ``trajinf bench --harm`` (5 seeds, docs/benchmarks.md): dropping
    flagged trajectories from the influence pick beat keeping them on TextWorld Express and tied
    on ToolWorld, where repair lost; baselines (random, rds, ...) keep their plain meaning."""
    if method != "influence" or repair or prior is not None or "harmful" not in scores:
        return False
    return bool(scores["harmful"].notna().any())


def _select_repaired(scores_dir, trajs, kept, scores, steps, out, fraction, filters, *, method,
                     exclusive) -> Selection:  # fmt: skip
    """select_to_file(repair=True): the influence top k after keep / repair / drop."""
    from trajinf.selection.repair import repair_plan, select_repaired

    if method != "influence" or any(exclusive):
        raise TrajinfError(
            "--repair ranks by influence and sets its own step weights: it cannot be combined "
            "with --method other than influence, --step-weights, --prior or --drop-harmful"
        )
    path = Path(scores_dir) / "harm_steps.parquet"
    if not path.exists() or "harm" not in scores.columns:
        raise TrajinfError(
            f"{scores_dir}: no harm scores (harm_steps.parquet); rescore with this version of "
            "`trajinf score` (the target must hold >= 2 successful trajectories)"
        )
    plan = repair_plan(scores[["id", "harmful"]], pd.read_parquet(path))
    n_steps = {t.id: len(t.steps()) for t in trajs}
    sel = select_repaired(kept, fraction=min(1.0, fraction * len(trajs) / max(1, len(kept))),
                          scores=scores, step_scores=steps, plan=plan, n_steps=n_steps)  # fmt: skip
    sel.info["filters"] = filters
    out = Path(out)
    by_id = {t.id: t for t in trajs}
    write_pool([by_id[i] for i in sel.ids], out, step_weights=sel.step_weights)
    rows = plan.assign(bad_steps=plan["bad_steps"].map(list))
    lines = "".join(json.dumps(r) + "\n" for r in rows.to_dict("records"))
    atomic_write(out.with_name(f"{out.stem}.repair.jsonl"), lambda f: f.write(lines.encode()))
    return sel


def prior_step_values(
    prior: str,
    trajs: list,
    *,
    env: str | None = None,
    combine: str | None = None,
    step_scores: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per-step values (id, step, value) of ``prior`` on ``trajs``, optionally combined
    ("product" or "rank") with influence ``step_scores`` (id, step, score)."""
    from trajinf.envs import make_env
    from trajinf.selection.priors import combine_steps, step_prior

    if combine is not None and combine not in ("product", "rank"):
        raise TrajinfError(f"--combine must be product or rank, got '{combine}'")
    if combine is not None and step_scores is None:
        raise TrajinfError("--combine needs influence step scores (step_scores.parquet)")
    env_obj = make_env(env) if env else None
    try:
        values = step_prior(prior, trajs, env=env_obj)
    finally:
        close = getattr(env_obj, "close", None)
        if callable(close):
            close()
    return values if combine is None else combine_steps(step_scores, values, how=combine)


def _prefilter(trajs, scores: pd.DataFrame, scores_dir: Path, zero_variance: bool, dedup):
    """Trajectories left after the optional zero-variance and near-duplicate filters."""
    from trajinf.selection.select import near_duplicate_filter, zero_variance_filter
    from trajinf.store.feature_store import FeatureStore

    filters: dict = {}
    keep = {t.id for t in trajs}
    if zero_variance:
        frame, filters["zero_variance"] = zero_variance_filter(trajs)
        keep &= set(frame["id"])
    if dedup is not None:
        store = FeatureStore.open(scores_dir / "store" / "pool")
        rows = store.items[(store.items["step"] == -1) & store.items["id"].isin(keep)]
        rows = rows.sort_values("item")
        feats = store.features(store.n_checkpoints - 1, rows=rows["row"].to_numpy())
        score = scores.set_index("id").loc[rows["id"], "score"].to_numpy(float)
        kept_idx = near_duplicate_filter(feats, dedup, scores=np.nan_to_num(score, nan=-np.inf))
        filters["near_duplicates"] = {"threshold": dedup, "removed": len(rows) - len(kept_idx)}
        keep &= set(rows["id"].to_numpy()[kept_idx])
    return [t for t in trajs if t.id in keep], filters
