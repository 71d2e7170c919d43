"""The scoring job's baseline statistics (``OUT/statistics.parquet``), reused on rerun.

The table is kept when ``OUT/cache/statistics.json`` records the same key (the stores'
contents, the tokens, the model at ``model_dir``); otherwise the pool's RDS+ embeddings are
computed block by block into ``OUT/cache/embeddings/KEY/`` (a job killed while computing them
keeps the finished blocks) and the table is rebuilt by
:func:`trajinf.selection.baselines.baseline_statistics`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from trajinf.atomic import write_parquet
from trajinf.data.schema import Trajectory
from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.job.cache import CACHE_DIR, cache_key, cached_shard_arrays, cached_table
from trajinf.job.shards import shard_bounds
from trajinf.selection.baselines import baseline_statistics, hidden_state_embeddings
from trajinf.store.feature_store import FeatureStore

if TYPE_CHECKING:
    from trajinf.job.config import ScoreJobConfig

# Pool items per cached embedding block: large enough that length-bucketed batches stay full
# (blocks of 128 items cost 35% more CPU than one pass on the resume benchmark; 1024: +2%).
EMBEDDING_BLOCK_ITEMS = 1024


def tokens_digest(tokens: Sequence[TokenizedTrajectory]) -> str:
    """sha256 of every item's id and token ids."""
    h = hashlib.sha256()
    for t in tokens:
        h.update(t.id.encode() + b"\0")
        h.update(np.asarray(t.input_ids, np.int64).tobytes())
    return h.hexdigest()


def store_key(store: FeatureStore) -> dict:
    """What a store's contents are: its fingerprint and every shard's checksums."""
    m = store.manifest
    return {
        "fingerprint": m["fingerprint"],
        "shards": [[e["ckpt"], e["shard"], e["sha256"], e["rows_sha256"]] for e in m["shards"]],
    }


def model_key(model_dir: Path, checkpoints: Sequence[Path], pool_store: FeatureStore, load):
    """The fingerprint of the model at ``model_dir``: from the pool store's manifest when it is
    one of the job's checkpoints (no load), else by loading it (``load()`` -> model)."""
    from trajinf.models.checkpoints import model_fingerprint

    for c, info in zip(checkpoints, pool_store.manifest["checkpoints"], strict=True):
        if Path(c).resolve() == Path(model_dir).resolve():
            return info["model"]
    return model_fingerprint(load())


def job_statistics(
    out: Path,
    model_dir: str | Path,
    checkpoints: Sequence[Path],
    pool_tokens: Sequence[TokenizedTrajectory],
    target_tokens: Sequence[TokenizedTrajectory],
    pool_trajs: Sequence[Trajectory],
    pool_store: FeatureStore,
    target_store: FeatureStore,
    config: ScoreJobConfig,
) -> pd.DataFrame:
    """``baseline_statistics`` of the job, written to ``out/statistics.parquet``; reused from
    there when nothing it depends on changed, and its pool embeddings cached per block of
    :data:`EMBEDDING_BLOCK_ITEMS` items."""
    from trajinf.models.checkpoints import load_model

    loaded: list = []

    def model():
        if not loaded:
            loaded.append(
                load_model(Path(model_dir), trust_remote_code=config.trust_remote_code)[0]
            )
        return loaded[0]

    cache = Path(out) / CACHE_DIR
    emb_key = cache_key(
        {
            "model": model_key(Path(model_dir), checkpoints, pool_store, model),
            "tokens": tokens_digest(pool_tokens),
            "block_items": EMBEDDING_BLOCK_ITEMS,
        }
    )
    key = cache_key(
        {
            "embeddings": emb_key,
            "pool": store_key(pool_store),
            "target": store_key(target_store),
            "target_tokens": tokens_digest(target_tokens),
            "ids": [t.id for t in pool_trajs],
        }
    )

    def compute() -> pd.DataFrame:
        emb = cached_shard_arrays(
            cache / "embeddings",
            emb_key,
            shard_bounds(len(pool_tokens), EMBEDDING_BLOCK_ITEMS),
            lambda a, b: hidden_state_embeddings(model(), pool_tokens[a:b]),
        )
        return baseline_statistics(
            model_dir,
            pool_tokens,
            target_tokens,
            pool_store,
            target_store,
            pool_trajs,
            trust_remote_code=config.trust_remote_code,
            model=model(),
            pool_embeddings=emb,
        )

    return cached_table(
        Path(out) / "statistics.parquet", cache / "statistics.json", key, compute, write_parquet
    )
