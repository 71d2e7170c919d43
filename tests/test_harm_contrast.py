"""The contrast harm signal (issue 13): a constructed case whose answer is known, and the
batched per-token log-probabilities against a one-trajectory-at-a-time reference."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from trajinf.data.schema import Trajectory
from trajinf.data.tokenize import tokenize_pool
from trajinf.data.write import write_pool
from trajinf.job.config import build_job_config
from trajinf.job.contrast import (
    ContrastConfig,
    action_logprobs,
    step_minima,
    stratified_folds,
    tuned_copy,
)
from trajinf.job.run import score_pool
from trajinf.models.tiny import tiny_model, tokenizer_corpus, train_tokenizer
from trajinf.selection.export import select_to_file
from trajinf.train.sft import DEMO_TRAIN, train_sft

ROOMS = ["kitchen", "garden", "attic", "cellar", "porch", "hall", "study", "garage"]
DIRS = ["north", "south", "east", "west"]


def demo(i: int, *, obj: str = "coin", source: str = "expert", family: str = "stash") -> Trajectory:
    """Take the coin, walk to the box, put the coin in it. ``obj`` replaces the coin at the last
    step only: a plausible trajectory with one reversed decision (step 2)."""
    r0, r1, d = ROOMS[i % 8], ROOMS[(i + 3) % 8], DIRS[i % 4]
    msgs = [
        {"role": "system", "content": "Put the coin in the box."},
        {"role": "user", "content": f"You are in the {r0}. You see a coin and a map."},
        {"role": "assistant", "content": "take coin"},
        {"role": "user", "content": f"You take the coin. To the {d} is the {r1}."},
        {"role": "assistant", "content": f"move {d}"},
        {"role": "user", "content": f"You are in the {r1}. You see a box."},
        {"role": "assistant", "content": f"put {obj} in box"},
        {"role": "user", "content": f"You put the {obj} in the box."},
    ]
    return Trajectory(id=f"{source}-{obj}-{i}", messages=msgs, task_id=f"t{i}", source=source,
                      success=True, meta={"family": family})  # fmt: skip


def other(i: int) -> Trajectory:
    msgs = [
        {"role": "system", "content": "Count the apples."},
        {"role": "user", "content": f"There are {i % 5 + 2} apples."},
        {"role": "assistant", "content": f"answer {i % 5 + 2}"},
        {"role": "user", "content": "Correct."},
    ]
    return Trajectory(id=f"other-{i}", messages=msgs, task_id=f"o{i}", source="expert",
                      success=True, meta={"family": "count"})  # fmt: skip


def scored_case(d, warm: list[Trajectory], epochs: int, **job_options):
    """12 target demos, a pool of 12 good + 3 reversed + 6 other-skill trajectories, a tiny
    model warmed up on ``warm`` (one checkpoint), scored into ``d/scores``."""
    target = [demo(i, source="target") for i in range(12)]
    good = [demo(i) for i in range(12, 24)]
    reversed_ = [demo(i, obj="map", source="planted") for i in range(24, 27)]
    pool = good + reversed_ + [other(i) for i in range(6)]
    write_pool(pool, d / "pool.jsonl")
    write_pool(target, d / "target.jsonl")
    tok = train_tokenizer(tokenizer_corpus(pool + target), vocab_size=300)
    model = tiny_model(tok, hidden=32, layers=1, heads=2, seed=0)
    res = train_sft(model, tok, warm + [other(i) for i in range(6, 12)],
                    DEMO_TRAIN.__class__(epochs=epochs, lr=3e-3, seed=0, log_every=0),
                    checkpoint_dir=d / "warm", n_checkpoints=1)  # fmt: skip
    ckpt = res.checkpoints[-1]["path"]
    cfg = build_job_config(proj_dim=64, has_checkpoints=True, subtask_field="family",
                           **job_options)  # fmt: skip
    score_pool(ckpt, d / "pool.jsonl", d / "target.jsonl", d / "scores", checkpoints=[ckpt],
               config=cfg)  # fmt: skip
    return d, pool, good, reversed_, tok, ckpt, cfg


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    # the warm-up sees coin and map endings alike: it cannot tell them apart, the target can
    warm = [demo(i) for i in range(40, 46)] + [demo(i, obj="map") for i in range(46, 52)]
    out = scored_case(tmp_path_factory.mktemp("contrast"), warm, 4, harm_epochs=3, harm_lr=3e-3)
    return out[:-1]


def test_reversed_decision_is_flagged_at_that_step_and_clean_trajectories_are_not(case):
    d, pool, good, reversed_, _, _ = case
    scores = pd.read_parquet(d / "scores" / "scores.parquet").set_index("id")
    info = json.loads((d / "scores" / "job.json").read_text())["harm"]
    assert info["signal"] == "contrast" and info["n_calibration"] == 12
    bad = scores.loc[[t.id for t in reversed_]]
    assert bad["harmful"].all(), bad[["harm", "harmful"]]
    assert (bad["worst_step"] == 2).all()
    # the clean trajectories are exchangeable with the target: at alpha 0.05 at most 1 of 12
    assert scores.loc[[t.id for t in good], "harmful"].sum() <= 1
    # harm ranks every reversed trajectory above every clean one of the same skill
    assert bad["harm"].min() > scores.loc[[t.id for t in good], "harm"].max()


def test_repair_weights_only_the_reversed_step_zero(case, tmp_path):
    d, _, _, reversed_, _, _ = case
    out = tmp_path / "sel.jsonl"
    select_to_file(d / "scores", d / "pool.jsonl", out, fraction=1.0, repair=True)
    plan = pd.read_json(out.with_name("sel.repair.jsonl"), lines=True).set_index("id")
    rows = {json.loads(x)["id"]: json.loads(x) for x in out.read_text().splitlines()}
    for t in reversed_:
        assert plan.loc[t.id, "choice"] == "repaired" and list(plan.loc[t.id, "bad_steps"]) == [2]
        w = [m.get("weight", 1.0) for m in rows[t.id]["messages"] if m["role"] == "assistant"]
        assert w == [1.0, 1.0, 0.0]


def test_batched_action_logprobs_match_one_at_a_time_reference(case):
    _, pool, _, _, tok, ckpt = case
    from trajinf.models.checkpoints import load_model

    model, _ = load_model(ckpt)
    items = tokenize_pool(pool, tok)
    got = action_logprobs(model, items, tok.pad_token_id or 0, batch_tokens=200)
    model.eval()
    for it, g in zip(items, got, strict=True):
        ids = torch.tensor(np.asarray(it.input_ids))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        want = np.zeros(len(it.input_ids))
        for t in range(1, len(want)):
            if it.action_mask[t]:
                want[t] = float(logp[t - 1, it.input_ids[t]])
        np.testing.assert_allclose(g, want, atol=2e-5)


def test_step_minima_is_the_smallest_token_change_per_step():
    from trajinf.data.tokenize import TokenizedTrajectory

    it = TokenizedTrajectory(
        id="a", input_ids=np.arange(6), action_mask=np.array([0, 1, 1, 0, 1, 1], bool),
        step_ids=np.array([-1, 0, 0, 0, 1, 1]), n_steps=3,
    )  # fmt: skip
    before = [np.array([0, -1.0, -2.0, -9.0, -1.0, -1.0])]
    after = [np.array([0, -0.5, -3.0, 0.0, -1.5, -0.5])]
    v, owner, idx = step_minima([it], before, after)
    np.testing.assert_allclose(v[:2], [-1.0, -0.5])  # the non-action token (-9 -> 0) ignored
    assert np.isnan(v[2]) and list(owner) == [0, 0, 0] and list(idx) == [0, 1, 2]


def test_stratified_folds_deal_every_subtask_round_robin():
    f = stratified_folds(["a"] * 8 + ["b"] * 4 + ["c"], 4)
    assert sorted(np.bincount(f[:8])) == [2, 2, 2, 2]
    assert len(set(f[8:12])) == 4
    with pytest.raises(Exception, match="folds >= 2"):
        ContrastConfig(folds=1)


def test_tuning_is_deterministic(case):
    _, pool, _, _, tok, ckpt = case
    from trajinf.models.checkpoints import load_model

    model, _ = load_model(ckpt)
    items = tokenize_pool(pool[:4], tok)
    cfg = ContrastConfig(epochs=1, lr=1e-3)
    a = tuned_copy(model, tok, items, cfg)
    b = tuned_copy(model, tok, items, cfg)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lora_tuning_moves_only_adapters_and_leaves_the_reference_alone(case):
    from peft import PeftModel

    from trajinf.models.checkpoints import load_model

    _, pool, _, _, tok, ckpt = case
    model, _ = load_model(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    items = tokenize_pool(pool[:4], tok)
    tuned = tuned_copy(model, tok, items, ContrastConfig(epochs=2, lr=1e-2, lora=True))
    assert isinstance(tuned, PeftModel)
    for k, v in model.state_dict().items():  # the reference is untouched
        assert torch.equal(v, before[k]), k
    trained = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    pad = tok.pad_token_id or 0
    a = action_logprobs(model, items, pad)
    b = action_logprobs(tuned, items, pad)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) > 1e-3


def test_report_shows_the_flagged_trajectories_with_their_bad_step(case, tmp_path):
    from trajinf.report import write_score_report

    d, _, _, reversed_, _, _ = case
    html = write_score_report(d / "scores", d / "pool.jsonl", tmp_path / "r.html").read_text()
    assert "Flagged as harmful" in html
    for t in reversed_:
        assert t.id in html
    assert html.count("harm: bad step") >= 1 + len(reversed_)  # the legend and each bad step


def test_contrast_without_a_warmup_checkpoint_warns_and_says_so(case):
    from trajinf.data.trajectories import load_pool
    from trajinf.job.harm import NO_WARMUP_WARNING, job_model_harm

    d, _, _, _, tok, ckpt = case
    target = load_pool(d / "target.jsonl")[:4]
    pool = load_pool(d / "pool.jsonl")[:3]
    cfg = build_job_config(proj_dim=64, has_checkpoints=False, subtask_field="family",
                           harm_epochs=1, harm_folds=2)  # fmt: skip
    args = (tokenize_pool(pool, tok), target, tokenize_pool(target, tok), cfg)
    with pytest.warns(UserWarning, match="without a warm-up checkpoint"):
        res = job_model_harm(ckpt, [], *args)
    assert res.info["reference"] == "model (no warm-up checkpoint)"
    assert "--checkpoint" in NO_WARMUP_WARNING
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a checkpoint: no warning
        assert job_model_harm(ckpt, [ckpt], *args).info["reference"] == "checkpoint"


def test_harm_signal_none_skips_the_harm_step(case, tmp_path):
    d, _, _, _, _, ckpt = case
    cfg = build_job_config(proj_dim=64, has_checkpoints=True, subtask_field="family",
                           harm_signal="none")  # fmt: skip
    score_pool(ckpt, d / "pool.jsonl", d / "target.jsonl", tmp_path / "s", checkpoints=[ckpt],
               config=cfg)  # fmt: skip
    scores = pd.read_parquet(tmp_path / "s" / "scores.parquet")
    assert scores["harm"].isna().all() and not scores["harmful"].any()
    assert "harmful_null" in scores  # the random-direction null is still computed
    assert json.loads((tmp_path / "s" / "job.json").read_text())["harm"] is None
    assert not (tmp_path / "s" / "harm_steps.parquet").exists()
    from trajinf.report import write_score_report

    html = write_score_report(tmp_path / "s", d / "pool.jsonl", tmp_path / "r.html").read_text()
    assert "<html" in html.lower()


@pytest.fixture(scope="module")
def knowing(tmp_path_factory):
    """A warm-up that knows the skill (coin endings only): the logprob signal's case."""
    warm = [demo(i) for i in range(40, 52)]
    return scored_case(tmp_path_factory.mktemp("logprob"), warm, 6, harm_signal="logprob")


