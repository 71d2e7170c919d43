"""Steps of the scoring job shared by the full and the appending run: reading inputs,
the tables it writes (atomically) and the baseline statistics."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from trajinf.checkpoints import load_model
from trajinf.errors import TrajinfError
from trajinf.store import FeatureStore, _atomic_write
from trajinf.tokenize import tokenize_pool
from trajinf.trajectories import Trajectory, field_value, load_pool

if TYPE_CHECKING:
    from trajinf.pipeline import ScoreJobConfig


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


def _load_tokenizer(model_dir: Path, *, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if (
        not (Path(model_dir) / "config.json").is_file()
        and not (Path(model_dir) / "adapter_config.json").is_file()
    ):
        raise TrajinfError(f"{model_dir}: not a model directory (no config.json)")
    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)


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
