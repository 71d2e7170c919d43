"""The flood: cached agent, selection methods against slow references, rounds through the CLI."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from trajinf.bench.agents import AgentConfig, cached_agent
from trajinf.bench.flood import (
    FLOOD_METHODS,
    FloodConfig,
    FloodScores,
    flood_summary,
    pass_rates,
    select_flood,
)
from trajinf.bench.rounds import summarize_rounds
from trajinf.data.schema import Trajectory
from trajinf.errors import TrajinfError


def _traj(task: str, k: int, success: bool, source: str = "self") -> Trajectory:
    msgs = [
        {"role": "user", "content": f"goal {task}"},
        {"role": "assistant", "content": "go" if success else "stay"},
        {"role": "user", "content": "done" if success else "nothing"},
    ]
    return Trajectory(
        id=f"{task}-{k}", messages=msgs, task_id=task, source=source, success=success,
        meta={"family": "f"},
    )  # fmt: skip


def _pool() -> list[Trajectory]:
    # task a: solved 6/8 (easy), b: 1/8 (rare), c: 0/8, d: 8/8
    out = []
    for task, wins in (("a", 6), ("b", 1), ("c", 0), ("d", 8)):
        out += [_traj(task, k, k < wins) for k in range(8)]
    return out


def test_pass_rates_and_summary():
    pool = _pool() + [_traj("e", 0, True, source="expert")]
    assert pass_rates(pool) == {"a": 0.75, "b": 0.125, "c": 0.0, "d": 1.0}
    s = flood_summary(pool)
    assert s["n"] == 33 and math.isclose(s["self_share"], 32 / 33)
    assert math.isclose(s["success_rate"], 15 / 32)
    assert (s["tasks_mixed"], s["tasks_all_fail"], s["tasks_all_success"]) == (2, 1, 1)


def test_baseline_selections_against_definitions():
    pool = _pool()
    by = {t.id: t for t in pool}
    ids, _, info = select_flood("rs", pool, budget=0.1, seed=0)
    assert sorted(ids) == sorted(t.id for t in pool if t.success)
    ids, _, info = select_flood("rs-budget", pool, budget=0.1, seed=0)
    assert len(ids) == info["k"] == math.ceil(0.1 * 32) and all(by[i].success for i in ids)
    ids, _, _ = select_flood("dapo", pool, budget=0.5, seed=0)
    assert {by[i].task_id for i in ids} <= {"a", "b"}  # all-fail c, all-success d dropped
    ids, _, _ = select_flood("random", pool, budget=0.25, seed=3)
    assert len(ids) == 8 and len(set(ids)) == 8
    assert select_flood("base", pool, budget=0.1, seed=0)[0] == []
    assert len(select_flood("full", pool, budget=0.1, seed=0)[0]) == 32


def test_rare_weighting_prefers_rarely_solved_tasks():
    """rs-rare draws successes with weight 1 / pass rate: the one success of task b (rate 1/8)
    weighs 8, a success of d (rate 1) weighs 1: over draws b's is picked far more often."""
    pool = _pool()
    hits = {"b": 0, "d": 0}
    for seed in range(200):
        ids, _, _ = select_flood("rs-rare", pool, budget=0.1, seed=seed)  # k = 4 of 15
        hits["b"] += "b-0" in ids
        hits["d"] += "d-0" in ids
    # reference: probability that a weight-8 item is in 4 weighted draws is far above 4/15
    assert hits["b"] > 0.6 * 200 and hits["d"] < 0.4 * 200


def _scored(pool, values: dict[str, float]) -> FloodScores:
    s = pd.DataFrame({"id": [t.id for t in pool], "score": [values[t.id] for t in pool]})
    st = pd.DataFrame({"id": [t.id for t in pool], "step": 0, "score": s["score"]})
    return FloodScores({"less": s, "smf": s, "adv": s}, {"less": st, "smf": st, "adv": st}, None, 1)


