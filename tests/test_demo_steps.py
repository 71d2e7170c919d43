"""The demo's pieces: task-matched baselines, and fine-tune cells in worker processes."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import pytest

from trajinf.data.schema import Trajectory
from trajinf.data.write import write_pool
from trajinf.errors import TrajinfError
from trajinf.loop.demo import DemoConfig
from trajinf.loop.steps import (
    demo_tasks,
    retrain_cell,
    run_cells,
    select_for_method,
    selection_composition,
)


def _traj(i: int, family: str, success: bool) -> Trajectory:
    return Trajectory(
        id=f"t{i}",
        task_id=f"{family}-{i}",
        source="expert" if success else "noisy",
        success=success,
        reward=float(success),
        messages=[
            {"role": "user", "content": "goal"},
            {"role": "assistant", "content": "act"},
        ],
        meta={"family": family},
    )


@pytest.fixture
def pool():
    fams = ["cook", "unlock", "repair", "sort"]
    return [_traj(i, fams[i % 4], i % 3 != 0) for i in range(80)]


@pytest.mark.parametrize("method", ["task-random", "task-success"])
def test_task_matched_baselines_draw_the_same_budget_from_the_target_families(pool, method):
    sel = select_for_method(method, pool, ["cook", "sort"], budget=0.1, seed=3)
    k = math.ceil(0.1 * len(pool))
    by_id = {t.id: t for t in pool}
    assert len(sel.ids) == k == sel.info["n_selected"]
    assert len(set(sel.ids)) == k
    assert {by_id[i].meta["family"] for i in sel.ids} <= {"cook", "sort"}
    assert sel.info["matched_pool"] == 40
    if method == "task-success":
        assert all(by_id[i].success for i in sel.ids)
    again = select_for_method(method, pool, ["cook", "sort"], budget=0.1, seed=3)
    other = select_for_method(method, pool, ["cook", "sort"], budget=0.1, seed=4)
    assert again.ids == sel.ids and other.ids != sel.ids  # seeded


def test_task_matched_budget_never_exceeds_k_at_awkward_fractions(pool):
    for budget in (0.07, 0.13, 0.29, 0.33):
        k = math.ceil(budget * len(pool))
        sel = select_for_method(
            "task-random", pool, ["cook", "unlock", "sort"], budget=budget, seed=0
        )
        assert len(sel.ids) == k


def test_task_success_falls_short_when_the_families_have_few_successes(pool):
    few = [t for t in pool if t.meta["family"] != "cook" or not t.success][:60]
    n_ok = sum(t.success and t.meta["family"] == "cook" for t in few)
    sel = select_for_method("task-success", few, ["cook"], budget=0.5, seed=0)
    assert len(sel.ids) == n_ok < math.ceil(0.5 * len(few))
    assert sel.info["budget_met"] is False


def test_task_matched_without_target_trajectories_is_a_clear_error(pool):
    with pytest.raises(TrajinfError, match="no pool trajectory of the target families"):
        select_for_method("task-random", pool, ["bake"], budget=0.1, seed=0)


def test_selection_composition_counts(pool):
    by_id = {t.id: t for t in pool}
    c = selection_composition(["t0", "t1", "t4", "t5"], by_id)
    assert c == {
        "families": {"cook": 2, "unlock": 2},
        "sources": {"noisy": 1, "expert": 3},
        "labelled_success": 3,
        "n": 4,
    }


def test_other_methods_go_through_select(pool):
    full = select_for_method("full", pool, ["cook"], budget=0.1, seed=0)
    assert len(full.ids) == len(pool)
    rnd = select_for_method("random", pool, ["cook"], budget=0.1, seed=0)
    assert len(rnd.ids) == 8


@pytest.mark.slow
def test_cells_in_workers_equal_cells_in_process(tmp_path):
    """The 2-process path gives exactly the single-process results (same seeds, 1 thread)."""
    from trajinf.envs import make_env
    from trajinf.envs.policies import ExpertPolicy
    from trajinf.envs.rollout import rollout
    from trajinf.models.tiny import tiny_model, tokenizer_corpus, train_tokenizer

    env = make_env("builtin")
    demos = rollout(env, env.tasks("train", 8, 0), ExpertPolicy(), source="expert", seed=0)
    tok = train_tokenizer(tokenizer_corpus(demos), vocab_size=512)
    model = tiny_model(tok, seed=0, arch="llama", hidden=32, layers=1, heads=2)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    write_pool(demos, tmp_path / "sel.jsonl")
    cfg = replace(DemoConfig(), n_test_tasks=4, finetune_steps=3)
    jobs = [
        {
            "method": m,
            "seed_index": s,
            "seed": 1000 * (s + 1),
            "selection": str(tmp_path / "sel.jsonl"),
            "n_selected": len(demos),
            "base_dir": str(base),
            "env": "builtin",
            "families": ["cook", "unlock"],
            "config": asdict(cfg),
        }
        for m in ("a", "b")
        for s in range(2)
    ]
    one = {(c["method"], c["seed_index"]): c for c in run_cells(jobs, 1)}
    two = {(c["method"], c["seed_index"]): c for c in run_cells(jobs, 2)}
    assert one.keys() == two.keys() == {(m, s) for m in "ab" for s in range(2)}
    for key in one:
        for field in ("success_rate", "per_family", "step_agreement"):
            assert one[key][field] == two[key][field], (key, field)
    assert retrain_cell(jobs[0])["step_agreement"] == one[("a", 0)]["step_agreement"]


def test_demo_tasks_base_families_restrict_the_base_demos_only():
    from trajinf.envs import make_env

    env = make_env("builtin")
    cfg = DemoConfig(n_train_tasks=20, n_target_per_family=2, n_base_tasks=30,
                     target_families=["repair", "unlock"])  # fmt: skip
    fams, target, pool, base = demo_tasks(env, cfg)
    assert fams == ["repair", "unlock"] and len(target) == 4 and len(pool) == 20
    assert len(base) == 30 and {t.family for t in base} == set(env.families)
    # the previous draw (before base_families): the next n_base tasks after the pool
    ids = {t.id for t in target}
    rest = [t for t in env.tasks("train", 20 + 16 + 30, 0) if t.id not in ids]
    assert [t.id for t in base] == [t.id for t in rest[20:50]]
    fams2, target2, pool2, base2 = demo_tasks(env, replace(cfg, base_families=["repair"]))
    assert [t.id for t in target2] == [t.id for t in target]  # pool and target unchanged
    assert [t.id for t in pool2] == [t.id for t in pool]
    assert len(base2) == 30 and {t.family for t in base2} == {"repair"}
    seen = {t.id for t in target2 + pool2}
    assert len({t.id for t in base2}) == 30 and not seen & {t.id for t in base2}
    with pytest.raises(TrajinfError, match="base_families"):
        demo_tasks(env, replace(cfg, base_families=["bake"]))


def test_built_data_stamp_ignores_base_families_at_its_default():
    """Bench data built before the field existed is reused (same stamp); a set value counts."""
    from trajinf.bench.env_bench import BenchConfig
    from trajinf.envs import make_env

    plan = BenchConfig.quick().plans[0]
    assert "base_families" not in plan.demo_config_dict()
    fams = replace(plan, demo={**plan.demo, "base_families": ["repair"]})
    assert fams.demo_config_dict()["base_families"] == ["repair"]
    env = make_env("builtin")
    c = plan.demo_config()
    assert (
        plan.n_tasks_drawn(env) == c.n_train_tasks + 4 * c.n_target_per_family * 2 + c.n_base_tasks
    )
