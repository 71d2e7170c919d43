"""The scoring job with ``scoring.preconditioner="kfac"``: factors saved under OUT/kfac, reused
on rerun, the scores they give, append, and the CLI option."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from trajinf.cli.main import app
from trajinf.data.trajectories import load_pool
from trajinf.data.write import write_pool
from trajinf.errors import TrajinfError
from trajinf.job.config import build_job_config
from trajinf.job.kfac import load_kfac, save_kfac
from trajinf.job.run import score_pool
from trajinf.scoring.scores import score_stores
from trajinf.store.feature_store import FeatureStore


def config(**kw):
    return build_job_config(
        proj_dim=64,
        scoring_preconditioner="kfac",
        shard_items=8,
        device="cpu",
        null_directions=4,
        baselines=False,
        **kw,
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory, make_tiny_job):
    d = make_tiny_job(tmp_path_factory.mktemp("kfacjob"), n_tasks=4)
    out = d / "out"
    res = score_pool(d / "model", d / "pool.jsonl", d / "target.jsonl", out, config=config())
    return d, out, res


def test_factors_saved_and_scores_match_library(job):
    d, out, res = job
    path = out / "kfac" / "ckpt-0.npz"
    assert path.is_file()
    factors, fp = load_kfac(path)
    assert len(fp) == 64 and factors
    for a, g in factors.values():
        assert a.shape == g.shape and a.shape[0] == a.shape[1]
        assert np.allclose(a, a.T) and np.all(np.linalg.eigvalsh(a) > -1e-9)
    pool, target = (
        FeatureStore.open(out / "store" / "pool"),
        FeatureStore.open(out / "store" / "target"),
    )
    ref = score_stores(pool, target, config().scoring, kfac=factors).trajectories
    got = res.trajectories.set_index("id").loc[ref["id"], "score"].to_numpy()
    np.testing.assert_allclose(got, ref["score"].to_numpy(), rtol=1e-6, atol=1e-7)
    plain = score_stores(pool, target, build_job_config(proj_dim=64).scoring).trajectories
    assert not np.allclose(plain["score"].to_numpy(), ref["score"].to_numpy())
    job_json = json.loads((out / "job.json").read_text())
    assert job_json["config"]["scoring"]["preconditioner"] == "kfac"
    assert "kfac_s" in job_json["timings"]
    assert res.trajectories["harmful"].notna().all()


def test_rerun_reuses_factors_and_recomputes_on_mismatch(job, monkeypatch):
    d, out, res = job
    path = out / "kfac" / "ckpt-0.npz"
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("factors recomputed although the stored ones match")

    monkeypatch.setattr("trajinf.gradients.kfac.kfac_factors", boom)
    again = score_pool(d / "model", d / "pool.jsonl", d / "target.jsonl", out, config=config())
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(again.trajectories, res.trajectories)
    monkeypatch.undo()

    # a stale fingerprint (another job's factors) is recomputed, not trusted
    factors, _ = load_kfac(path)
    save_kfac(path, factors, "0" * 64)
    score_pool(d / "model", d / "pool.jsonl", d / "target.jsonl", out, config=config())
    assert load_kfac(path)[1] != "0" * 64
    assert path.read_bytes() == before  # same inputs -> same factors, byte for byte


def test_append_uses_stored_factors(job, tmp_path):
    d, _out, _res = job
    trajs = load_pool(d / "pool.jsonl")
    write_pool(trajs[:5], tmp_path / "first.jsonl")
    out = tmp_path / "out"
    score_pool(d / "model", tmp_path / "first.jsonl", d / "target.jsonl", out, config=config())
    stored = (out / "kfac" / "ckpt-0.npz").read_bytes()
    res = score_pool(
        d / "model", d / "pool.jsonl", d / "target.jsonl", out, config=config(), append=True
    )
    assert (out / "kfac" / "ckpt-0.npz").read_bytes() == stored  # not recomputed on append
    # no remove_mean: directions do not depend on the pool, so every row (old and appended)
    # scores as the library does with the stored factors
    factors, _ = load_kfac(out / "kfac" / "ckpt-0.npz")
    pool = FeatureStore.open(out / "store" / "pool")
    target = FeatureStore.open(out / "store" / "target")
    ref = score_stores(pool, target, config().scoring, kfac=factors).trajectories
    got = res.trajectories.set_index("id").loc[ref["id"], "score"].to_numpy()
    assert len(ref) == len(trajs)
    np.testing.assert_allclose(got, ref["score"].to_numpy(), rtol=1e-6, atol=1e-7)

    (out / "kfac" / "ckpt-0.npz").unlink()
    extra = replace(trajs[0], id=trajs[0].id + "-new")
    write_pool([*trajs, extra], tmp_path / "more.jsonl")
    with pytest.raises(TrajinfError, match="no K-FAC factors"):
        score_pool(
            d / "model",
            tmp_path / "more.jsonl",
            d / "target.jsonl",
            out,
            config=config(),
            append=True,
        )


def test_build_job_config_validates():
    assert build_job_config(scoring_preconditioner="gram").scoring.preconditioner == "gram"
    with pytest.raises(TrajinfError, match="--scoring-preconditioner"):
        build_job_config(scoring_preconditioner="fisher")
    with pytest.raises(TrajinfError, match="factorized"):
        build_job_config(mode="less", scoring_preconditioner="kfac")


def test_cli_scoring_preconditioner_kfac(job, tmp_path):
    d, _out, _res = job
    out = tmp_path / "cli"
    args = ["score", "--model", str(d / "model"), "--pool", str(d / "pool.jsonl")]
    args += ["--target", str(d / "target.jsonl"), "--out", str(out), "--proj-dim", "64"]
    args += ["--scoring-preconditioner", "kfac", "--kfac-damping", "0.5"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / "kfac" / "ckpt-0.npz").is_file()
    job_json = json.loads((out / "job.json").read_text())
    assert job_json["config"]["scoring"]["preconditioner"] == "kfac"
    assert job_json["config"]["scoring"]["kfac_damping"] == 0.5
    assert len(pd.read_parquet(out / "scores.parquet")) == len(load_pool(d / "pool.jsonl"))


def test_null_with_identity_factors_is_the_plain_null(job):
    """The K-FAC null draws like the plain null and passes the draws through the same
    preconditioner as the targets; identity factors (damping 0) leave the draws unchanged, so
    the two nulls agree exactly."""
    from dataclasses import replace as dc_replace

    from trajinf.scoring.directions import directions_from_stores
    from trajinf.scoring.harm import null_scores

    _d, out, _res = job
    pool = FeatureStore.open(out / "store" / "pool")
    target = FeatureStore.open(out / "store" / "target")
    factors, _ = load_kfac(out / "kfac" / "ckpt-0.npz")
    eye = {n: (np.eye(len(a)), np.eye(len(g))) for n, (a, g) in factors.items()}
    sc = dc_replace(config().scoring, kfac_damping=0.0)
    dirs = directions_from_stores(pool, target, sc, kfac=eye)
    got = null_scores(pool, dirs, sc, n_directions=3, seed=5, kfac=[eye])
    assert got.info["preconditioned"] == "kfac"
    plain = dc_replace(sc, preconditioner="none")
    ref = null_scores(pool, dirs, plain, n_directions=3, seed=5).trajectories
    pd.testing.assert_frame_equal(got.trajectories, ref, rtol=1e-6)
    real = null_scores(pool, dirs, sc, n_directions=3, seed=5, kfac=[factors]).trajectories
    assert not np.allclose(real["score"], ref["score"])
    # from the target store, the null builds the same K-FAC directions itself
    again = null_scores(pool, target, sc, n_directions=3, seed=5, kfac=[eye]).trajectories
    pd.testing.assert_frame_equal(again, got.trajectories)


def test_top_k_with_kfac(job, tmp_path):
    d, _out, res = job
    top = score_pool(
        d / "model",
        d / "pool.jsonl",
        d / "target.jsonl",
        tmp_path / "top",
        config=config(),
        top_k=3,
    ).trajectories
    best = res.trajectories.sort_values("score", ascending=False, kind="stable").head(3)
    assert list(top["id"]) == list(best["id"])
    np.testing.assert_allclose(top["score"], best["score"], rtol=1e-6)