def test_influence_selections_against_sorting():
    pool = _pool()
    rng = np.random.default_rng(0)
    values = {t.id: float(rng.normal()) for t in pool}
    scored = _scored(pool, values)
    k = math.ceil(0.25 * len(pool))
    ids, _, _ = select_flood("inf-adv", pool, budget=0.25, seed=0, scored=scored)
    assert ids == sorted(values, key=lambda i: -values[i])[:k]
    ids, _, _ = select_flood("inf-adv|succ", pool, budget=0.25, seed=0, scored=scored)
    succ = [t.id for t in pool if t.success]
    assert ids == sorted(succ, key=lambda i: -values[i])[:k]
    # succ*rare: mean of the score's percentile rank and the (negated) pass rate's, among
    # the successes; b's only success ranks first on rarity
    ids, _, _ = select_flood("inf-adv|succ*rare", pool, budget=0.25, seed=0, scored=scored)
    assert len(ids) == k and all(i in succ for i in ids)
    s_rank = pd.Series({i: values[i] for i in succ}).rank(pct=True)
    rates = pass_rates(pool)
    r_rank = pd.Series({i: -rates[i.split("-")[0]] for i in succ}).rank(pct=True)
    ref = ((s_rank + r_rank) / 2).sort_values(ascending=False, kind="stable")
    assert ids == list(ref.index[:k])


