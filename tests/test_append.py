"""``score_pool(append=True)`` with a sparse update mask: appended rows are extracted through the
job's one extraction loop with the same mask, a store built under another mask is refused, and
an append killed between checkpoints finishes its shards on rerun."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import trajinf.job.append as append_mod
from trajinf.data.trajectories import load_pool
from trajinf.errors import StoreMismatchError
from trajinf.job.config import build_job_config
from trajinf.job.run import score_pool
from trajinf.models.checkpoints import load_model
from trajinf.store.feature_store import FeatureStore

N_OLD = 14  # pool items scored by the first run; the rest (6) are appended
FP16_RTOL = 2e-3  # stored rows are float16 with a per-row scale (docs/operations.md)


@pytest.fixture(scope="module")
def job(tmp_path_factory, make_tiny_job):
    """The tiny job plus ``moved/``: the model with the first half of the rows of every
    attention/MLP projection moved by 1e-2, so the update mask model -> moved tracks half."""
    d = make_tiny_job(tmp_path_factory.mktemp("append"))
    model, tok = load_model(d / "model")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p[: p.shape[0] // 2] += 1e-2
    model.save_pretrained(d / "moved")
    tok.save_pretrained(d / "moved")
    return d


def masked_config(d, *, mask: bool = True):
    cfg = build_job_config(proj_dim=64)
    cfg.shard_items = 4
    cfg.device = "cpu"
    cfg.null_directions = 8
    cfg.baselines = False
    if mask:
        cfg = replace(cfg, update_mask_from=(str(d / "model"), str(d / "moved")))
        cfg.extraction = replace(cfg.extraction, update_mask_threshold=1e-3)
    return cfg


def rows_by_key(store: FeatureStore, ids: list[str], ckpt: int = 0) -> np.ndarray:
    """Features [rows of ``ids``, D] in (id, step) order."""
    items = store.items.reset_index(drop=True)
    sel = items[items["id"].isin(ids)].sort_values(["id", "step"], kind="stable")
    return store.features(ckpt, sel["row"].to_numpy())


def assert_rows_close(a: np.ndarray, b: np.ndarray) -> None:
    scale = np.maximum(np.abs(a).max(axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(a / scale, b / scale, atol=FP16_RTOL)


def test_append_with_update_mask_matches_a_full_masked_run(job, tmp_path):
    pool = load_pool(job / "pool.jsonl")
    new_ids = [t.id for t in pool[N_OLD:]]
    cfg = masked_config(job)
    score_pool(job / "model", pool[:N_OLD], job / "target.jsonl", tmp_path / "inc", config=cfg)
    res = score_pool(job / "model", pool, job / "target.jsonl", tmp_path / "inc", config=cfg,
                     append=True)  # fmt: skip
    full = score_pool(job / "model", pool, job / "target.jsonl", tmp_path / "full", config=cfg)
    inc_store = FeatureStore.open(tmp_path / "inc" / "store" / "pool")
    full_store = FeatureStore.open(tmp_path / "full" / "store" / "pool")
    got, want = rows_by_key(inc_store, new_ids), rows_by_key(full_store, new_ids)
    assert got.shape == want.shape and len(got) > len(new_ids)  # trajectory + step rows
    assert_rows_close(got, want)
    # the mask matters: the same rows extracted without it are not what either run stored
    plain = score_pool(job / "model", pool, job / "target.jsonl", tmp_path / "plain",
                       config=masked_config(job, mask=False))  # fmt: skip
    unmasked = rows_by_key(FeatureStore.open(tmp_path / "plain" / "store" / "pool"), new_ids)
    assert not np.allclose(unmasked, want, rtol=0.05, atol=1e-3)
    a = res.trajectories.set_index("id").loc[[t.id for t in pool], "score"]
    b = full.trajectories.set_index("id").loc[[t.id for t in pool], "score"]
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert not np.allclose(
        plain.trajectories.set_index("id").loc[new_ids, "score"], b.loc[new_ids], atol=1e-3
    )
    manifest = inc_store.manifest["fingerprint"]["update_mask"]
    assert manifest["from"] == [str(job / "model"), str(job / "moved")]
    assert manifest["threshold"] == 1e-3 and len(manifest["sha256"]) == 64


def test_append_under_another_mask_is_refused(job, tmp_path):
    pool = load_pool(job / "pool.jsonl")
    cfg = masked_config(job)
    score_pool(job / "model", pool[:N_OLD], job / "target.jsonl", tmp_path / "m", config=cfg)
    with pytest.raises(StoreMismatchError, match="update_mask"):
        score_pool(job / "model", pool, job / "target.jsonl", tmp_path / "m",
                   config=masked_config(job, mask=False), append=True)  # fmt: skip
    other = replace(cfg, update_mask_from=(str(job / "moved"), str(job / "model")))
    with pytest.raises(StoreMismatchError, match="update_mask"):
        score_pool(job / "model", pool, job / "target.jsonl", tmp_path / "m", config=other,
                   append=True)  # fmt: skip
    # and the other way round: a plain store refuses a masked append
    plain = masked_config(job, mask=False)
    score_pool(job / "model", pool[:N_OLD], job / "target.jsonl", tmp_path / "p", config=plain)
    with pytest.raises(StoreMismatchError, match="update_mask"):
        score_pool(job / "model", pool, job / "target.jsonl", tmp_path / "p", config=cfg,
                   append=True)  # fmt: skip


def test_append_killed_between_checkpoints_finishes_its_shards(job, tmp_path, monkeypatch):
    """Two checkpoints: an append that dies after checkpoint 0's new shards leaves them
    recorded at checkpoint 0 only; the rerun extracts them at checkpoint 1 and scores all."""
    pool = load_pool(job / "pool.jsonl")
    ckpts = [job / "model", job / "moved"]
    cfg = masked_config(job)
    kw = dict(checkpoints=ckpts, config=cfg)
    score_pool(job / "moved", pool[:N_OLD], job / "target.jsonl", tmp_path / "k", **kw)
    real = append_mod.extract_into

    def dies_at_ckpt_1(store, ckpt, *args, **kwargs):
        if ckpt == 1:
            raise KeyboardInterrupt("killed")
        return real(store, ckpt, *args, **kwargs)

    monkeypatch.setattr(append_mod, "extract_into", dies_at_ckpt_1)
    with pytest.raises(KeyboardInterrupt):
        score_pool(job / "moved", pool, job / "target.jsonl", tmp_path / "k", append=True, **kw)
    store = FeatureStore.open(tmp_path / "k" / "store" / "pool")
    assert append_mod.unfinished_shards(store)  # recorded at checkpoint 0 only
    monkeypatch.setattr(append_mod, "extract_into", real)
    res = score_pool(job / "moved", pool, job / "target.jsonl", tmp_path / "k", append=True, **kw)
    store = FeatureStore.open(tmp_path / "k" / "store" / "pool")
    assert append_mod.unfinished_shards(store) == [] and store.verify() == []
    full = score_pool(job / "moved", pool, job / "target.jsonl", tmp_path / "f", **kw)
    full_store = FeatureStore.open(tmp_path / "f" / "store" / "pool")
    new_ids = [t.id for t in pool[N_OLD:]]
    for c in range(2):
        assert_rows_close(rows_by_key(store, new_ids, c), rows_by_key(full_store, new_ids, c))
    assert sorted(res.trajectories["id"]) == sorted(t.id for t in pool)
    a = res.trajectories.set_index("id").loc[[t.id for t in pool], "score"]
    b = full.trajectories.set_index("id").loc[[t.id for t in pool], "score"]
    np.testing.assert_allclose(a, b, atol=1e-3)
