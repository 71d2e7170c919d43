"""The scoring job: pool + target + model (+ warmup checkpoints) -> stores, scores, flags.

One orchestrator over the stage modules; each stage stays usable alone. The job is resumable:
features are written shard by shard into ``OUT/store/{pool,target}`` and a rerun skips finished
shards (checksums verified by the store).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.checkpoints import (
    load_checkpoint_state,
    load_model,
    model_fingerprint,
    tokenizer_fingerprint,
)
from trajinf.errors import TrajinfError
from trajinf.gradients import ExtractionConfig, extract_features, feature_dim
from trajinf.scoring import ScoreConfig, ScoreResult, score_stores
from trajinf.selection import harmful_flags, null_scores
from trajinf.store import FeatureStore
from trajinf.tokenize import TokenizedTrajectory, tokenize_pool
from trajinf.trajectories import Trajectory, field_value, load_pool

ProgressFactory = Callable[[str, int], Callable[[int], None]]


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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _subtask_of(trajs: Sequence[Trajectory], name: str) -> list[str]:
    out = []
    for t in trajs:
        v = field_value(t, name)
        out.append("all" if v is None else str(v))
    return out


def items_table(
    trajs: Sequence[Trajectory], tokens: Sequence[TokenizedTrajectory], subtasks: Sequence[str]
) -> pd.DataFrame:
    """One row per trajectory (step -1) followed by one row per kept step, in input order."""
    rows = []
    for i, (t, tok) in enumerate(zip(trajs, tokens, strict=True)):
        act = tok.action_mask.astype(bool)
        steps = np.unique(tok.step_ids[tok.step_ids >= 0])
        base = {
            "id": t.id,
            "task_id": t.task_id,
            "subtask": subtasks[i],
            "source": t.source,
            "success": t.success,
            "reward": t.reward,
            "item": i,
        }
        rows.append({**base, "step": -1, "n_action_tokens": int(act.sum())})
        for s in steps:
            n = int((act & (tok.step_ids == s)).sum())
            rows.append({**base, "step": int(s), "n_action_tokens": n})
    return pd.DataFrame(rows)


def _extract_into(
    store: FeatureStore,
    ckpt: int,
    model,
    tokens: Sequence[TokenizedTrajectory],
    items: pd.DataFrame,
    config: ExtractionConfig,
    state,
    shard_items: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Extract features for every shard not yet in ``store``; returns the number of items done."""
    done = 0
    for shard, start in enumerate(range(0, len(tokens), shard_items)):
        stop = min(start + shard_items, len(tokens))
        if store.has_shard(ckpt, shard):
            if progress:
                progress(stop - start)
            continue
        by_item = {}
        for f in extract_features(model, tokens[start:stop], config, checkpoint_state=state):
            by_item[start + f.index] = f
            done += 1
            if progress:
                progress(1)
        order = [by_item[i] for i in range(start, stop)]
        feats = [r for f in order for r in (f.trajectory[None, :], f.steps)]
        meta = [{"item": start + f.index, "loss": f.loss, "finite": f.finite} for f in order]
        shard_rows = items[(items["item"] >= start) & (items["item"] < stop)].copy()
        block = np.concatenate(feats, axis=0) if feats else np.zeros((0, store.dim), np.float32)
        if len(block) != len(shard_rows):
            raise TrajinfError(
                f"internal: shard {shard} has {len(block)} feature rows for {len(shard_rows)} items"
            )
        info = pd.DataFrame(meta).set_index("item")
        shard_rows["loss"] = shard_rows["item"].map(info["loss"]).astype(float)
        shard_rows["finite"] = shard_rows["item"].map(info["finite"]).astype(bool)
        store.write_shard(ckpt, shard, shard_rows, block)
    return done


def _checkpoint_list(model_dir: Path, checkpoints: Sequence[str | Path]) -> list[Path]:
    return [Path(c) for c in checkpoints] if checkpoints else [Path(model_dir)]


def _pool_digest(source, trajs: Sequence[Trajectory]) -> str:
    if isinstance(source, (str, Path)) and Path(source).is_file():
        return _file_sha256(Path(source))
    h = hashlib.sha256()
    for t in trajs:
        h.update(json.dumps([t.id, t.messages], sort_keys=True, default=str).encode())
    return h.hexdigest()


