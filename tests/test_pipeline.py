"""End to end: env rollouts -> tiny model -> warmup checkpoints -> score -> select -> report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from trajinf.data.trajectories import load_pool
from trajinf.data.write import write_pool
from trajinf.envs import make_env
from trajinf.envs.policies import ExpertPolicy, NoisyExpertPolicy, PlantedHarmfulPolicy
from trajinf.envs.rollout import rollout
from trajinf.errors import StoreMismatchError, TrajinfError
from trajinf.job.config import build_job_config
from trajinf.job.run import score_pool
from trajinf.models.tiny import tiny_model, tokenizer_corpus, train_tokenizer
from trajinf.report import write_score_report
from trajinf.selection.export import select_to_file
from trajinf.train.sft import DEMO_TRAIN, train_sft


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A small scored pool: expert, noisy and planted trajectories; two warmup checkpoints."""
    d = tmp_path_factory.mktemp("pipe")
    env = make_env("builtin")
    tasks = env.tasks("train", 16, 0)
    target = rollout(env, tasks[:4], ExpertPolicy(), source="target", with_tools=False)
    pool = (
        rollout(env, tasks[4:], ExpertPolicy(), source="expert", with_tools=False)
        + rollout(env, tasks[4:], NoisyExpertPolicy(0.6), source="noisy", with_tools=False)
        + rollout(env, tasks[4:8], PlantedHarmfulPolicy(), source="expert", id_prefix="p",
                  with_tools=False)
    )  # fmt: skip
    write_pool(pool, d / "pool.jsonl")
    write_pool(target, d / "target.jsonl")
    tok = train_tokenizer(tokenizer_corpus(pool + target), vocab_size=400)
    model = tiny_model(tok, hidden=32, layers=1, heads=2, seed=0)
    res = train_sft(
        model,
        tok,
        pool[:12],
        replace(DEMO_TRAIN, epochs=2, seed=0),
        checkpoint_dir=d / "warm",
        n_checkpoints=2,
    )
    ckpts = [c["path"] for c in res.checkpoints]
    cfg = build_job_config(proj_dim=256, has_checkpoints=True, subtask_field="family")
    out = score_pool(
        ckpts[-1], d / "pool.jsonl", d / "target.jsonl", d / "scores",
        checkpoints=ckpts, config=cfg,
    )  # fmt: skip
    return d, out, pool, ckpts, cfg


def test_outputs_follow_the_cli_contract(scored):
    d, out, pool, _, _ = scored
    scores = pd.read_parquet(d / "scores" / "scores.parquet")
    steps = pd.read_parquet(d / "scores" / "step_scores.parquet")
    assert {"id", "score", "harmful"} <= set(scores.columns)
    assert {"id", "step", "score"} <= set(steps.columns)
    assert sorted(scores["id"]) == sorted(t.id for t in pool)
    assert np.isfinite(scores["score"]).all()
    # every trajectory's steps are all there and add up to its score
    total = steps.groupby("id")["score"].sum()
    np.testing.assert_allclose(total.loc[scores["id"]].to_numpy(), scores["score"], atol=1e-5)
    n_steps = steps.groupby("id").size()
    for t in pool:
        assert n_steps[t.id] == len(t.steps())
    job = json.loads((d / "scores" / "job.json").read_text())
    assert len(job["checkpoints"]) == 2
    assert (d / "scores" / "statistics.parquet").exists()


def test_rerun_resumes_without_rewriting_shards(scored):
    d, _, _, ckpts, cfg = scored
    shard = next((d / "scores" / "store" / "pool").glob("ckpt-0/features-*.npy"))
    before = shard.stat().st_mtime_ns
    again = score_pool(ckpts[-1], d / "pool.jsonl", d / "target.jsonl", d / "scores",
                       checkpoints=ckpts, config=cfg)  # fmt: skip
    assert shard.stat().st_mtime_ns == before
    first = pd.read_parquet(d / "scores" / "scores.parquet")
    np.testing.assert_allclose(again.trajectories["score"], first["score"])


def test_store_refuses_another_projection(scored):
    d, _, _, ckpts, cfg = scored
    other = replace(cfg, extraction=replace(cfg.extraction, seed=cfg.extraction.seed + 1))
    with pytest.raises(StoreMismatchError):
        score_pool(ckpts[-1], d / "pool.jsonl", d / "target.jsonl", d / "scores",
                   checkpoints=ckpts, config=other)  # fmt: skip


