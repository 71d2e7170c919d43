"""``score_pool(append=True)``: extract and score only pool trajectories not yet scored,
against the stored target with the stored directions and harmful thresholds."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from trajinf.data.tokenize import tokenize_pool
from trajinf.errors import StoreCorruptError, TrajinfError
from trajinf.gradients import extract_features, feature_dim
from trajinf.job.inputs import (
    checkpoint_list,
    load_inputs,
    load_tokenizer,
    subtask_labels,
    with_meta,
)
from trajinf.job.kfac import stored_kfac_factors
from trajinf.job.shards import (
    items_table,
    load_checkpoints,
    pool_digest,
    resolve_device,
    shard_bounds,
    storable,
)
from trajinf.scoring.directions import directions_from_stores
from trajinf.scoring.scores import score_tables
from trajinf.scoring.source import PoolSource, nonfinite_ids
from trajinf.selection.baselines import baseline_statistics
from trajinf.store.atomic import write_json, write_parquet
from trajinf.store.feature_store import FeatureStore

if TYPE_CHECKING:
    from trajinf.job.config import ScoreJobConfig, ScoreOutputs


def score_appended(
    model_dir, pool, target, out: Path, *, checkpoints, config: ScoreJobConfig, progress
) -> ScoreOutputs:
    """``score_pool(append=True)`` on an ``out`` that holds a full scoring (job.json with
    harmful thresholds): new ids are extracted into new pool shards and scored; tables grow."""
    from trajinf.job.config import ScoreOutputs

    job = json.loads((out / "job.json").read_text())
    if "harmful" not in job:
        raise TrajinfError(f"{out / 'job.json'}: no full scoring to append to; run without append")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ckpts = checkpoint_list(Path(model_dir), checkpoints)
    pool_trajs, target_trajs, _, target_tok = load_inputs(
        Path(model_dir), pool, target, config, tokenize_pool_too=False
    )
    models, ckpt_info, fp = load_checkpoints(
        ckpts,
        config.extraction,
        lora=config.lora,
        device=resolve_device(config.device),
        trust_remote_code=config.trust_remote_code,
    )
    dim = feature_dim(models[0][0], config.extraction)
    store = FeatureStore.open(
        out / "store" / "pool", expect={**fp, "dim": dim, "checkpoints": ckpt_info}
    )
    if store.verify():
        raise StoreCorruptError(
            f"{store.path}: damaged shards {store.verify()}; rerun without append on the full pool"
        )
    known = set(store.items["id"])
    new = [t for t in pool_trajs if t.id not in known]
    tokenizer = load_tokenizer(Path(model_dir), trust_remote_code=config.trust_remote_code)
    new_tok = tokenize_pool(new, tokenizer, max_length=config.max_length)
    timings["load_tokenize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_old = int(store.manifest["n_items"])
    items = items_table(new, new_tok, subtask_labels(new, config.subtask_field))
    if new:
        items["item"] += n_old
    tick = progress("pool features (appended)", len(new)) if progress and new else None
    for a, b in shard_bounds(len(new), config.shard_items):
        blocks = []
        rows = items[(items["item"] >= n_old + a) & (items["item"] < n_old + b)].copy()
        for c, (model, _tok, state) in enumerate(models):
            fs = [
                storable(f)
                for f in extract_features(
                    model, new_tok[a:b], config.extraction, checkpoint_state=state
                )
            ]
            blocks.append(np.concatenate([r for f in fs for r in (f.trajectory[None], f.steps)]))
            # per checkpoint, as in extract_store: an item non-finite at any one is skipped
            loss = {n_old + a + f.index: f.loss for f in fs}
            finite = {n_old + a + f.index: f.finite for f in fs}
            rows[f"loss_{c}"] = rows["item"].map(loss).astype(float)
            rows[f"finite_{c}"] = rows["item"].map(finite).astype(bool)
        store.append(rows, blocks)
        if tick:
            tick(b - a)
    timings["extract_pool_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    old_scores = pd.read_parquet(out / "scores.parquet")
    fresh = ~store.items["id"].isin(set(old_scores["id"].astype(str)))
    by_id = {t.id: t for t in pool_trajs}
    todo_ids = store.items.loc[fresh & (store.items["step"] == -1), "id"].tolist()
    missing = [i for i in todo_ids if i not in by_id]
    if missing:
        raise TrajinfError(
            f"{store.path}: ids {missing[:3]} were appended by an interrupted run but are not in "
            "this pool; pass the same pool again"
        )
    if not todo_ids:  # nothing new: the tables stay as they are
        steps = pd.read_parquet(out / "step_scores.parquet")
        return ScoreOutputs(out, old_scores, steps, job["harmful"], timings)
    target_store = FeatureStore.open(out / "store" / "target")
    # K-FAC: the stored factors of the full run (fingerprinted on the store, which append
    # leaves unchanged), so the appended rows see the same directions as the old ones
    kfac = (
        stored_kfac_factors(out, store, config) if config.scoring.preconditioner == "kfac" else None
    )
    dirs = directions_from_stores(
        store.view(~fresh.to_numpy()), target_store, config.scoring, kfac=kfac
    )
    new_view = store.view(fresh.to_numpy())
    result = score_tables(PoolSource.from_store(new_view), dirs, config.scoring)
    h = job["harmful"]
    s = result.trajectories["score"].to_numpy(float)
    m = result.trajectories["min_step_score"].to_numpy(float)
    with np.errstate(invalid="ignore"):
        by_score, by_step = s < h["score_threshold"], m < h["step_threshold"]
    reason = np.where(
        by_score & by_step,
        "score+step",
        np.where(by_score, "score", np.where(by_step, "step", "")),
    )
    ids = result.trajectories["id"]
    flags = pd.DataFrame({"id": ids, "harmful": by_score | by_step, "reason": reason})
    todo = [by_id[i] for i in todo_ids]
    traj = with_meta(result.trajectories.merge(flags, on="id", how="left"), todo)
    traj = pd.concat([old_scores, traj], ignore_index=True)
    steps = pd.concat(
        [pd.read_parquet(out / "step_scores.parquet"), result.steps], ignore_index=True
    )
    timings["score_s"] = time.perf_counter() - t0
    if config.baselines and (out / "statistics.parquet").exists() and todo:
        todo_tok = tokenize_pool(todo, tokenizer, max_length=config.max_length)
        stats = baseline_statistics(
            model_dir,
            todo_tok,
            target_tok,
            new_view,
            target_store,
            todo,
            trust_remote_code=config.trust_remote_code,
        )
        stats = pd.concat([pd.read_parquet(out / "statistics.parquet"), stats], ignore_index=True)
        write_parquet(stats.drop_duplicates("id", keep="last"), out / "statistics.parquet")
    # step scores first: a kill between the two writes leaves these ids unscored, so a rerun
    # scores them again (scores.parquet decides what is done)
    write_parquet(steps.drop_duplicates(["id", "step"], keep="last"), out / "step_scores.parquet")
    write_parquet(traj, out / "scores.parquet")
    added = {"n": len(todo), "input_sha256": pool_digest(pool, pool_trajs)}
    job["appended"] = [*job.get("appended", []), added]
    job.update(n_pool=len(traj), nonfinite=nonfinite_ids(store), timings_append=timings)
    write_json(job, out / "job.json")
    return ScoreOutputs(out, traj, steps, h, timings)
