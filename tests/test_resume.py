"""A rerun of the scoring job reuses finished work besides store shards: tokens, the pool's RDS
embeddings (per shard) and the baseline statistics table, each keyed by what it depends on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import trajinf.job.cache as cache_mod
import trajinf.job.statistics as stats_mod
from trajinf.data.tokenize import tokenize_pool
from trajinf.data.trajectories import load_pool
from trajinf.job.cache import CACHE_DIR, load_tokens, save_tokens
from trajinf.job.config import build_job_config
from trajinf.job.run import score_pool
from trajinf.models.checkpoints import load_model

OUTPUTS = ("scores.parquet", "step_scores.parquet", "statistics.parquet")


def config(**kw):
    cfg = build_job_config(proj_dim=64, **kw)
    cfg.shard_items = 4
    cfg.device = "cpu"
    cfg.null_directions = 8
    return cfg


@pytest.fixture(scope="module")
def job(tmp_path_factory, make_tiny_job):
    """The tiny job scored once, uninterrupted, into ``ref``."""
    d = make_tiny_job(tmp_path_factory.mktemp("resume"))
    score_pool(d / "model", d / "pool.jsonl", d / "target.jsonl", d / "ref", config=config())
    return d


def test_tokens_round_trip_with_weights_and_key(job, tmp_path):
    pool = load_pool(job / "pool.jsonl")
    pool[1].messages = [dict(m) for m in pool[1].messages]
    for m in pool[1].messages:
        if m["role"] == "assistant":
            m["weight"] = 0.25  # step weights give the item a weights array
    _, tok = load_model(job / "model")
    tokens = tokenize_pool(pool, tok, max_length=2048)
    assert tokens[1].weights is not None and tokens[0].weights is None
    save_tokens(tmp_path / "t.npz", tokens, "k1")
    back = load_tokens(tmp_path / "t.npz", "k1")
    assert [t.id for t in back] == [t.id for t in tokens]
    for a, b in zip(tokens, back, strict=True):
        for f in ("input_ids", "action_mask", "step_ids"):
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert (a.n_steps, a.dropped_steps) == (b.n_steps, b.dropped_steps)
        assert (a.weights is None) == (b.weights is None)
        if a.weights is not None:
            assert a.weights.dtype == b.weights.dtype and np.array_equal(a.weights, b.weights)
    assert load_tokens(tmp_path / "t.npz", "k2") is None  # another key: not used
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04 truncated")
    assert load_tokens(tmp_path / "t.npz", "k1") is None


def test_rerun_reuses_tokens_embeddings_and_statistics(job, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(job / "ref", out)

    def forbidden(*a, **k):
        raise AssertionError("recomputed on rerun")

    monkeypatch.setattr(cache_mod, "tokenize_pool", forbidden)
    monkeypatch.setattr(stats_mod, "baseline_statistics", forbidden)
    monkeypatch.setattr(stats_mod, "hidden_state_embeddings", forbidden)
    score_pool(job / "model", job / "pool.jsonl", job / "target.jsonl", out, config=config())
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (job / "ref" / name).read_bytes(), name
    # a different max_length is a different tokenization: the cache is not used
    with pytest.raises(AssertionError, match="recomputed"):
        score_pool(job / "model", job / "pool.jsonl", job / "target.jsonl", tmp_path / "x",
                   config=config(max_length=512))  # fmt: skip


def test_statistics_killed_midway_keep_finished_embedding_blocks(job, tmp_path, monkeypatch):
    monkeypatch.setattr(stats_mod, "EMBEDDING_BLOCK_ITEMS", 4)  # 20 pool items: 5 blocks
    out = tmp_path / "killed"
    real = stats_mod.hidden_state_embeddings
    calls = []

    def dies_on_third(model, items, *a, **k):
        calls.append(len(items))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(model, items, *a, **k)

    monkeypatch.setattr(stats_mod, "hidden_state_embeddings", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        score_pool(job / "model", job / "pool.jsonl", job / "target.jsonl", out, config=config())
    assert len(list((out / CACHE_DIR / "embeddings").glob("*/shard-*.npy"))) == 2
    n_blocks = 5
    calls.clear()
    monkeypatch.setattr(stats_mod, "hidden_state_embeddings", real)
    monkeypatch.setattr(stats_mod, "hidden_state_embeddings", lambda m, it, *a, **k: (
        calls.append(len(it)) or real(m, it, *a, **k)))  # fmt: skip
    score_pool(job / "model", job / "pool.jsonl", job / "target.jsonl", out, config=config())
    assert len(calls) == n_blocks - 2  # only the blocks the killed run had not finished
    for name in OUTPUTS[:2]:
        assert (out / name).read_bytes() == (job / "ref" / name).read_bytes(), name
    # embeddings do not depend on the block (length-bucketed batches, causal attention)
    got = pd.read_parquet(out / "statistics.parquet")
    ref = pd.read_parquet(job / "ref" / "statistics.parquet")
    np.testing.assert_allclose(got["rds"], ref["rds"], atol=1e-6)
    pd.testing.assert_frame_equal(got.drop(columns="rds"), ref.drop(columns="rds"))


def test_statistics_are_recomputed_when_a_store_changes(job, tmp_path):
    """The statistics key covers the stores' contents: a rerun under another extraction seed
    (another pool store) must not reuse the table."""
    import shutil

    out = tmp_path / "seed"
    shutil.copytree(job / "ref", out)
    shutil.rmtree(out / "store")
    score_pool(job / "model", job / "pool.jsonl", job / "target.jsonl", out,
               config=config(seed=3))  # fmt: skip
    got = pd.read_parquet(out / "statistics.parquet").set_index("id")
    ref = pd.read_parquet(job / "ref" / "statistics.parquet").set_index("id")
    assert not np.allclose(got["grad_norm"], ref.loc[got.index, "grad_norm"])
    np.testing.assert_array_equal(got["rds"], ref.loc[got.index, "rds"])  # same model, tokens
