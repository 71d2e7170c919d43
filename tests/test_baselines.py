"""Baseline statistics: RDS+ embeddings (batch invariant), RDS scores, per-item statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.selection.baselines import hidden_state_embeddings, item_statistics, rds_scores
from trajinf.store.feature_store import FeatureStore


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg)


def items(n: int, seed: int = 0) -> list[TokenizedTrajectory]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(rng.integers(3, 40))
        ids = rng.integers(1, 64, size=t).astype(np.int64)
        mask = np.zeros(t, bool)
        mask[t // 2 :] = True
        out.append(
            TokenizedTrajectory(f"i{i}", ids, mask, np.where(mask, 0, -1).astype(np.int32), 1)
        )
    return out


def test_embeddings_match_single_item_forward(model):
    its = items(7)
    emb = hidden_state_embeddings(model, its, batch_tokens=8192)
    assert emb.shape == (7, 32) and emb.dtype == np.float32
    with torch.inference_mode():
        for i, it in enumerate(its):
            ids = torch.as_tensor(it.input_ids)[None]
            ref = model.model(input_ids=ids).last_hidden_state[0].mean(0).numpy()
            np.testing.assert_allclose(emb[i], ref, rtol=1e-4, atol=1e-5)


def test_embeddings_batch_invariant(model):
    its = items(9, seed=1)
    big = hidden_state_embeddings(model, its, batch_tokens=10_000)
    small = hidden_state_embeddings(model, its, batch_tokens=60)
    single = hidden_state_embeddings(model, its, batch_tokens=1)
    np.testing.assert_allclose(big, single, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(small, single, rtol=1e-4, atol=1e-5)
    # an item's embedding does not depend on which other items share its batch
    sub = hidden_state_embeddings(model, its[3:5], batch_tokens=10_000)
    np.testing.assert_allclose(sub, single[3:5], rtol=1e-4, atol=1e-5)


def test_training_mode_restored(model):
    model.train()
    hidden_state_embeddings(model, items(2))
    assert model.training
    model.eval()


def test_rds_scores_reference():
    rng = np.random.default_rng(0)
    pool, target = rng.standard_normal((11, 8)), rng.standard_normal((6, 8))
    subs = ["a", "a", "b", "b", "b", "c"]
    got = rds_scores(pool, target, subs, chunk_rows=4)
    got_mean = rds_scores(pool, target, subs, aggregate="mean")
    for i in range(11):
        per = []
        for s in "abc":
            cos = [pool[i] @ target[j] / np.linalg.norm(pool[i]) / np.linalg.norm(target[j])
                   for j in range(6) if subs[j] == s]  # fmt: skip
            per.append(np.mean(cos))
        assert got[i] == pytest.approx(max(per), abs=1e-5)
        assert got_mean[i] == pytest.approx(np.mean(per), abs=1e-5)
    assert rds_scores(pool, target).shape == (11,)


def test_item_statistics(tmp_path):
    fs = FeatureStore.create(tmp_path / "s", fingerprint={}, dim=3,
                             checkpoints=[{"path": "a", "lr": 1.0}, {"path": "b", "lr": 1.0}])  # fmt: skip
    df = pd.DataFrame({"id": ["x", "x", "y"], "step": [-1, 0, -1], "n_action_tokens": [5, 5, 9],
                       "loss": [1.5, 1.5, 0.5]})  # fmt: skip
    f = np.array([[3, 4, 0], [1, 1, 1], [0, 0, 2]], np.float32)
    fs.write_shard(0, 0, df, f)
    fs.write_shard(1, 0, df, 2 * f)
    st = item_statistics(fs, chunk_rows=1)
    assert st["id"].tolist() == ["x", "y"]
    np.testing.assert_allclose(st["grad_norm"], [10.0, 4.0])  # last checkpoint
    np.testing.assert_allclose(item_statistics(fs, ckpt=0)["grad_norm"], [5.0, 2.0])
    assert st["length"].tolist() == [5, 9] and st["loss"].tolist() == [1.5, 0.5]
