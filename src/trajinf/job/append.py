"""``score_pool(append=True)``: extract and score only pool trajectories not yet scored,
against the stored target with the stored directions and harmful thresholds.

Extraction goes through the job's one loop (:func:`trajinf.job.shards.extract_into`) with the
job's update mask, and the pool store is opened with the full fingerprint (update mask
included), so appended rows are what a full run would have stored for them.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from trajinf.atomic import write_json, write_parquet
from trajinf.data.tokenize import tokenize_pool
from trajinf.errors import StoreCorruptError, TrajinfError
from trajinf.gradients.extract import feature_dim
from trajinf.job.distributed import clean_temp_files
from trajinf.job.harm import append_harm, contrast_reference, recorded_reference
from trajinf.job.inputs import (
    checkpoint_list,
    load_inputs,
    load_tokenizer,
    load_update_mask,
    subtask_labels,
    with_meta,
)
from trajinf.job.kfac import stored_kfac_factors
from trajinf.job.shards import (
    PlannedShard,
    extract_into,
    items_table,
    load_checkpoints,
    plan_shards,
    pool_digest,
    resolve_device,
)
from trajinf.scoring.directions import directions_from_stores
from trajinf.scoring.harm import flags_at_thresholds
from trajinf.scoring.scores import score_tables
from trajinf.scoring.source import PoolSource, nonfinite_ids
from trajinf.selection.baselines import baseline_statistics
from trajinf.store.feature_store import FeatureStore

if TYPE_CHECKING:
    from trajinf.job.config import ScoreJobConfig, ScoreOutputs


def unfinished_shards(store: FeatureStore) -> list[int]:
    """Shards recorded at some checkpoint but not at all of them (an append killed between
    two checkpoints), in order."""
    per = [{e["shard"] for e in store.shards(c)} for c in range(store.n_checkpoints)]
    return sorted(set().union(*per) - set.intersection(*per))


def score_appended(
    model_dir, pool, target, out: Path, *, checkpoints, config: ScoreJobConfig, progress
) -> ScoreOutputs:
    """``score_pool(append=True)`` on an ``out`` that holds a full scoring (job.json with
    harmful thresholds): new ids are extracted into new pool shards and scored; tables grow.
    A store built with another update mask (or none) is refused (StoreMismatchError)."""
    from trajinf.job.config import ScoreOutputs

    job = json.loads((out / "job.json").read_text())
    if "harmful" not in job:
        raise TrajinfError(f"{out / 'job.json'}: no full scoring to append to; run without append")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ckpts = checkpoint_list(Path(model_dir), checkpoints)
    pool_trajs, _target_trajs, _, target_tok = load_inputs(
        Path(model_dir), pool, target, config, tokenize_pool_too=False
    )
    models, ckpt_info, fp = load_checkpoints(
        ckpts,
        config.extraction,
        lora=config.lora,
        device=resolve_device(config.device),
        trust_remote_code=config.trust_remote_code,
        dtype=config.dtype,
        chat_template=config.chat_template,
    )
    mask = load_update_mask(config)
    dim = feature_dim(models[0][0], config.extraction)
    expect = {
        **fp,
        "update_mask": mask.fingerprint() if mask is not None else None,
        "dim": dim,
        "checkpoints": ckpt_info,
    }
    store = FeatureStore.open(out / "store" / "pool", expect=expect)
    if store.verify():
        raise StoreCorruptError(
            f"{store.path}: damaged shards {store.verify()}; rerun without append on the full pool"
        )
    by_id = {t.id: t for t in pool_trajs}
    # finish the shards an interrupted append left at some checkpoints only, then the new ids
    partial = unfinished_shards(store)
    items = store.items
    n_items = int(store.manifest["n_items"])
    redo = items[items["step"] == -1]
    redo = redo[redo["item"].isin(_shard_item_ids(store, partial))].sort_values("item")
    n_base = int(redo["item"].min()) if len(redo) else n_items
    if list(redo["item"]) != list(range(n_base, n_items)):
        raise TrajinfError(
            f"{store.path}: unfinished shards {partial} are not the last ones; rerun without append"
        )
    missing = [i for i in redo["id"] if i not in by_id]
    if missing:
        raise TrajinfError(
            f"{store.path}: ids {missing[:3]} were appended by an interrupted run but are not in "
            "this pool; pass the same pool again"
        )
    known = set(items["id"])
    todo_extract = [by_id[i] for i in redo["id"]] + [t for t in pool_trajs if t.id not in known]
    tokenizer = load_tokenizer(
        Path(model_dir),
        trust_remote_code=config.trust_remote_code,
        chat_template=config.chat_template,
    )
    tokens = tokenize_pool(todo_extract, tokenizer, max_length=config.max_length)
    timings["load_tokenize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if todo_extract:
        _extract_appended(
            store, models, todo_extract, tokens, partial, n_base, config, mask, progress
        )
    timings["extract_pool_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store = FeatureStore.open(store.path)
    old_scores = pd.read_parquet(out / "scores.parquet")
    fresh = ~store.items["id"].isin(set(old_scores["id"].astype(str)))
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
    flags = flags_at_thresholds(result.trajectories, h["score_threshold"], h["step_threshold"])
    todo = [by_id[i] for i in todo_ids]
    traj = with_meta(result.trajectories.merge(flags, on="id", how="left"), todo)

    todo_cache: list = []

    def todo_tokens() -> list:
        """Tokens of the rows scored now (extracted ones reuse theirs), tokenized once."""
        if not todo_cache:
            done = {t.id: tok for t, tok in zip(todo_extract, tokens, strict=True)}
            rest = [t for t in todo if t.id not in done]
            more = tokenize_pool(rest, tokenizer, max_length=config.max_length) if rest else []
            done.update({t.id: tok for t, tok in zip(rest, more, strict=True)})
            todo_cache.extend(done[t.id] for t in todo)
        return todo_cache

    def reference() -> tuple:
        # the model the first rows' harm read (job.json), whatever --harm-reference says now
        ref = recorded_reference(job.get("harm"))
        model, tok = contrast_reference(model_dir, ckpts, replace(config, harm_reference=ref))
        return model, tok, todo_tokens(), target_tok

    labels = dict(zip((t.id for t in todo), subtask_labels(todo, config.subtask_field),
                      strict=True))  # fmt: skip
    traj = append_harm(traj, PoolSource.from_store(new_view), dirs, config, job, out,
                       reference=reference, labels=labels)  # fmt: skip
    traj = pd.concat([old_scores, traj], ignore_index=True)
    steps = pd.concat(
        [pd.read_parquet(out / "step_scores.parquet"), result.steps], ignore_index=True
    )
    timings["score_s"] = time.perf_counter() - t0
    if config.baselines and (out / "statistics.parquet").exists() and todo:
        stats = baseline_statistics(
            model_dir,
            todo_tokens(),
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


def _shard_item_ids(store: FeatureStore, shards: list[int]) -> set[int]:
    return {i for s in shards for i in store.shard_items(s, ["item"]).column("item").to_pylist()}


def _item_range(store: FeatureStore, shard: int) -> tuple[int, int]:
    """``[first, last + 1)`` item ids of a recorded shard."""
    ids = store.shard_items(shard, ["item"]).column("item").to_pylist()
    return min(ids), max(ids) + 1


def _extract_appended(
    store: FeatureStore,
    models: list[tuple],
    trajs: list,
    tokens: list,
    partial: list[int],
    n_base: int,
    config: ScoreJobConfig,
    mask,
    progress,
) -> None:
    """Extract ``trajs`` (items ``n_base``..: those of the unfinished shards ``partial``, then
    new ones in new shards) at every checkpoint, with the job's one extraction loop."""
    n_items = int(store.manifest["n_items"])
    table = items_table(trajs, tokens, subtask_labels(trajs, config.subtask_field))
    table["item"] += n_base
    n_redo = n_items - n_base
    plan = [
        PlannedShard(s, a - n_base, b - n_base, table[table["item"].between(a, b - 1)])
        for s in partial
        for a, b in [_item_range(store, s)]
    ]
    new_rows = table[table["item"] >= n_items]
    plan += [
        replace(p, start=p.start + n_redo, stop=p.stop + n_redo)
        for p in plan_shards(
            new_rows, len(trajs) - n_redo, config.shard_items, first_shard=store.next_shard()
        )
    ]
    clean_temp_files(store.path)
    for c, (model, _tok, state) in enumerate(models):
        tick = (
            progress(f"pool features (appended), checkpoint {c + 1}", len(tokens))
            if progress
            else None
        )
        extract_into(
            store, c, model, tokens, plan, config.extraction, state, tick, update_mask=mask
        )
