"""Scale out: sharding over ranks, byte-identical merge (gloo, 2 processes), append, top-k."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from trajinf.data.trajectories import load_pool
from trajinf.errors import TrajinfError
from trajinf.job.config import build_job_config
from trajinf.job.distributed import RANKS_DIR
from trajinf.job.ranks import RankContext, rank_context, shutdown
from trajinf.job.run import extract_job, score_pool
from trajinf.selection.select import select


def job_config(**kw):
    cfg = build_job_config(proj_dim=64, **kw)
    cfg.shard_items = 3
    cfg.device = "cpu"
    return cfg


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def job(tmp_path_factory, make_tiny_job):
    d = make_tiny_job(tmp_path_factory.mktemp("dist"))
    extract_job(d / "model", d / "pool.jsonl", d / "single", target=d / "target.jsonl",
                config=job_config())  # fmt: skip
    return d


def test_shards_are_assigned_round_robin():
    ranks = [RankContext(rank=r, world=3) for r in range(3)]
    assert ranks[1].shards(8) == [1, 4, 7]
    owned = sorted(s for r in ranks for s in r.shards(8))
    assert owned == list(range(8))
    assert RankContext().shards(3) == [0, 1, 2] and RankContext().is_main


def _rank_worker(rank: int, world: int, rendezvous: str, d: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = 0
    try:
        # a file rendezvous: no port to pick, so nothing another process can take first
        ctx = rank_context("gloo", timeout_s=600, init_method=f"file://{rendezvous}")
        try:
            p = Path(d)
            extract_job(p / "model", p / "pool.jsonl", out, target=p / "target.jsonl",
                        config=job_config(), rank=ctx)  # fmt: skip
        finally:
            shutdown(ctx)
    except BaseException:
        code = 1
    os._exit(code)


def test_two_gloo_ranks_merge_byte_identical_to_one_process(job, tmp_path):
    ctx = mp.get_context("fork")  # workers inherit the imported modules: no 10 s re-import
    rendezvous = tmp_path / "rendezvous"
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, rendezvous, str(job), str(job / "dist")))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert [p.exitcode for p in procs] == [0, 0]
    for name in ("pool", "target"):
        single, dist = (
            tree_bytes(job / "single" / "store" / name),
            tree_bytes(job / "dist" / "store" / name),
        )
        assert sorted(single) == sorted(dist)  # no partial stores or temp files left behind
        assert name == "target" or len([k for k in single if k.endswith(".npy")]) >= 4
        for k in single:
            assert single[k] == dist[k], f"{name}/{k} differs"
    assert not (job / "dist" / "store" / "pool" / RANKS_DIR).exists()


def test_merge_names_the_rank_that_did_not_finish_and_resumes(job):
    """Ranks simulated one after another in this process (no process group)."""
    out = job / "seq"
    with pytest.raises(TrajinfError, match="rank 1 of 2 did not finish shard 1"):
        extract_job(job / "model", job / "pool.jsonl", out, config=job_config(),
                    rank=RankContext(rank=0, world=2))  # fmt: skip
    extract_job(job / "model", job / "pool.jsonl", out, config=job_config(),
                rank=RankContext(rank=1, world=2))  # fmt: skip
    # rank 0 again: its own shards are kept in its partial store, rank 1's are merged now
    extract_job(job / "model", job / "pool.jsonl", out, config=job_config(),
                rank=RankContext(rank=0, world=2))  # fmt: skip
    assert tree_bytes(out / "store" / "pool") == tree_bytes(job / "single" / "store" / "pool")


def test_append_scores_only_new_rollouts(job, tmp_path):
    pool = load_pool(job / "pool.jsonl")
    cfg = job_config()
    cfg.baselines = True
    first = score_pool(job / "model", pool[:14], job / "target.jsonl", tmp_path / "inc", config=cfg)
    shard0 = tmp_path / "inc" / "store" / "pool" / "ckpt-0" / "features-00000.npy"
    before = shard0.stat().st_mtime_ns
    res = score_pool(job / "model", pool, job / "target.jsonl", tmp_path / "inc", config=cfg,
                     append=True)  # fmt: skip
    assert shard0.stat().st_mtime_ns == before  # old shards untouched
    full = score_pool(job / "model", pool, job / "target.jsonl", tmp_path / "full", config=cfg)
    a = res.trajectories.set_index("id").loc[[t.id for t in pool]]
    b = full.trajectories.set_index("id").loc[[t.id for t in pool]]
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-6)
    old = first.trajectories.set_index("id")["score"]
    np.testing.assert_array_equal(a.loc[old.index, "score"], old)  # old rows kept as they were
    steps = pd.read_parquet(tmp_path / "inc" / "step_scores.parquet")
    assert len(steps) == len(full.steps) and not steps.duplicated(["id", "step"]).any()
    np.testing.assert_allclose(steps.groupby("id")["score"].sum().loc[a.index], a["score"],
                               atol=1e-5)  # fmt: skip
    stats = pd.read_parquet(tmp_path / "inc" / "statistics.parquet")
    assert sorted(stats["id"]) == sorted(t.id for t in pool)
    job_json = json.loads((tmp_path / "inc" / "job.json").read_text())
    assert job_json["appended"][0]["n"] == len(pool) - 14 and job_json["n_pool"] == len(pool)
    # nothing new: a second append is a no-op
    again = score_pool(job / "model", pool, job / "target.jsonl", tmp_path / "inc", config=cfg,
                       append=True)  # fmt: skip
    assert len(again.trajectories) == len(pool)
    sel = select("influence", again.trajectories, fraction=0.25, scores=again.trajectories)
    assert len(sel.ids) == int(np.ceil(0.25 * len(pool)))


def test_top_k_streams_the_same_selection(job, tmp_path):
    cfg = job_config()
    cfg.baselines = False
    full = score_pool(job / "model", job / "pool.jsonl", job / "target.jsonl", tmp_path / "f",
                      config=cfg)  # fmt: skip
    top = score_pool(job / "model", job / "pool.jsonl", job / "target.jsonl", tmp_path / "t",
                     config=cfg, top_k=5)  # fmt: skip
    best = full.trajectories.sort_values("score", ascending=False, kind="stable").head(5)
    assert top.trajectories["id"].tolist() == best["id"].tolist()
    np.testing.assert_allclose(top.trajectories["score"], best["score"], atol=1e-6)
    assert pd.read_parquet(tmp_path / "t" / "top.parquet")["id"].tolist() == best["id"].tolist()


# One thread per process for every pool a worker may start (OpenMP, BLAS, HF tokenizers): on
# a loaded machine two ranks x (cores) threads each only add contention and thread creation.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


@pytest.mark.slow
def test_cli_distributed_via_torchrun_matches_single_process(job, tmp_path):
    """`trajinf extract --distributed --nproc 2` spawns torchrun (~40 s on 2 slow cores)."""
    args = ["--model", str(job / "model"), "--pool", str(job / "pool.jsonl"),
            "--target", str(job / "target.jsonl"), "--proj-dim", "64", "--shard-items", "3",
            "--device", "cpu"]  # fmt: skip
    env = {**os.environ, **ONE_THREAD}
    for name, extra in (("one", []), ("two", ["--distributed", "--nproc", "2",
                                              "--backend", "gloo"])):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "trajinf", "extract", *args, *extra,
                            "--out", str(tmp_path / name)], capture_output=True, text=True,
                           timeout=900, env=env)  # fmt: skip
        # both streams: torchrun prints a failing rank's own error on stdout or stderr
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert tree_bytes(tmp_path / "one" / "store") == tree_bytes(tmp_path / "two" / "store")


def test_huge_gradients_are_kept_and_nonfinite_listed(job, tmp_path, monkeypatch):
    """An item whose features exceed float16's range (TWX self rollouts reach ~8e4) is stored
    scaled and scored; one with a NaN feature is zeroed, listed with its id and skipped."""
    import trajinf.job.shards as ex
    from trajinf.scoring.source import nonfinite_ids
    from trajinf.store.feature_store import FeatureStore

    real = ex.extract_features
    big_id, nan_id = (t.id for t in load_pool(job / "pool.jsonl")[:2])

    def blown_up(model, tokens, config, **kw):
        for f in real(model, tokens, config, **kw):
            if f.id == big_id:
                f.trajectory, f.steps = f.trajectory * 1e6, f.steps * 1e6
            elif f.id == nan_id:
                f.steps = f.steps.copy()
                f.steps[0, 0] = np.nan
            yield f

    monkeypatch.setattr(ex, "extract_features", blown_up)
    with pytest.warns(UserWarning, match=f"item {nan_id}: non-finite features"):
        extract_job(job / "model", job / "pool.jsonl", tmp_path / "o", config=job_config())
    got = FeatureStore.open(tmp_path / "o" / "store" / "pool")
    ref = FeatureStore.open(job / "single" / "store" / "pool")
    assert nonfinite_ids(got) == [nan_id]
    rows = got.items.index[got.items["id"] == big_id].to_numpy()
    big, small = got.features(0, rows), ref.features(0, rows)
    assert np.abs(big).max() > 65504 and np.isfinite(big).all()
    np.testing.assert_allclose(big, small * 1e6, rtol=2e-3)  # float16 rounding of each
    assert not got.features(0, got.items.index[got.items["id"] == nan_id].to_numpy()).any()


def test_cli_extract_step_split_is_reused_by_score(job, tmp_path):
    """`extract --step-split loss` records the split in the store fingerprint, so `score` with
    the same options reuses the stores instead of failing on a mismatch."""
    import json

    args = ["--model", str(job / "model"), "--pool", str(job / "pool.jsonl"),
            "--target", str(job / "target.jsonl"), "--proj-dim", "64", "--step-split", "loss",
            "--out", str(tmp_path / "j")]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "trajinf", "extract", *args],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "j" / "store" / "pool" / "manifest.json").read_text())
    assert manifest["extraction"]["step_split"] == "loss"
    before = tree_bytes(tmp_path / "j" / "store")
    r = subprocess.run([sys.executable, "-m", "trajinf", "score", *args],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree_bytes(tmp_path / "j" / "store") == before  # reused, not re-extracted
