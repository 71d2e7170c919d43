"""The scoring job: pool + target + model (+ warmup checkpoints) -> stores, scores, flags.

One orchestrator over the stage modules; each stage stays usable alone. The job is resumable:
features are written shard by shard into ``OUT/store/{pool,target}`` and a rerun skips finished
shards (checksums verified by the store).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.checkpoints import load_model
from trajinf.distributed import (  # noqa: F401  (items_table, extract_store: public here too)
    ProgressFactory,
    RankContext,
    _load_checkpoints,
    _pool_digest,
    extract_store,
    items_table,
    resolve_device,
    shard_bounds,
)
from trajinf.errors import StoreCorruptError, TrajinfError
from trajinf.gradients import ExtractionConfig, extract_features, feature_dim
from trajinf.scoring import (
    PoolSource,
    ScoreConfig,
    ScoreResult,
    directions_from_stores,
    score_stores,
    top_k,
)
from trajinf.scoring import score_pool as score_directions_pool
from trajinf.selection import harmful_flags, null_scores
from trajinf.store import FeatureStore, _atomic_write
from trajinf.tokenize import TokenizedTrajectory, tokenize_pool
from trajinf.trajectories import Trajectory, field_value, load_pool

log = logging.getLogger(__name__)


@dataclass
class ScoreJobConfig:
    """Everything the scoring job needs besides its inputs; saved into ``OUT/job.json``."""

    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    scoring: ScoreConfig = field(default_factory=ScoreConfig)
    max_length: int | None = 2048
    subtask_field: str = "task_id"
    lora: bool = False
    harmful_alpha: float = 0.05
    null_directions: int = 32
    shard_items: int = 256
    baselines: bool = True
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if visible, else cpu) | "cpu" | "cuda" | "cuda:1" ...
    trust_remote_code: bool = False  # only with an explicit --trust-remote-code
    # Track only parameters that moved by more than extraction.update_mask_threshold between
    # these two checkpoints (where RL / fine-tuning updates land); None tracks everything.
    update_mask_from: tuple[str, str] | None = None

    def to_dict(self) -> dict:
        """A JSON-able dict of the whole config."""
        return asdict(self)


@dataclass
class ScoreOutputs:
    """Paths and tables the job produced."""

    out: Path
    trajectories: pd.DataFrame
    steps: pd.DataFrame
    harmful_info: dict
    timings: dict


def _subtask_of(trajs: Sequence[Trajectory], name: str) -> list[str]:
    out = []
    for t in trajs:
        v = field_value(t, name)
        out.append("all" if v is None else str(v))
    return out


def _checkpoint_list(model_dir: Path, checkpoints: Sequence[str | Path]) -> list[Path]:
    return [Path(c) for c in checkpoints] if checkpoints else [Path(model_dir)]


def _load_inputs(
    model_dir: Path, pool, target, config: ScoreJobConfig, *, tokenize_pool_too: bool = True
):
    """(pool trajectories, target trajectories, pool tokens or None, target tokens)."""
    pool_trajs = list(pool) if not isinstance(pool, (str, Path)) else load_pool(pool)
    target_trajs = list(target) if not isinstance(target, (str, Path)) else load_pool(target)
    tokenizer = _load_tokenizer(model_dir, trust_remote_code=config.trust_remote_code)
    pool_tok = (
        tokenize_pool(pool_trajs, tokenizer, max_length=config.max_length)
        if tokenize_pool_too
        else None
    )
    target_tok = tokenize_pool(target_trajs, tokenizer, max_length=config.max_length)
    return pool_trajs, target_trajs, pool_tok, target_tok


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
    ckpts = _checkpoint_list(Path(model_dir), checkpoints)
    targets = target if target is not None else []
    pool_trajs, target_trajs, pool_tok, target_tok = _load_inputs(
        Path(model_dir), pool, targets, config
    )
    timings["load_tokenize_s"] = time.perf_counter() - t0
    device = ctx.device() if ctx.backend == "nccl" else resolve_device(config.device)
    common = dict(
        update_mask=_update_mask(config),
        lora=config.lora,
        shard_items=config.shard_items,
        progress=progress,
        rank=ctx,
        device=device,
        trust_remote_code=config.trust_remote_code,
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
            _subtask_of(trajs, config.subtask_field),
            ckpts,
            cfg,
            input_digest=_pool_digest(src, trajs),
            label=name,
            **common,
        )
        timings[f"extract_{name}_s"] = time.perf_counter() - t0
    return ExtractedJob(stores, pool_trajs, target_trajs, pool_tok, target_tok, ckpts, timings)


def _update_mask(config: ScoreJobConfig) -> dict | None:
    """The sparse update mask of ``config.update_mask_from`` (None when not asked for)."""
    if config.update_mask_from is None:
        return None
    from trajinf.checkpoints import load_model
    from trajinf.gradients import mask_density, sparse_update_mask

    a, b = config.update_mask_from
    threshold = config.extraction.update_mask_threshold
    if threshold is None:
        threshold = config.extraction.update_mask_threshold = 1e-5
    mask = sparse_update_mask(load_model(a)[0], load_model(b)[0], threshold=threshold)
    log.info("update mask from %s -> %s: density %.4f", a, b, mask_density(mask))
    return mask


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
        return _score_appended(
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
        "nonfinite": nonfinite_ids(pool_store),
        "nonfinite_target": nonfinite_ids(target_store),
    }
    if top_k is not None:
        t0 = time.perf_counter()
        top = top_k_scores(pool_store, target_store, config.scoring, top_k)
        write_parquet(top, out / "top.parquet")
        timings["score_s"] = time.perf_counter() - t0
        write_json({**job, "top_k": top_k, "timings": timings}, out / "job.json")
        return ScoreOutputs(
            out, top, pd.DataFrame({"id": [], "step": [], "score": []}), {}, timings
        )

    t0 = time.perf_counter()
    result: ScoreResult = score_stores(pool_store, target_store, config.scoring)
    null = null_scores(
        pool_store,
        target_store,
        config.scoring,
        n_directions=config.null_directions,
        seed=config.seed,
    )
    flags, harmful_info = harmful_flags(result, null, alpha=config.harmful_alpha)
    timings["score_s"] = time.perf_counter() - t0

    traj = _with_meta(result.trajectories.merge(flags, on="id", how="left"), pool_trajs)
    write_parquet(traj, out / "scores.parquet")
    write_parquet(result.steps, out / "step_scores.parquet")
    if config.baselines:
        t0 = time.perf_counter()
        stats = baseline_statistics(
            model_dir,
            pool_tok,
            ext.target_tokens,
            pool_store,
            target_store,
            pool_trajs,
            trust_remote_code=config.trust_remote_code,
        )
        write_parquet(stats, out / "statistics.parquet")
        timings["baselines_s"] = time.perf_counter() - t0
    job = {**job, "harmful": harmful_info, "timings": timings}
    write_json(job, out / "job.json")
    return ScoreOutputs(out, traj, result.steps, harmful_info, timings)


def _with_meta(traj: pd.DataFrame, pool_trajs: Sequence[Trajectory]) -> pd.DataFrame:
    meta = pd.DataFrame(
        {
            "id": [t.id for t in pool_trajs],
            "task_id": [t.task_id for t in pool_trajs],
            "source": [t.source for t in pool_trajs],
            "success": [t.success for t in pool_trajs],
        }
    )
    return meta.merge(traj, on="id", how="left")


def nonfinite_ids(store: FeatureStore) -> list[str]:
    """Ids of the store's trajectories whose loss or gradient was not finite (zero features)."""
    it = store.items
    bad = it[(it["step"] == -1) & ~it["finite"].astype(bool)]
    return [str(i) for i in bad.sort_values("row")["id"]]