@pytest.mark.parametrize(
    "method", ["influence", "random", "success", "rds", "loss", "gradnorm", "length"]
)
def test_select_writes_budgeted_subset_in_input_format(scored, method, tmp_path):
    d, _, pool, _, _ = scored
    out = tmp_path / "sel.jsonl"
    sel = select_to_file(d / "scores", d / "pool.jsonl", out, method=method, fraction=0.25,
                         step_weights=method == "influence")  # fmt: skip
    back = load_pool(out)
    assert len(back) == len(sel.ids) <= int(np.ceil(0.25 * len(pool)))
    assert [t.id for t in back] == sel.ids
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert all("messages" in r for r in raw)
    if method == "influence":
        steps = pd.read_parquet(d / "scores" / "step_scores.parquet").set_index(["id", "step"])
        for r in raw:
            acts = [m for m in r["messages"] if m["role"] == "assistant"]
            for k, m in enumerate(acts):
                assert m["weight"] == (0.0 if steps.loc[(r["id"], k), "score"] < 0 else 1.0)


def test_select_rejects_a_pool_that_was_not_scored(scored, tmp_path):
    d, _, pool, _, _ = scored
    write_pool(pool[:-1], tmp_path / "fewer.jsonl")
    with pytest.raises(TrajinfError, match="does not match"):
        select_to_file(d / "scores", tmp_path / "fewer.jsonl", tmp_path / "x.jsonl", fraction=0.5)


def test_report_is_written(scored, tmp_path):
    d, _, _, _, _ = scored
    path = write_score_report(d / "scores", d / "pool.jsonl", tmp_path / "r.html", top=3)
    text = Path(path).read_text()
    assert text.count("<img") >= 3 and "Top 3" in text


def test_sparse_update_mask_tracks_fewer_parameters(scored, tmp_path):
    d, _, _, ckpts, cfg = scored
    from trajinf.models.checkpoints import load_model

    a, b = (dict(load_model(c)[0].named_parameters()) for c in ckpts[:2])
    moved = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if k.endswith("proj.weight")])
    threshold = float(moved.median())  # about half the tracked weights pass
    masked = replace(cfg, update_mask_from=(ckpts[0], ckpts[1]))
    masked.extraction = replace(cfg.extraction, update_mask_threshold=threshold)
    out = score_pool(ckpts[-1], d / "pool.jsonl", d / "target.jsonl", tmp_path / "m",
                     checkpoints=ckpts, config=masked)  # fmt: skip
    full = pd.read_parquet(d / "scores" / "scores.parquet").set_index("id")["score"]
    got = out.trajectories.set_index("id")["score"]
    assert np.isfinite(got).all()
    assert not np.allclose(got.loc[full.index], full)  # the mask changes what is tracked
    manifest = (tmp_path / "m" / "store" / "pool" / "manifest.json").read_text()
    assert repr(threshold) in manifest or str(threshold) in manifest


def test_select_filters_zero_variance_groups_and_near_duplicates(scored, tmp_path):
    d, _, pool, _, _ = scored
    # expert and noisy rollouts share task ids: groups where both succeeded carry no signal
    sel = select_to_file(d / "scores", d / "pool.jsonl", tmp_path / "zv.jsonl", method="full",
                         fraction=1.0, drop_zero_variance=True)  # fmt: skip
    by_task: dict = {}
    for t in pool:
        by_task.setdefault(t.task_id, []).append(bool(t.success))
    flat = {k for k, v in by_task.items() if len(v) >= 2 and len(set(v)) == 1}
    removed = {t.id for t in pool if t.task_id in flat}
    assert sel.info["filters"]["zero_variance"]["trajectories_removed"] == len(removed) > 0
    assert not removed & set(sel.ids)
    # a threshold of -1 makes every trajectory a duplicate of the best-scored one
    sel = select_to_file(d / "scores", d / "pool.jsonl", tmp_path / "dd.jsonl", method="full",
                         fraction=1.0, dedup=-1.0)  # fmt: skip
    best = pd.read_parquet(d / "scores" / "scores.parquet").sort_values("score").iloc[-1]["id"]
    assert sel.ids == [best]
    assert sel.info["filters"]["near_duplicates"]["removed"] == len(pool) - 1
