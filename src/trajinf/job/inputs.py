"""Inputs of the scoring job: trajectories, tokenizer, tokens, checkpoint list, subtask labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from trajinf.data.schema import Trajectory
from trajinf.data.tokenize import tokenize_pool
from trajinf.data.trajectories import field_value, load_pool
from trajinf.errors import TrajinfError

if TYPE_CHECKING:
    from trajinf.job.config import ScoreJobConfig


def subtask_labels(trajs: Sequence[Trajectory], name: str) -> list[str]:
    out = []
    for t in trajs:
        v = field_value(t, name)
        out.append("all" if v is None else str(v))
    return out


def checkpoint_list(model_dir: Path, checkpoints: Sequence[str | Path]) -> list[Path]:
    return [Path(c) for c in checkpoints] if checkpoints else [Path(model_dir)]


def load_inputs(
    model_dir: Path, pool, target, config: ScoreJobConfig, *, tokenize_pool_too: bool = True
):
    """(pool trajectories, target trajectories, pool tokens or None, target tokens)."""
    pool_trajs = list(pool) if not isinstance(pool, (str, Path)) else load_pool(pool)
    target_trajs = list(target) if not isinstance(target, (str, Path)) else load_pool(target)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=config.trust_remote_code)
    pool_tok = (
        tokenize_pool(pool_trajs, tokenizer, max_length=config.max_length)
        if tokenize_pool_too
        else None
    )
    target_tok = tokenize_pool(target_trajs, tokenizer, max_length=config.max_length)
    return pool_trajs, target_trajs, pool_tok, target_tok


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if (
        not (Path(model_dir) / "config.json").is_file()
        and not (Path(model_dir) / "adapter_config.json").is_file()
    ):
        raise TrajinfError(f"{model_dir}: not a model directory (no config.json)")
    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)


def with_meta(traj: pd.DataFrame, pool_trajs: Sequence[Trajectory]) -> pd.DataFrame:
    meta = pd.DataFrame(
        {
            "id": [t.id for t in pool_trajs],
            "task_id": [t.task_id for t in pool_trajs],
            "source": [t.source for t in pool_trajs],
            "success": [t.success for t in pool_trajs],
        }
    )
    return meta.merge(traj, on="id", how="left")
