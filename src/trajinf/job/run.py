"""The scoring job: pool + target + model (+ warmup checkpoints) -> stores, scores, flags.

One orchestrator over the stage modules; each stage stays usable alone. The job is resumable:
features are written shard by shard into ``OUT/store/{pool,target}`` and a rerun skips finished
shards (checksums verified by the store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from trajinf.atomic import write_json, write_parquet
from trajinf.data.schema import Trajectory
from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.config import ExtractionConfig
from trajinf.job.append import score_appended
from trajinf.job.cache import CACHE_DIR
from trajinf.job.config import ScoreJobConfig, ScoreOutputs
from trajinf.job.distributed import ProgressFactory, extract_store
from trajinf.job.harm import job_harm, merge_harm
from trajinf.job.inputs import (
    checkpoint_list,
    load_inputs,
    load_update_mask,
    subtask_labels,
    with_meta,
)
from trajinf.job.kfac import job_kfac_factors
from trajinf.job.ranks import RankContext
from trajinf.job.shards import pool_digest, resolve_device
from trajinf.job.statistics import job_statistics
from trajinf.scoring.harm import harmful_flags, null_scores
from trajinf.scoring.preconditioners import KfacFactors
from trajinf.scoring.scores import ScoreResult, score_stores, top_k
from trajinf.scoring.source import ScoreConfig, nonfinite_ids
from trajinf.store.feature_store import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class ExtractedJob:
    """What :func:`extract_job` produced: the stores and the inputs they were built from."""

    stores: dict[str, FeatureStore]
    pool: list[Trajectory]
    target: list[Trajectory]
    pool_tokens: list[TokenizedTrajectory]
    target_tokens: list[TokenizedTrajectory]
    checkpoints: list[Path]
    timings: dict[str, float]


def extract_job(
    model_dir: str | Path,
    pool: str | Path | Sequence[Trajectory],
    out: str | Path,
    *,
    target: str | Path | Sequence[Trajectory] | None = None,
    checkpoints: Sequence[str | Path] = (),
    config: ScoreJobConfig | None = None,
    progress: ProgressFactory | None = None,
    rank: RankContext | None = None,
) -> ExtractedJob:
    """Extract the pool (and target) stores of a scoring job into ``out/store/{pool,target}``
    without scoring; ``score_pool`` / ``trajinf score`` with the same options reuse them. Under
    ``torchrun`` pass ``rank=rank_context()``: shards are split over ranks and merged by rank 0.
    """
    config = config or ScoreJobConfig()
    ctx = rank or RankContext()
    out = Path(out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ckpts = checkpoint_list(Path(model_dir), checkpoints)
    targets = target if target is not None else []
    pool_trajs, target_trajs, pool_tok, target_tok = load_inputs(
        Path(model_dir), pool, targets, config, cache=out / CACHE_DIR
    )
    timings["load_tokenize_s"] = time.perf_counter() - t0
    device = ctx.device() if ctx.backend == "nccl" else resolve_device(config.device)
    common = dict(
        update_mask=load_update_mask(config),
        lora=config.lora,
        shard_items=config.shard_items,
        progress=progress,
        rank=ctx,
        device=device,
        trust_remote_code=config.trust_remote_code,
        dtype=config.dtype,
        chat_template=config.chat_template,
    )
    stores = {}
    for name, trajs, toks, src, cfg in (
        ("pool", pool_trajs, pool_tok, pool, config.extraction),
        ("target", target_trajs, target_tok, targets, _target_config(config)),
    ):
        if name == "target" and target is None:
            continue
        t0 = time.perf_counter()
        stores[name] = extract_store(
            out / "store" / name,
            trajs,
            toks,
            subtask_labels(trajs, config.subtask_field),
            ckpts,
            cfg,
            input_digest=pool_digest(src, trajs),
            label=name,
            **common,
        )
        timings[f"extract_{name}_s"] = time.perf_counter() - t0
    return ExtractedJob(stores, pool_trajs, target_trajs, pool_tok, target_tok, ckpts, timings)


def _target_config(config: ScoreJobConfig) -> ExtractionConfig:
    # LESS: target gradients are plain (no optimizer preconditioning).
    return ExtractionConfig(**{**asdict(config.extraction), "preconditioner": "none"})


def score_pool(
    model_dir: str | Path,
    pool: str | Path | Sequence[Trajectory],
    target: str | Path | Sequence[Trajectory],
    out: str | Path,
    *,
    checkpoints: Sequence[str | Path] = (),
    config: ScoreJobConfig | None = None,
    progress: ProgressFactory | None = None,
    append: bool = False,
    top_k: int | None = None,
) -> ScoreOutputs:
    """Score every pool trajectory and step against the target; write stores and parquet tables.

    Writes ``out/store/{pool,target}/``, ``out/scores.parquet`` (id, score, per-subtask scores,
    harmful, ...), ``out/step_scores.parquet`` (id, step, score), ``out/statistics.parquet``
    (baseline statistics: loss, grad_norm, length, rds) and ``out/job.json`` (with
    ``"nonfinite"``: ids whose loss or gradient was not finite; they get NaN scores and are never
    selected). Every output is written atomically, so a killed job leaves old or new files.

    ``append=True`` with an existing ``out``: pool trajectories whose ids are already in the
    pool store are skipped; the others are extracted into new shards and scored against the
    stored target with the stored directions and harmful thresholds, and their rows are added
    to the tables. ``top_k=k``: only a selection is needed, so the k best trajectories are kept
    by a streaming pass (memory: one block plus k) and written to ``out/top.parquet``
    (id, score); no step scores, null or flags.
    """
    config = config or ScoreJobConfig()
    out = Path(out)
    if append and (out / "job.json").exists():
        return score_appended(
            model_dir, pool, target, out, checkpoints=checkpoints, config=config, progress=progress
        )
    out.mkdir(parents=True, exist_ok=True)
    ext = extract_job(
        model_dir,
        pool,
        out,
        target=target,
        checkpoints=checkpoints,
        config=config,
        progress=progress,
    )
    timings = ext.timings
    pool_store, target_store = ext.stores["pool"], ext.stores["target"]
    pool_trajs, pool_tok, ckpts = ext.pool, ext.pool_tokens, ext.checkpoints
    job = {
        "model": str(model_dir),
        "checkpoints": [str(c) for c in ckpts],
        "config": config.to_dict(),
        "n_pool": len(pool_trajs),
        "n_target": len(ext.target),
        "dropped_steps": int(sum(t.dropped_steps for t in pool_tok)),
        # top_k keeps no per-row table of the pool: its non-finite ids come from a row scan
        "nonfinite": nonfinite_ids(pool_store) if top_k is None else nonfinite_ids(pool_store),
        "nonfinite_target": nonfinite_ids(target_store),
    }
    factors = None
    if config.scoring.preconditioner == "kfac":
        t0 = time.perf_counter()
        factors = job_kfac_factors(
            out,
            ckpts,
            pool_tok,
            pool_store,
            config,
            update_mask=lambda: getattr(load_update_mask(config), "masks", None),
            device=resolve_device(config.device),
        )
        timings["kfac_s"] = time.perf_counter() - t0
    if top_k is not None:
        t0 = time.perf_counter()
        top = top_k_scores(pool_store, target_store, config.scoring, top_k, kfac=factors)
        write_parquet(top, out / "top.parquet")
        timings["score_s"] = time.perf_counter() - t0
        write_json({**job, "top_k": top_k, "timings": timings}, out / "job.json")
        return ScoreOutputs(
            out, top, pd.DataFrame({"id": [], "step": [], "score": []}), {}, timings
        )

    t0 = time.perf_counter()
    # one path for every scoring preconditioner; K-FAC's factors also precondition the null
    result: ScoreResult = score_stores(pool_store, target_store, config.scoring, kfac=factors)
    null = null_scores(
        pool_store,
        result.directions,
        config.scoring,
        n_directions=config.null_directions,
        seed=config.seed,
        kfac=factors,
    )
    flags, harmful_info = harmful_flags(result, null, alpha=config.harmful_alpha)
    # the calibrated harm flag (issue 13) becomes `harmful`; the null's is kept as harmful_null
    harm = job_harm(model_dir, ext.target, out, ext.stores, result.directions, ckpts, config,
                    extract=extract_job, kfac=factors, pool_tokens=pool_tok,
                    target_tokens=ext.target_tokens, pool=pool_trajs)  # fmt: skip
    timings["score_s"] = time.perf_counter() - t0

    traj = result.trajectories.merge(flags, on="id", how="left")
    traj = with_meta(merge_harm(traj, harm), pool_trajs)
    write_parquet(traj, out / "scores.parquet")
    write_parquet(result.steps, out / "step_scores.parquet")
    if harm is not None:
        write_parquet(harm.steps, out / "harm_steps.parquet")
    if config.baselines:
        t0 = time.perf_counter()
        job_statistics(
            out,
            model_dir,
            ckpts,
            pool_tok,
            ext.target_tokens,
            pool_trajs,
            pool_store,
            target_store,
            config,
        )
        timings["baselines_s"] = time.perf_counter() - t0
    job = {**job, "harmful": harmful_info, "harm": harm and harm.info, "timings": timings}
    write_json(job, out / "job.json")
    return ScoreOutputs(out, traj, result.steps, harmful_info, timings)


def top_k_scores(
    pool: FeatureStore,
    target: FeatureStore,
    config: ScoreConfig,
    k: int,
    *,
    kfac: KfacFactors | Sequence[KfacFactors] | None = None,
) -> pd.DataFrame:
    """The ``k`` best trajectories (id, score; descending) by one streaming pass over the pool
    (:func:`trajinf.scoring.scores.top_k`); non-finite items are never among them. ``kfac``: factors
    for ``config.preconditioner="kfac"``."""
    if k < 1:
        raise TrajinfError(f"top_k must be >= 1, got {k}")
    return top_k(pool, target, config, k, kfac=kfac)
