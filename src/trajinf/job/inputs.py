"""Inputs of the scoring job: trajectories, tokenizer, tokens, checkpoint list, subtask labels,
update mask."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from trajinf.data.schema import Trajectory
from trajinf.data.trajectories import field_value, load_pool
from trajinf.job.cache import cached_tokens
from trajinf.job.shards import UpdateMask

if TYPE_CHECKING:
    from trajinf.job.config import ScoreJobConfig

log = logging.getLogger(__name__)

DEFAULT_MASK_THRESHOLD = 1e-5


def load_update_mask(config: ScoreJobConfig) -> UpdateMask | None:
    """The sparse update mask of ``config.update_mask_from`` (None when not asked for): the
    parameters that moved by more than ``config.extraction.update_mask_threshold`` (default
    1e-5) between the two checkpoints. Its source goes into the stores' fingerprints."""
    if config.update_mask_from is None:
        return None
    from trajinf.gradients.masks import mask_density, sparse_update_mask
    from trajinf.models.checkpoints import load_model

    a, b = (str(p) for p in config.update_mask_from)
    threshold = config.extraction.update_mask_threshold
    threshold = DEFAULT_MASK_THRESHOLD if threshold is None else float(threshold)
    mask = sparse_update_mask(load_model(a)[0], load_model(b)[0], threshold=threshold)
    log.info("update mask from %s -> %s: density %.4f", a, b, mask_density(mask))
    return UpdateMask(mask, {"from": [a, b], "threshold": threshold})


def subtask_labels(trajs: Sequence[Trajectory], name: str) -> list[str]:
    out = []
    for t in trajs:
        v = field_value(t, name)
        out.append("all" if v is None else str(v))
    return out


def checkpoint_list(model_dir: Path, checkpoints: Sequence[str | Path]) -> list[Path]:
    return [Path(c) for c in checkpoints] if checkpoints else [Path(model_dir)]


def load_inputs(
    model_dir: Path,
    pool,
    target,
    config: ScoreJobConfig,
    *,
    tokenize_pool_too: bool = True,
    cache: Path | None = None,
):
    """(pool trajectories, target trajectories, pool tokens or None, target tokens).

    ``cache``: a directory (the job's ``OUT/cache``) where the tokens are kept as
    ``tokens-{pool,target}.npz``, keyed by the input, tokenizer and max length, so a rerun
    does not tokenize again (:func:`trajinf.job.cache.cached_tokens`)."""
    from trajinf.models.checkpoints import tokenizer_fingerprint

    pool_trajs = list(pool) if not isinstance(pool, (str, Path)) else load_pool(pool)
    target_trajs = list(target) if not isinstance(target, (str, Path)) else load_pool(target)
    tokenizer = load_tokenizer(
        model_dir, trust_remote_code=config.trust_remote_code, chat_template=config.chat_template
    )
    key = tokenizer_fingerprint(tokenizer) if cache is not None else ""

    def tokens(name, source, trajs):
        path = Path(cache) / f"tokens-{name}.npz" if cache is not None else None
        return cached_tokens(
            path, source, trajs, tokenizer, max_length=config.max_length, tokenizer_key=key
        )

    pool_tok = tokens("pool", pool, pool_trajs) if tokenize_pool_too else None
    target_tok = tokens("target", target, target_trajs)
    return pool_trajs, target_trajs, pool_tok, target_tok


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool, chat_template: str | None = None):
    """The tokenizer of ``--model`` (a directory, .gguf file, short name or cached hub id), with
    ``chat_template`` replacing its own (``trajinf.models.load.load_tokenizer``)."""
    from trajinf.models.load import load_tokenizer as load

    return load(model_dir, chat_template=chat_template, trust_remote_code=trust_remote_code)


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