def test_logprob_signal_flags_the_step_a_knowing_reference_finds_implausible(knowing):
    d, pool, good, reversed_, tok, ckpt, _ = knowing
    scores = pd.read_parquet(d / "scores" / "scores.parquet").set_index("id")
    info = json.loads((d / "scores" / "job.json").read_text())["harm"]
    assert info["signal"] == "logprob" and info["n_calibration"] == 12
    assert info["reference"] == "checkpoint" and "contrast" not in info
    bad = scores.loc[[t.id for t in reversed_]]
    assert bad["harmful"].all(), bad[["harm", "harmful"]]
    assert (bad["worst_step"] == 2).all()
    assert scores.loc[[t.id for t in good], "harmful"].sum() <= 1
    assert bad["harm"].min() > scores.loc[[t.id for t in good], "harm"].max()
    # the step values are the reference's lowest action-token log-prob, read one at a time
    from trajinf.models.checkpoints import load_model
    from trajinf.train.sft import pad_id

    model, tk = load_model(ckpt)
    steps = pd.read_parquet(d / "scores" / "harm_steps.parquet")
    t = reversed_[0]
    (item,) = tokenize_pool([t], tk)
    (lp,) = action_logprobs(model, [item], pad_id(tk))
    am, sid = np.asarray(item.action_mask, bool), np.asarray(item.step_ids)
    want = [float(lp[am & (sid == k)].min()) for k in range(item.n_steps)]
    got = steps[steps["id"] == t.id].sort_values("step")["value"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_logprob_signal_appended_rows_use_the_stored_threshold(knowing, tmp_path):
    import shutil

    d, pool, good, reversed_, _, ckpt, cfg = knowing
    out = tmp_path / "scores"
    shutil.copytree(d / "scores", out)
    more = [demo(i) for i in range(60, 63)] + [demo(i, obj="map", source="planted")
                                               for i in range(63, 65)]  # fmt: skip
    write_pool(pool + more, tmp_path / "pool.jsonl")
    score_pool(ckpt, tmp_path / "pool.jsonl", d / "target.jsonl", out, checkpoints=[ckpt],
               config=cfg, append=True)  # fmt: skip
    scores = pd.read_parquet(out / "scores.parquet").set_index("id")
    before = json.loads((d / "scores" / "job.json").read_text())["harm"]["threshold"]
    after = json.loads((out / "job.json").read_text())["harm"]["threshold"]
    assert after == before
    assert scores.loc[[t.id for t in more[3:]], "harmful"].all()
    assert not scores.loc[[t.id for t in more[:3]], "harmful"].any()


def test_scope_leaves_uncovered_subtasks_unassessed_and_unflagged():
    """scope_harm against its definition: a flagged trajectory of a subtask the target does not
    show loses its flag and bad steps, keeps its harm score; covered None assesses all."""
    from trajinf.job.harm import scope_harm
    from trajinf.scoring.calibration import HarmResult

    traj = pd.DataFrame({"id": ["a", "b", "c"], "harm": [2.0, 3.0, 0.1],
                         "harmful": [True, True, False], "n_bad_steps": [1, 2, 0]})  # fmt: skip
    steps = pd.DataFrame({"id": ["a", "a", "b", "b", "c"], "step": [0, 1, 0, 1, 0],
                          "bad": [True, False, True, True, False]})  # fmt: skip
    res = HarmResult(traj, steps, {"threshold": 1.0})
    out = scope_harm(res, {"a": "stash", "b": "count", "c": "stash"}, ["stash"])
    t = out.trajectories.set_index("id")
    assert t["assessed"].tolist() == [True, False, True]
    assert t["harmful"].tolist() == [True, False, False]
    assert t["harm"].tolist() == [2.0, 3.0, 0.1] and t["n_bad_steps"].tolist() == [1, 0, 0]
    assert out.steps["bad"].tolist() == [True, False, False, False, False]
    assert out.info == {"threshold": 1.0, "scope": {"covered": ["stash"], "n_unassessed": 1}}
    every = scope_harm(res, None, None)
    assert every.trajectories["assessed"].all()
    assert every.trajectories["harmful"].tolist() == [True, True, False]
    assert every.info["scope"] == {"covered": None, "n_unassessed": 0}


@pytest.fixture(scope="module")
def scoped(tmp_path_factory):
    """The knowing case with --harm-scope subtask: the 6 other-skill ("count") trajectories are
    outside the target's subtask ("stash")."""
    warm = [demo(i) for i in range(40, 52)]
    return scored_case(tmp_path_factory.mktemp("scoped"), warm, 6, harm_signal="logprob",
                       harm_scope="subtask")  # fmt: skip


def test_subtask_scope_assesses_only_the_targets_subtasks(scoped, knowing, tmp_path):
    import shutil

    d, pool, good, reversed_, _, ckpt, cfg = scoped
    scores = pd.read_parquet(d / "scores" / "scores.parquet").set_index("id")
    others = [t.id for t in pool if t.meta["family"] == "count"]
    stash = [t.id for t in pool if t.meta["family"] == "stash"]
    assert not scores.loc[others, "assessed"].any() and not scores.loc[others, "harmful"].any()
    assert scores.loc[stash, "assessed"].all()
    # on the covered subtask the scope changes nothing: same harm and flags as scope "all"
    full = pd.read_parquet(knowing[0] / "scores" / "scores.parquet").set_index("id")
    pd.testing.assert_series_equal(scores.loc[stash, "harmful"], full.loc[stash, "harmful"])
    np.testing.assert_allclose(scores["harm"], full.loc[scores.index, "harm"])
    assert full["assessed"].all()
    assert scores.loc[[t.id for t in reversed_], "harmful"].all()
    info = json.loads((d / "scores" / "job.json").read_text())["harm"]
    assert info["scope"] == {"covered": ["stash"], "n_unassessed": 6}
    # appended rows keep the job's scope: a new other-skill row is not assessed
    out = tmp_path / "scores"
    shutil.copytree(d / "scores", out)
    more = [other(20), demo(70, obj="map", source="planted")]
    write_pool(pool + more, tmp_path / "pool.jsonl")
    score_pool(ckpt, tmp_path / "pool.jsonl", d / "target.jsonl", out, checkpoints=[ckpt],
               config=cfg, append=True)  # fmt: skip
    s2 = pd.read_parquet(out / "scores.parquet").set_index("id")
    assert s2.loc["other-20", "assessed"] == False  # noqa: E712
    assert s2.loc["other-20", "harmful"] == False  # noqa: E712
    assert s2.loc[more[1].id, "assessed"] and s2.loc[more[1].id, "harmful"]


def test_job_scope_warns_with_the_count_of_unassessed(caplog):
    from trajinf.job.harm import job_scope
    from trajinf.scoring.calibration import HarmResult

    pool = [demo(0), other(1), other(2)]
    res = HarmResult(pd.DataFrame({"id": [t.id for t in pool], "harm": [1.0, 2.0, 3.0],
                                   "harmful": [False, True, True]}),
                     pd.DataFrame({"id": [], "step": [], "bad": []}), {})  # fmt: skip
    cfg = build_job_config(subtask_field="family", harm_scope="subtask")
    with caplog.at_level("WARNING"):
        out = job_scope(res, pool, [demo(5, source="target")], cfg)
    assert out.trajectories["harmful"].tolist() == [False, False, False]
    assert "2 of 3 pool trajectories" in caplog.text and "stash" in caplog.text
    assert job_scope(res, pool, [demo(5)], build_job_config()).trajectories["harmful"].sum() == 2


@pytest.fixture(scope="module")
def wrong_warmup(knowing, tmp_path_factory):
    """A warm-up checkpoint of the knowing model trained hard on wrong demos (map endings)."""
    from trajinf.models.checkpoints import load_model

    _, _, _, _, tok, ckpt, _ = knowing
    model, _ = load_model(ckpt)
    wrong = [demo(i, obj="map") for i in range(80, 92)]
    res = train_sft(model, tok, wrong,
                    DEMO_TRAIN.__class__(epochs=20, lr=1e-2, seed=0, log_every=0),
                    checkpoint_dir=tmp_path_factory.mktemp("wrong-warm"), n_checkpoints=1)  # fmt: skip
    return res.checkpoints[-1]["path"]


def test_harm_reference_model_reads_the_model_when_the_warmup_learnt_the_wrong_decision(
    knowing, wrong_warmup
):
    """A warm-up trained on a pool of wrong demos no longer finds the reversed step
    implausible (its harm ranking is inverted); ``--harm-reference model`` reads the model the
    job was given instead."""
    from trajinf.data.trajectories import load_pool
    from trajinf.job.harm import job_model_harm

    d, _, good, reversed_, tok, ckpt, _ = knowing
    pool, target = load_pool(d / "pool.jsonl"), load_pool(d / "target.jsonl")
    args = (tokenize_pool(pool, tok), target, tokenize_pool(target, tok))
    by_ref = {}
    for ref in ("checkpoint", "model"):
        cfg = build_job_config(proj_dim=64, has_checkpoints=True, subtask_field="family",
                               harm_signal="logprob", harm_reference=ref)  # fmt: skip
        out = job_model_harm(ckpt, [wrong_warmup], *args, cfg)
        by_ref[ref] = (out.trajectories.set_index("id"), out.info["reference"])
    flags = {r: t.loc[[x.id for x in reversed_], "harmful"].sum() for r, (t, _) in by_ref.items()}
    harm = {r: (t.loc[[x.id for x in reversed_], "harm"], t.loc[[x.id for x in good], "harm"])
            for r, (t, _) in by_ref.items()}  # fmt: skip
    assert harm["model"][0].min() > harm["model"][1].max()
    assert harm["checkpoint"][0].max() < harm["checkpoint"][1].min()  # the warm-up is inverted
    assert by_ref["model"][1] == "model (--harm-reference model)"
    assert by_ref["checkpoint"][1] == "checkpoint"
    assert flags["model"] == len(reversed_) and flags["checkpoint"] < len(reversed_), flags
    assert by_ref["model"][0].loc[[x.id for x in good], "harmful"].sum() <= 1


def test_appended_rows_read_the_stored_harm_reference(knowing, wrong_warmup, tmp_path):
    """A job scored with --harm-reference model appends with the model too, even when the
    append's own options say checkpoint (the stored calibration came from the model)."""
    d, pool, _, _, _, ckpt, _ = knowing
    kw = dict(proj_dim=64, has_checkpoints=True, subtask_field="family", harm_signal="logprob")
    out = tmp_path / "scores"
    score_pool(ckpt, d / "pool.jsonl", d / "target.jsonl", out, checkpoints=[wrong_warmup],
               config=build_job_config(harm_reference="model", **kw))  # fmt: skip
    assert json.loads((out / "job.json").read_text())["harm"]["reference"].startswith("model")
    wrong = [demo(i, obj="map", source="planted") for i in range(63, 66)]
    right = [demo(i) for i in range(66, 69)]
    write_pool(pool + wrong + right, tmp_path / "pool.jsonl")
    score_pool(ckpt, tmp_path / "pool.jsonl", d / "target.jsonl", out,
               checkpoints=[wrong_warmup], config=build_job_config(**kw), append=True)  # fmt: skip
    scores = pd.read_parquet(out / "scores.parquet").set_index("id")
    assert scores.loc[[t.id for t in wrong], "harmful"].all()
    # read by the wrong warm-up, the right demos would be the implausible ones
    assert not scores.loc[[t.id for t in right], "harmful"].any()
