"""The scoring job's harm score, calibrated flag and repair selection end to end (issue 13)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from trajinf.data.write import write_pool
from trajinf.envs import make_env
from trajinf.envs.policies import ExpertPolicy, NoisyExpertPolicy, PlantedHarmfulPolicy
from trajinf.envs.rollout import rollout
from trajinf.errors import TrajinfError
from trajinf.job.config import build_job_config
from trajinf.job.run import score_pool
from trajinf.models.tiny import tiny_model, tokenizer_corpus, train_tokenizer
from trajinf.selection.export import select_to_file
from trajinf.store.feature_store import FeatureStore
from trajinf.train.sft import DEMO_TRAIN, train_sft


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("harmjob")
    env = make_env("builtin")
    tasks = env.tasks("train", 14, 1)
    roll = lambda ts, pol, src, **kw: rollout(env, ts, pol, source=src, with_tools=False, **kw)  # noqa: E731
    target = roll(tasks[:6], ExpertPolicy(), "target")
    pool = (
        roll(tasks[6:], ExpertPolicy(), "expert")
        + roll(tasks[6:], NoisyExpertPolicy(0.5), "noisy")
        + roll(tasks[6:10], PlantedHarmfulPolicy(), "expert", id_prefix="p")
    )
    extra = roll(tasks[10:], NoisyExpertPolicy(0.5), "noisy", id_prefix="late", seed=3)
    write_pool(pool, d / "pool.jsonl")
    write_pool(pool + extra, d / "pool_more.jsonl")
    write_pool(target, d / "target.jsonl")
    tok = train_tokenizer(tokenizer_corpus(pool + target + extra), vocab_size=400)
    model = tiny_model(tok, hidden=32, layers=1, heads=2, seed=0)
    res = train_sft(model, tok, pool[:10], replace(DEMO_TRAIN, epochs=2, seed=0),
                    checkpoint_dir=d / "warm", n_checkpoints=2)  # fmt: skip
    ckpts = [c["path"] for c in res.checkpoints]
    cfg = build_job_config(proj_dim=128, has_checkpoints=True, subtask_field="family",
                           harm_signal="surprise")  # fmt: skip
    out = score_pool(ckpts[-1], d / "pool.jsonl", d / "target.jsonl", d / "scores",
                     checkpoints=ckpts, config=cfg)  # fmt: skip
    return d, out, pool, extra, ckpts, cfg


def test_job_writes_harm_columns_steps_and_a_pool_space_calibration_store(job):
    d, _, pool, _, _, _ = job
    scores = pd.read_parquet(d / "scores" / "scores.parquet")
    info = json.loads((d / "scores" / "job.json").read_text())["harm"]
    assert {"harm", "harm_p", "worst_step", "n_bad_steps", "harmful", "harmful_null"} <= set(
        scores.columns
    )
    assert info["signal"] == "surprise" and info["n_calibration"] == 6
    np.testing.assert_array_equal(scores["harmful"], scores["harm"] > info["threshold"])
    # factored Adam: the target was extracted again with the pool's preconditioner
    calib = FeatureStore.open(d / "scores" / "calib" / "store" / "pool")
    assert calib.manifest["extraction"]["preconditioner"] == "factored_adam"
    assert sorted(calib.items.query("step == -1")["id"]) == sorted(
        FeatureStore.open(d / "scores" / "store" / "target").items.query("step == -1")["id"]
    )
    # reference: value = minus the lr-weighted mean log step norm; drop = median(others) - value
    steps = pd.read_parquet(d / "scores" / "harm_steps.parquet")
    store = FeatureStore.open(d / "scores" / "store" / "pool")
    it = store.items.query("step >= 0")
    lr = np.asarray(store.learning_rates)
    logn = np.stack([np.log(np.linalg.norm(store.features(c, it["row"].to_numpy()), axis=1))
                     for c in range(store.n_checkpoints)])  # fmt: skip
    ref = pd.DataFrame({"id": it["id"], "step": it["step"], "v": -(lr @ logn) / lr.sum()})
    m = steps.merge(ref, on=["id", "step"])
    assert len(m) == len(steps) == sum(len(t.steps()) for t in pool)
    np.testing.assert_allclose(m["value"], m["v"], rtol=1e-5, atol=1e-6)
    for i, g in m.groupby("id"):
        v = g["v"].to_numpy()
        for j in range(len(v)):
            want = -v[j] if len(v) == 1 else np.median(np.delete(v, j)) - v[j]
            assert g["drop"].iloc[j] == pytest.approx(want, abs=1e-5)
        assert scores.set_index("id").loc[i, "harm"] == pytest.approx(g["drop"].max(), abs=1e-6)


def test_select_repair_writes_weights_and_choices(job, tmp_path):
    d, _, pool, _, _, _ = job
    out = tmp_path / "sel.jsonl"
    sel = select_to_file(d / "scores", d / "pool.jsonl", out, fraction=0.5, repair=True)
    plan = pd.read_json(out.with_name("sel.repair.jsonl"), lines=True).set_index("id")
    assert len(plan) == len(pool) and set(plan["choice"]) <= {"kept", "repaired", "dropped"}
    assert not set(sel.ids) & set(plan.index[plan["choice"] == "dropped"])
    rows = {json.loads(x)["id"]: json.loads(x) for x in out.read_text().splitlines()}
    assert list(rows) == sel.ids
    for i in sel.ids:
        w = [m.get("weight", 1.0) for m in rows[i]["messages"] if m["role"] == "assistant"]
        bad = plan.loc[i, "bad_steps"] if plan.loc[i, "choice"] == "repaired" else []
        assert [k for k, x in enumerate(w) if x == 0.0] == sorted(bad)
    with pytest.raises(TrajinfError, match="--repair"):
        select_to_file(d / "scores", d / "pool.jsonl", out, fraction=0.5, repair=True,
                       step_weights=True)  # fmt: skip


def test_append_flags_new_rows_at_the_stored_calibration(job):
    d, _, pool, extra, ckpts, cfg = job
    before = json.loads((d / "scores" / "job.json").read_text())["harm"]
    score_pool(ckpts[-1], d / "pool_more.jsonl", d / "target.jsonl", d / "scores",
               checkpoints=ckpts, config=cfg, append=True)  # fmt: skip
    scores = pd.read_parquet(d / "scores" / "scores.parquet").set_index("id")
    new = scores.loc[[t.id for t in extra]]
    assert new["harm"].notna().all()
    np.testing.assert_array_equal(new["harmful"], new["harm"] > before["threshold"])
    steps = pd.read_parquet(d / "scores" / "harm_steps.parquet")
    assert set(steps["id"]) == {t.id for t in pool + extra}


def test_report_lists_flagged_trajectories_with_their_bad_steps(job, tmp_path):
    import shutil

    from trajinf.report import harm_section, write_score_report

    d, _, pool, _, _, _ = job
    text = write_score_report(d / "scores", d / "pool.jsonl", tmp_path / "r.html").read_text()
    assert "Flagged as harmful" in text
    # a constructed flag: trajectory 0 flagged with its step 1 bad
    shutil.copy(d / "scores" / "job.json", tmp_path / "job.json")
    scores = pd.read_parquet(d / "scores" / "scores.parquet")
    steps = pd.read_parquet(d / "scores" / "step_scores.parquet")
    hs = pd.read_parquet(d / "scores" / "harm_steps.parquet")
    first = pool[0].id
    scores["harmful"] = scores["id"] == first
    hs["bad"] = (hs["id"] == first) & (hs["step"] == 1)
    hs.to_parquet(tmp_path / "harm_steps.parquet")
    html = "".join(harm_section(tmp_path, scores, steps, pool))
    assert first in html and html.count("harm: bad step") == 2  # the legend and step 1
    assert re.search(r"step 1 \[[^\]]*\] <span class='badtag'>harm: bad step", html)


def test_cli_select_repair(job, tmp_path):
    from typer.testing import CliRunner

    from trajinf.cli.main import app

    d = job[0]
    out = tmp_path / "cli.jsonl"
    ids = set(pd.read_parquet(d / "scores" / "scores.parquet")["id"])
    pool = d / ("pool_more.jsonl" if any(i.startswith("late") for i in ids) else "pool.jsonl")
    args = ["select", "--scores", str(d / "scores"), "--pool", str(pool),
            "--fraction", "0.5", "--repair", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "kept" in r.output and "repaired" in r.output and "dropped" in r.output
    assert out.exists() and out.with_name("cli.repair.jsonl").exists()
    bad = CliRunner().invoke(app, [*args[:-2], "--step-weights", "--out", str(out)])
    # the entry point turns a TrajinfError into a one-line error (exit 2)
    assert isinstance(bad.exception, TrajinfError) and "--repair" in str(bad.exception)


def test_influence_selection_drops_flagged_trajectories_by_default(job, tmp_path):
    """Default `trajinf select` (influence, no repair): the flagged trajectories are dropped;
    --keep-harmful keeps them, the baselines keep their plain meaning, a job without a harm
    step drops nothing."""
    import shutil

    d, _, pool, extra, _, _ = job
    sd = tmp_path / "scores"
    shutil.copytree(d / "scores", sd)  # (the append test may have added `extra` to it)
    scores = pd.read_parquet(sd / "scores.parquet")
    scored = [t for t in pool + extra if t.id in set(scores["id"])]
    write_pool(scored, tmp_path / "pool.jsonl")
    top = scores.sort_values("score", ascending=False)["id"].iloc[0]  # the influence top-1
    scores["harmful"] = scores["id"] == top
    scores.to_parquet(sd / "scores.parquet")
    n, pool_path = len(scored), tmp_path / "pool.jsonl"
    sel = select_to_file(sd, pool_path, tmp_path / "a.jsonl", fraction=2 / n)
    assert top not in sel.ids and len(sel.ids) == 2
    assert sel.info["drop_harmful"] == {"applied": True, "default": True, "dropped": 1}
    kept = select_to_file(sd, pool_path, tmp_path / "b.jsonl", fraction=2 / n,
                          drop_harmful=False)  # fmt: skip
    assert kept.ids[0] == top and kept.info["drop_harmful"]["applied"] is False
    assert kept.ids[1] == sel.ids[0]  # the same ranking, one place down
    rnd = select_to_file(sd, pool_path, tmp_path / "c.jsonl", fraction=1.0,
                         method="random")  # fmt: skip
    assert top in rnd.ids and rnd.info["drop_harmful"]["applied"] is False
    scores["harmful"] = np.nan  # a job run with --harm-signal none
    scores.to_parquet(sd / "scores.parquet")
    none = select_to_file(sd, pool_path, tmp_path / "d.jsonl", fraction=2 / n)
    assert none.ids[0] == top and none.info["drop_harmful"]["applied"] is False