def test_rs_filters_drop_the_lowest_quarter_or_the_flagged_successes():
    pool = _pool()
    rng = np.random.default_rng(1)
    values = {t.id: float(rng.normal()) for t in pool}
    scored = _scored(pool, values)
    succ = [t.id for t in pool if t.success]
    ids, _, info = select_flood("rs-inf", pool, budget=0.1, seed=0, scored=scored)
    worst = sorted(succ, key=lambda i: values[i])[: len(succ) // 4]
    assert ids == [i for i in succ if i not in worst] and info["n_dropped_successes"] == len(worst)
    flagged = set(succ[:2]) | {t.id for t in pool if not t.success}
    scored.scores["less"]["harmful"] = scored.scores["less"]["id"].isin(flagged)
    ids, _, info = select_flood("rs-harm", pool, budget=0.1, seed=0, scored=scored)
    assert ids == succ[2:] and info["n_flagged_successes"] == 2
    pool[0].meta["planted"] = True  # a success for the wrong reason: the oracle drops it
    ids, _, _ = select_flood("rs-oracle", pool, budget=0.1, seed=0)
    assert ids == [t.id for t in pool if t.success and not t.meta.get("planted")]


def _two_step(task: str, k: int, actions: tuple[str, str], success: bool) -> Trajectory:
    msgs = [{"role": "user", "content": f"goal {task}"}]
    for a in actions:
        msgs += [{"role": "assistant", "content": a}, {"role": "user", "content": "ok"}]
    return Trajectory(id=f"{task}-{k}", messages=msgs, task_id=task, source="self",
                      success=success, meta={"family": "f"})  # fmt: skip


def test_step_weighted_rs_zeroes_the_steps_against_the_evidence():
    """rs*inf: every success, weight 0 on its steps with a negative inf-adv step score (NaN: no
    evidence, 1), dropped when no step is left; rs*branch: weight 1 only on steps with positive
    branch credit -- the choice at a branch point whose continuations succeeded more often."""
    # task a: 'x' then 'go' succeeds (2 of 2), 'x' then 'stay' fails (2 of 2); task d: always
    # 'x', 'go', all successful (no branch, no credit)
    pool = [_two_step("a", k, ("x", "go" if k < 2 else "stay"), k < 2) for k in range(4)]
    pool += [_two_step("d", k, ("x", "go"), True) for k in range(2)]
    st = pd.DataFrame({
        "id": ["a-0", "a-0", "a-1", "a-1", "d-0", "d-0", "d-1", "d-1"],
        "step": [0, 1, 0, 1, 0, 1, 0, 1],
        "score": [-0.5, 0.3, -0.1, -0.2, np.nan, 0.4, 0.2, 0.1],
    })  # fmt: skip
    scores = pd.DataFrame({"id": [t.id for t in pool], "score": 0.0})
    scored = FloodScores({"adv": scores}, {"adv": st}, None, 1)
    ids, w, info = select_flood("rs*inf", pool, budget=0.1, seed=0, scored=scored)
    assert ids == ["a-0", "d-0", "d-1"] and info["n_dropped_successes"] == 1  # a-1: no step left
    assert w == {"a-0": [0.0, 1.0], "d-0": [1.0, 1.0], "d-1": [1.0, 1.0]}
    ids, w, info = select_flood("rs*branch", pool, budget=0.1, seed=0)
    # a's shared first step 'x' has no credit, 'go' beats 'stay'; d has one outcome: no credit
    assert ids == ["a-0", "a-1"] and w == {"a-0": [0.0, 1.0], "a-1": [0.0, 1.0]}
    assert math.isclose(info["step_weight_share"], 2 / 8)
    nan = FloodScores({"adv": scores}, {"adv": st.assign(score=np.nan)}, None, 1)
    ids, w, info = select_flood("rs*inf", pool, budget=0.1, seed=0, scored=nan)
    assert w is None and ids == [t.id for t in pool if t.success] and "fallback" in info


def test_shortest_successes_per_task():
    """rs-short keeps, per task, the successes with the fewest steps (ties all kept)."""
    pool = [_two_step("a", 0, ("x", "go"), True), _two_step("d", 0, ("go", "x"), True)]
    pool += [_traj("a", 1, True), _traj("a", 2, True), _traj("a", 3, False)]  # 1 step each
    ids, w, _ = select_flood("rs-short", pool, budget=0.1, seed=0)
    assert ids == ["d-0", "a-1", "a-2"] and w is None


def test_length_penalty_turns_all_success_groups_into_an_outcome_signal(monkeypatch):
    """With a length penalty a rollout's reward is success - penalty x steps: one task's
    successes of different lengths now differ in advantage (the shorter ahead), where success
    alone gives every rollout of an all-success group advantage 0."""
    import trajinf.envs.model_policy as mp
    import trajinf.envs.rollout as ro
    from trajinf.bench.flood import roll_flood
    from trajinf.scoring.directions import group_advantages

    made = [_two_step("d", 0, ("x", "go"), True), _traj("d", 1, True), _traj("d", 2, False)]
    monkeypatch.setattr(mp, "ModelPolicy", lambda *a, **k: None)
    monkeypatch.setattr(ro, "rollout", lambda *a, **k: [Trajectory(**vars(t)) for t in made])
    plain = roll_flood(None, None, None, [], k=3, temperature=1.0, seed=0, prefix="r1")
    assert [t.reward for t in plain] == [t.reward for t in made]
    out = roll_flood(None, None, None, [], k=3, temperature=1.0, seed=0, prefix="r1",
                     length_penalty=0.01)  # fmt: skip
    assert [t.reward for t in out] == pytest.approx([0.98, 0.99, -0.01])
    assert [t.success for t in out] == [True, True, False]
    adv = group_advantages([t.reward for t in out[:2]], ["d", "d"])
    assert adv[1] > 0 > adv[0]
    assert list(group_advantages([1.0, 1.0], ["d", "d"])) == [0.0, 0.0]


def test_per_task_influence_spreads_over_tasks():
    """inf-adv|succ/task: reference by loops: repeatedly take each task's best remaining
    success, tasks in order of that success's score."""
    pool = _pool()
    rng = np.random.default_rng(1)
    values = {t.id: float(rng.normal()) for t in pool}
    scored = _scored(pool, values)
    for budget in (0.1, 0.25, 0.5):
        ids, _, info = select_flood("inf-adv|succ/task", pool, budget=budget, seed=0, scored=scored)
        left = {}
        for t in pool:
            if t.success:
                left.setdefault(t.task_id, []).append(t.id)
        ref = []
        while any(left.values()):
            best = [max(v, key=lambda i: values[i]) for v in left.values() if v]
            for i in sorted(best, key=lambda i: -values[i]):
                ref.append(i)
                left[i.split("-")[0]].remove(i)
        assert ids == ref[: info["k"]]
    ids, _, _ = select_flood("inf-adv|succ/task", pool, budget=0.1, seed=0, scored=scored)
    assert {i.split("-")[0] for i in ids} == {"a", "b", "d"}  # every solved task once first


def test_rs_plus_inf_keeps_every_success_and_doubles_the_per_task_pick():
    pool = _pool()
    rng = np.random.default_rng(2)
    scored = _scored(pool, {t.id: float(rng.normal()) for t in pool})
    pick, _, _ = select_flood("inf-adv|succ/task", pool, budget=0.25, seed=0, scored=scored)
    ids, weights, info = select_flood("rs+inf", pool, budget=0.25, seed=0, scored=scored)
    assert ids == [t.id for t in pool if t.success]  # rs, in pool order
    assert info["n_weighted_twice"] == len(pick) > 0
    for t in pool:
        if t.success:
            w = 2.0 if t.id in pick else 1.0
            assert weights[t.id] == [w] * len(t.steps())


def test_no_outcome_direction_falls_back_to_random():
    pool = [_traj("a", k, False) for k in range(8)]
    s = pd.DataFrame({"id": [t.id for t in pool], "score": np.nan})
    scored = FloodScores({"adv": s}, {"adv": s.assign(step=0)}, None, 0)
    ids, _, info = select_flood("inf-adv", pool, budget=0.25, seed=0, scored=scored)
    assert len(ids) == 2 and "fallback" in info
    pool[3].success = True  # rs+inf falls back to plain rs, not to random
    ids, weights, info = select_flood("rs+inf", pool, budget=0.25, seed=0, scored=scored)
    assert ids == [pool[3].id] and weights is None and info["fallback"].endswith("rs")


def test_harm_step_only_when_rs_harm_reads_it():
    assert not FloodConfig(methods=("rs", "inf-adv")).needs_harm
    assert FloodConfig(methods=("rs", "rs-harm")).needs_harm


def test_config_rejects_bad_fields():
    with pytest.raises(TrajinfError, match="unknown method"):
        FloodConfig(methods=("rs", "nope"))
    with pytest.raises(TrajinfError, match="'k'"):
        FloodConfig(k=1)
    assert set(FloodConfig().methods) <= set(FLOOD_METHODS)


def test_summarize_rounds_paired_against_rs():
    rows = []
    for seed in range(3):
        for m, base in (("rs", 0.3), ("inf-adv", 0.4)):
            rows.append(
                dict(method=m, seed=seed, round=1, success=base + 0.01 * seed * (m == "rs"),
                     expansion=base / 2, n_selected=4, selected_success=1.0, cost_epochs=0.5)
            )  # fmt: skip
    s = summarize_rounds(rows)["1"]
    assert math.isclose(s["methods"]["inf-adv"]["success_mean"], 0.4)
    t = s["paired_vs_rs"]["inf-adv vs rs"]
    assert math.isclose(t["mean_diff"], 0.1 - 0.01) and t["p_value"] < 0.05


def test_agent_cache_builds_once_and_atomically(tmp_path, monkeypatch):
    cfg = AgentConfig(n_other_tasks=4, n_target_demos=1, epochs=1, n_eval_tasks=4)
    calls = []
    import trajinf.bench.agents as agents

    real = agents.build_agent

    def counting(config, out, **kw):
        calls.append(out)
        assert not out.name == config.fingerprint()  # built under a temporary name
        return real(config, out, **kw)

    monkeypatch.setattr(agents, "build_agent", counting)
    orphan = tmp_path / f"{cfg.fingerprint()}.tmp-999999999"  # a killed build's leftovers
    orphan.mkdir()
    d1, info1 = cached_agent(cfg, root=tmp_path, log=lambda s: None)
    d2, info2 = cached_agent(cfg, root=tmp_path, log=lambda s: None)
    assert d1 == d2 == tmp_path / cfg.fingerprint() and len(calls) == 1
    assert info1 == info2 and 0.0 <= info1["target_success"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [cfg.fingerprint()]  # no temp left
    assert (d1 / "config.json").exists() and json.loads((d1 / "agent.json").read_text())
    assert AgentConfig(epochs=2).fingerprint() != AgentConfig(epochs=3).fingerprint()


def test_agent_cache_removes_a_failed_build(tmp_path, monkeypatch):
    import trajinf.bench.agents as agents

    def boom(config, out, **kw):
        (out / "partial").write_text("x")
        raise RuntimeError("killed")

    monkeypatch.setattr(agents, "build_agent", boom)
    with pytest.raises(RuntimeError):
        cached_agent(AgentConfig(), root=tmp_path, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_flood_quick_through_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from trajinf.cli.main import app

    monkeypatch.setenv("TRAJINF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "b"
    args = ["bench", "--scenarios", "flood", "--rounds", "2", "--quick", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "flood" / "flood.json").read_text())["envs"]["builtin"]
    rows = res["rows"]
    cfg = res["config"]
    assert {(r["method"], r["round"]) for r in rows} == {
        (m, k) for m in cfg["methods"] for k in (1, 2)
    }
    for r in rows:
        assert r["pool"]["self_share"] >= 0.9 and r["pool"]["n"] >= 8 * r["pool"]["tasks"]
        assert 0.0 <= r["success"] <= 1.0
    base = [r for r in rows if r["method"] == "base"]
    assert base[0]["success"] == base[1]["success"]  # no fine-tuning: the agent stays
    rs1 = next(r for r in rows if r["method"] == "rs" and r["round"] == 1)
    assert rs1["n_selected"] == round(rs1["pool"]["success_rate"] * rs1["pool"]["n"])
    # rs+ee: the budget's successes plus as many early-experience examples of their states;
    # a round whose agent no longer succeeds anywhere (round 2 on some CPUs) picks nothing
    ee = sorted((r for r in rows if r["method"] == "rs+ee"), key=lambda r: r["round"])
    assert ee[0]["pool"]["success_rate"] > 0  # round 1 is the base agent's pool: it succeeds
    for r in ee:
        if r["pool"]["success_rate"] == 0:
            assert r["n_selected"] == r["n_early"] == 0
            continue
        assert r["selected_success"] == 1.0 and 0 < r["n_early"] <= r["n_selected"]
        sel = out / "flood" / "builtin" / "seed0" / "rs+ee" / f"selection-r{r['round']}.jsonl"
        ids = [json.loads(x)["id"] for x in sel.read_text().splitlines()]
        assert sum(i.startswith("ee-") for i in ids) == r["n_early"]
    assert (out / "flood" / "flood.html").read_text().count("<polyline") == len(cfg["methods"])
    # no rs-harm in the slice: the scoring skipped the harm step (no harm score, no flag)
    sdir = out / "flood" / "builtin" / "seed0" / "r1" / "scores"
    assert json.loads((sdir / "flood_scores.json").read_text())["harm"] is False
    less = pd.read_parquet(sdir / "scores_less.parquet")
    assert less["harm"].isna().all() and not less["harmful"].any()
    # resumable: a second run finds every row done and rebuilds nothing
    before = (out / "flood" / "builtin" / "rounds.jsonl").read_text()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / "flood" / "builtin" / "rounds.jsonl").read_text() == before
    assert os.path.isdir(tmp_path / "cache" / "agents")


def test_report_escapes_method_names_and_plots_each_method():
    from trajinf.bench.flood_report import flood_markdown, round_plot_svg

    rows = []
    for seed in range(2):
        for m in ("rs", "inf-adv|succ"):
            for rnd in (1, 2):
                rows.append(
                    dict(method=m, seed=seed, round=rnd, success=0.1 * rnd + 0.05 * seed,
                         expansion=0.0, n_selected=3, selected_success=1.0, cost_epochs=0.2)
                )  # fmt: skip
    res = {
        "env": "builtin", "summary": summarize_rounds(rows), "n_test": 10, "n_base_failed": 7,
        "target_families": ["repair"], "runtime_s": 60.0,
        "agent": {"fingerprint": "abc", "test_success": 0.3},
    }  # fmt: skip
    md = flood_markdown(res)
    table = [line for line in md.splitlines() if line.startswith("| inf-adv")]
    head = md.splitlines()[2]
    assert len(table) == 1 and table[0].count(" | ") == head.count(" | ")  # | escaped
    assert "0.125 ± 0.035" in md  # round 1 of both methods: 0.1 and 0.15 over 2 seeds
    assert "expansion r1 | expansion r2" in head
    svg = round_plot_svg(res)
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 4
    one = {**res, "summary": summarize_rounds([r for r in rows if r["round"] == 1])}
    head1 = flood_markdown(one).splitlines()[2]
    assert head1.count("expansion r1") == 1 and "expansion r2" not in head1  # no twin column


@pytest.fixture(scope="module")
def agent_cache(tmp_path_factory):
    """One agent cache for this module's run_flood tests (the quick agent is built once)."""
    return tmp_path_factory.mktemp("agent-cache")


@pytest.mark.slow
def test_planted_successes_join_the_flood_and_the_oracle_drops_them(
    tmp_path, monkeypatch, agent_cache
):
    from dataclasses import replace

    from trajinf.bench.flood import flood_preset
    from trajinf.bench.rounds import run_flood

    monkeypatch.setenv("TRAJINF_CACHE", str(agent_cache))
    cfg = replace(flood_preset("builtin", quick=True), rounds=1, planted=4,
                  methods=("rs", "rs-oracle"))  # fmt: skip
    res = run_flood(cfg, tmp_path / "f", log=lambda *a: None)
    rows = {r["method"]: r for r in res["rows"]}
    pool = [json.loads(x) for x in (tmp_path / "f" / "seed0" / "r1" / "pool.jsonl").open()]
    planted = [p for p in pool if p.get("meta", {}).get("planted")]
    # labelled successful, disguised as the agent's own rollouts
    assert planted and all(p["success"] and p["source"] == "self" for p in planted)
    assert rows["rs"]["selected_planted"] == len(planted)
    assert rows["rs-oracle"]["selected_planted"] == 0
    assert rows["rs-oracle"]["n_selected"] == rows["rs"]["n_selected"] - len(planted)


def test_replay_draws_its_share_of_the_demos_in_order():
    from trajinf.bench.rounds import replay_demos

    demos = list(range(30))
    got = replay_demos(demos, 0.5, 10, seed=3)
    assert len(got) == 5 and got == sorted(got) and set(got) <= set(demos)
    assert got == replay_demos(demos, 0.5, 10, seed=3)  # the seed fixes the draw
    assert replay_demos(demos, 10.0, 10, seed=3) == demos  # at most all of them
    assert replay_demos(demos, 1.0, 0, seed=3) == []
    with pytest.raises(TrajinfError, match="'replay'"):
        FloodConfig(replay=-1.0)


@pytest.mark.slow
def test_replay_mixes_the_agents_own_demos_into_every_fine_tune(tmp_path, monkeypatch, agent_cache):
    from dataclasses import replace

    from trajinf.bench import rounds
    from trajinf.bench.agents import agent_tasks
    from trajinf.bench.flood import flood_preset
    from trajinf.envs import make_env

    monkeypatch.setenv("TRAJINF_CACHE", str(agent_cache))
    seen = []
    real = rounds._finetune

    def spy(agent_dir, chosen, config, seed, out):
        seen.append(list(chosen))
        return real(agent_dir, chosen, config, seed, out)

    monkeypatch.setattr(rounds, "_finetune", spy)
    cfg = replace(flood_preset("builtin", quick=True), rounds=1, replay=1.0, methods=("rs",))
    res = rounds.run_flood(cfg, tmp_path / "f", log=lambda *a: None)
    (row,) = res["rows"]
    n = row["n_selected"]
    n_demos = sum(map(len, agent_tasks(make_env("builtin"), cfg.agent)))  # the agent's SFT data
    r = min(n, n_demos)  # as many demos as picks, at most all of them
    assert n > 0 and row["n_replay"] == r
    (data,) = seen
    assert [t.source for t in data] == ["self"] * n + ["replay"] * r  # the pick, then the demos
    assert all(t.success for t in data)  # rs picks successes; the demos are the expert's


def test_flood_pool_pairs_seeds_within_runs_and_pools_them(tmp_path, load_benchmark):
    """benchmarks/flood_pool.py: the pooled test equals a paired t over the concatenated seeds."""
    from scipy import stats

    mod = load_benchmark("flood_pool")
    rng = np.random.default_rng(0)
    runs, a, b = [], [], []
    for name, n in (("x", 3), ("y", 5)):
        (tmp_path / name / "builtin").mkdir(parents=True)
        rows = []
        for s in range(n):
            va, vb = float(rng.random()), float(rng.random())
            rows += [{"method": "pick", "round": 1, "seed": s, "success": va},
                     {"method": "rs", "round": 1, "seed": s, "success": vb}]  # fmt: skip
            a.append(va)
            b.append(vb)
        rows.append({"method": "pick", "round": 1, "seed": 99, "success": 1.0})  # no rs: unpaired
        (tmp_path / name / "builtin" / "rounds.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
        runs.append(tmp_path / name)
    res = mod.pooled(runs, "pick", "rs")[1]
    assert res["n"] == 8 and res["n_ahead"] + res["n_behind"] == 8
    assert res["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert res["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert res["runs"][str(runs[0])] == pytest.approx(np.mean(np.subtract(a[:3], b[:3])))
    # "A,B": the method's rows from A, the baseline's from B (here y's picks against x's rs)
    res = mod.pooled([f"{runs[1]},{runs[0]}"], "pick", "rs")[1]
    assert res["n"] == 3
    assert res["mean_diff"] == pytest.approx(np.mean(np.subtract(a[3:6], b[:3])))