def top_k_scores(
    pool: FeatureStore, target: FeatureStore, config: ScoreConfig, k: int
) -> pd.DataFrame:
    """The ``k`` best trajectories (id, score; descending) by one streaming pass over the pool
    (:func:`trajinf.scoring.top_k`); non-finite items are never among them."""
    if k < 1:
        raise TrajinfError(f"top_k must be >= 1, got {k}")
    return top_k(pool, target, config, k)


def _load_tokenizer(model_dir: Path, *, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if (
        not (Path(model_dir) / "config.json").is_file()
        and not (Path(model_dir) / "adapter_config.json").is_file()
    ):
        raise TrajinfError(f"{model_dir}: not a model directory (no config.json)")
    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)


def _view(store: FeatureStore, keep: np.ndarray) -> FeatureStore:
    """The same store with only the items rows where ``keep`` (a read-only view)."""
    v = copy.copy(store)
    v.items = store.items[keep].reset_index(drop=True)
    return v


def _score_appended(
    model_dir, pool, target, out: Path, *, checkpoints, config: ScoreJobConfig, progress
) -> ScoreOutputs:
    """``score_pool(append=True)``: extract and score only trajectories not yet scored."""
    job = json.loads((out / "job.json").read_text())
    if "harmful" not in job:
        raise TrajinfError(f"{out / 'job.json'}: no full scoring to append to; run without append")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ckpts = _checkpoint_list(Path(model_dir), checkpoints)
    pool_trajs, target_trajs, _, target_tok = _load_inputs(
        Path(model_dir), pool, target, config, tokenize_pool_too=False
    )
    models, ckpt_info, fp = _load_checkpoints(
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
    tokenizer = _load_tokenizer(Path(model_dir), trust_remote_code=config.trust_remote_code)
    new_tok = tokenize_pool(new, tokenizer, max_length=config.max_length)
    timings["load_tokenize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_old = int(store.manifest["n_items"])
    items = items_table(new, new_tok, _subtask_of(new, config.subtask_field))
    if new:
        items["item"] += n_old
    tick = progress("pool features (appended)", len(new)) if progress and new else None
    for a, b in shard_bounds(len(new), config.shard_items):
        blocks, loss, finite = [], {}, {}
        for c, (model, _tok, state) in enumerate(models):
            fs = list(
                extract_features(model, new_tok[a:b], config.extraction, checkpoint_state=state)
            )
            blocks.append(np.concatenate([r for f in fs for r in (f.trajectory[None], f.steps)]))
            if c == 0:  # as in extract_store: the items table keeps the first checkpoint's loss
                loss = {n_old + a + f.index: f.loss for f in fs}
                finite = {n_old + a + f.index: f.finite for f in fs}
        rows = items[(items["item"] >= n_old + a) & (items["item"] < n_old + b)].copy()
        rows["loss"] = rows["item"].map(loss).astype(float)
        rows["finite"] = rows["item"].map(finite).astype(bool)
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
    dirs = directions_from_stores(_view(store, ~fresh.to_numpy()), target_store, config.scoring)
    new_view = _view(store, fresh.to_numpy())
    result = score_directions_pool(PoolSource.from_store(new_view), dirs, config.scoring)
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
    traj = _with_meta(result.trajectories.merge(flags, on="id", how="left"), todo)
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
    added = {"n": len(todo), "input_sha256": _pool_digest(pool, pool_trajs)}
    job["appended"] = [*job.get("appended", []), added]
    job.update(n_pool=len(traj), nonfinite=nonfinite_ids(store), timings_append=timings)
    write_json(job, out / "job.json")
    return ScoreOutputs(out, traj, steps, h, timings)


def baseline_statistics(
    model_dir,
    pool_tok,
    target_tok,
    pool_store,
    target_store,
    pool_trajs,
    *,
    trust_remote_code: bool = False,
) -> pd.DataFrame:
    """Per-item statistics the baseline selectors need: loss, grad_norm, length, rds."""
    from trajinf.baselines import hidden_state_embeddings, rds_scores

    model, _ = load_model(Path(model_dir), trust_remote_code=trust_remote_code)
    pool_emb = hidden_state_embeddings(model, pool_tok)
    target_emb = hidden_state_embeddings(model, target_tok)
    t_items = target_store.items
    t_sub = t_items[t_items["step"] == -1].sort_values("item")["subtask"].tolist()
    rds = rds_scores(pool_emb, target_emb, t_sub)
    p_items = pool_store.items
    traj_rows = p_items[p_items["step"] == -1].sort_values("item")
    last = len(pool_store.manifest["checkpoints"]) - 1
    feats = pool_store.features(last, rows=traj_rows["row"].to_numpy())
    return pd.DataFrame(
        {
            "id": [t.id for t in pool_trajs],
            "loss": traj_rows["loss"].to_numpy(),
            "grad_norm": np.linalg.norm(feats, axis=1),
            "length": traj_rows["n_action_tokens"].to_numpy(),
            "rds": rds,
        }
    )


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a table atomically (temp file, fsync, rename): readers see old or new, never half."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    _atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def write_json(obj: dict, path: Path) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    text = json.dumps(obj, indent=2, default=str).encode()
    _atomic_write(Path(path), lambda f: f.write(text))