def extract_store(
    path: Path,
    trajs: Sequence[Trajectory],
    tokens: Sequence[TokenizedTrajectory],
    subtasks: Sequence[str],
    checkpoints: Sequence[Path],
    config: ExtractionConfig,
    *,
    input_digest: str,
    lora: bool = False,
    shard_items: int = 256,
    progress: ProgressFactory | None = None,
    label: str = "pool",
) -> FeatureStore:
    """Extract (or resume extracting) features of ``trajs`` at every checkpoint into a store.

    The store's fingerprint covers the model weights at each checkpoint, the tokenizer, the
    extraction config and the input, so reopening it with anything else fails loudly.
    """
    items = items_table(trajs, tokens, subtasks)
    ckpt_info, models = [], []
    for c in checkpoints:
        model, tok = load_model(c, lora=lora)
        state = load_checkpoint_state(c)
        lr = float(state.learning_rate) if state is not None else 1.0
        ckpt_info.append({"path": str(c), "lr": lr, "model": model_fingerprint(model)})
        models.append((model, tok, state))
    tok0 = models[0][1]
    fingerprint = {
        "models": [ci["model"] for ci in ckpt_info],
        "tokenizer": tokenizer_fingerprint(tok0),
        "extraction": asdict(config),
        "input_sha256": input_digest,
        "n_items": len(trajs),
    }
    dim = feature_dim(models[0][0], config)
    if (path / "manifest.json").exists():
        store = FeatureStore.open(path, expect=fingerprint)
    else:
        store = FeatureStore.create(path, fingerprint=fingerprint, dim=dim, checkpoints=ckpt_info)
    for c, (model, _tok, state) in enumerate(models):
        if config.preconditioner != "none" and state is None:
            raise TrajinfError(
                f"preconditioner '{config.preconditioner}' needs optimizer moments, but "
                f"{checkpoints[c]} has no optimizer.safetensors (pass warmup --checkpoint dirs)"
            )
        tick = (
            progress(f"{label} features, checkpoint {c + 1}/{len(models)}", len(tokens))
            if progress
            else None
        )
        _extract_into(store, c, model, tokens, items, config, state, shard_items, tick)
    return store


def score_pool(
    model_dir: str | Path,
    pool: str | Path | Sequence[Trajectory],
    target: str | Path | Sequence[Trajectory],
    out: str | Path,
    *,
    checkpoints: Sequence[str | Path] = (),
    config: ScoreJobConfig | None = None,
    progress: ProgressFactory | None = None,
) -> ScoreOutputs:
    """Score every pool trajectory and step against the target; write stores and parquet tables.

    Writes ``out/store/{pool,target}/``, ``out/scores.parquet`` (id, score, per-subtask scores,
    harmful, ...), ``out/step_scores.parquet`` (id, step, score), ``out/statistics.parquet``
    (baseline statistics: loss, grad_norm, length, rds) and ``out/job.json``.
    """
    config = config or ScoreJobConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pool_trajs = list(pool) if not isinstance(pool, (str, Path)) else load_pool(pool)
    target_trajs = list(target) if not isinstance(target, (str, Path)) else load_pool(target)
    ckpts = _checkpoint_list(Path(model_dir), checkpoints)
    _, tokenizer = load_model(Path(model_dir))
    pool_tok = tokenize_pool(pool_trajs, tokenizer, max_length=config.max_length)
    target_tok = tokenize_pool(target_trajs, tokenizer, max_length=config.max_length)
    timings["load_tokenize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pool_store = extract_store(
        out / "store" / "pool",
        pool_trajs,
        pool_tok,
        _subtask_of(pool_trajs, config.subtask_field),
        ckpts,
        config.extraction,
        input_digest=_pool_digest(pool, pool_trajs),
        lora=config.lora,
        shard_items=config.shard_items,
        progress=progress,
        label="pool",
    )
    timings["extract_pool_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # LESS: target gradients are plain (no optimizer preconditioning).
    target_cfg = ExtractionConfig(**{**asdict(config.extraction), "preconditioner": "none"})
    target_store = extract_store(
        out / "store" / "target",
        target_trajs,
        target_tok,
        _subtask_of(target_trajs, config.subtask_field),
        ckpts,
        target_cfg,
        input_digest=_pool_digest(target, target_trajs),
        lora=config.lora,
        shard_items=config.shard_items,
        progress=progress,
        label="target",
    )
    timings["extract_target_s"] = time.perf_counter() - t0

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

    traj = result.trajectories.merge(flags, on="id", how="left")
    meta = pd.DataFrame(
        {
            "id": [t.id for t in pool_trajs],
            "task_id": [t.task_id for t in pool_trajs],
            "source": [t.source for t in pool_trajs],
            "success": [t.success for t in pool_trajs],
        }
    )
    traj = meta.merge(traj, on="id", how="left")
    _write_parquet(traj, out / "scores.parquet")
    _write_parquet(result.steps, out / "step_scores.parquet")
    if config.baselines:
        t0 = time.perf_counter()
        stats = baseline_statistics(
            model_dir, pool_tok, target_tok, pool_store, target_store, pool_trajs
        )
        _write_parquet(stats, out / "statistics.parquet")
        timings["baselines_s"] = time.perf_counter() - t0
    job = {
        "model": str(model_dir),
        "checkpoints": [str(c) for c in ckpts],
        "config": config.to_dict(),
        "harmful": harmful_info,
        "timings": timings,
        "n_pool": len(pool_trajs),
        "n_target": len(target_trajs),
        "dropped_steps": int(sum(t.dropped_steps for t in pool_tok)),
    }
    _write_json(job, out / "job.json")
    return ScoreOutputs(out, traj, result.steps, harmful_info, timings)


def baseline_statistics(
    model_dir, pool_tok, target_tok, pool_store, target_store, pool_trajs
) -> pd.DataFrame:
    """Per-item statistics the baseline selectors need: loss, grad_norm, length, rds."""
    from trajinf.baselines import hidden_state_embeddings, rds_scores

    model, _ = load_model(Path(model_dir))
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


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
