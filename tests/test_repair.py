"""Repair instead of discard (issue 13): kept / repaired / dropped per trajectory, bad steps
weighted 0 in the exported JSONL, repaired scores without their bad steps."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from trajinf.data.trajectories import trajectory_from_messages
from trajinf.data.write import write_pool
from trajinf.errors import TrajinfError
from trajinf.selection.repair import choice_counts, repair_plan, select_repaired


def _traj(i: str, n_steps: int):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "go"}]
    for k in range(n_steps):
        msgs += [{"role": "assistant", "content": f"a{k}"}, {"role": "user", "content": f"o{k}"}]
    return trajectory_from_messages(msgs, id=i, task_id="t", source="expert", success=True)


def _case():
    """Four 3-step trajectories: a (best, clean), b (one bad step), c (all bad), d (clean)."""
    pool = [_traj(i, 3) for i in "abcd"]
    scores = pd.DataFrame({"id": list("abcd"), "score": [0.9, 0.8, 0.95, 0.1]})
    steps = pd.DataFrame(
        {
            "id": [i for i in "abcd" for _ in range(3)],
            "step": [0, 1, 2] * 4,
            "score": [0.3, 0.3, 0.3, 0.5, 0.5, -0.2, 0.3, 0.3, 0.35, 0.0, 0.05, 0.05],
        }
    )
    harm = pd.DataFrame({"id": list("abcd"), "harmful": [False, True, True, False]})
    bad = pd.DataFrame(
        {"id": steps["id"], "step": steps["step"], "bad": [False] * 5 + [True] * 4 + [False] * 3}
    )
    return pool, scores, steps, repair_plan(harm, bad)


def test_plan_choices() -> None:
    _, _, _, plan = _case()
    assert dict(zip(plan["id"], plan["choice"], strict=True)) == {
        "a": "kept", "b": "repaired", "c": "dropped", "d": "kept",
    }  # fmt: skip
    assert plan.set_index("id").loc["b", "bad_steps"] == [2]
    assert choice_counts(plan) == {"kept": 2, "repaired": 1, "dropped": 1}


def test_repair_drop_keep_side_by_side(tmp_path) -> None:
    pool, scores, steps, plan = _case()
    kw = dict(fraction=0.5, scores=scores, step_scores=steps, plan=plan)
    keep = select_repaired(pool, mode="keep", **kw)
    assert keep.ids == ["c", "a"] and keep.step_weights is None  # c is the all-bad one
    drop = select_repaired(pool, mode="drop", **kw)
    assert drop.ids == ["a", "d"]
    rep = select_repaired(pool, mode="repair", **kw)
    # b without its bad step scores 0.8 - (-0.2) = 1.0: above a (0.9)
    assert rep.ids == ["b", "a"]
    assert rep.step_weights == {"b": [1.0, 1.0, 0.0]}
    assert rep.info["harm"]["selected"] == {"kept": 1, "repaired": 1, "dropped": 0}
    assert rep.info["choices"] == {"b": "repaired", "a": "kept"}
    # without re-ranking b keeps its own 0.8: below a, still repaired
    inplace = select_repaired(pool, mode="repair", rerank=False, **kw)
    assert inplace.ids == ["a", "b"] and inplace.step_weights == {"b": [1.0, 1.0, 0.0]}
    out = tmp_path / "sel.jsonl"
    by_id = {t.id: t for t in pool}
    write_pool([by_id[i] for i in rep.ids], out, step_weights=rep.step_weights)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    weights = [m.get("weight") for m in rows[0]["messages"] if m["role"] == "assistant"]
    assert weights == [1.0, 1.0, 0.0]  # the bad step weighted 0, the rest kept
    assert all(m.get("weight", 1.0) == 1.0 for m in rows[1]["messages"])


def test_errors() -> None:
    pool, scores, steps, plan = _case()
    with pytest.raises(TrajinfError, match="mode"):
        select_repaired(pool, fraction=0.5, scores=scores, step_scores=steps, plan=plan,
                        mode="fix")  # fmt: skip
    with pytest.raises(TrajinfError, match="no repair choice"):
        select_repaired(pool, fraction=0.5, scores=scores, step_scores=steps, plan=plan.iloc[:2])
    with pytest.raises(TrajinfError, match="max_bad_fraction"):
        repair_plan(pd.DataFrame({"id": [], "harmful": []}), steps.assign(bad=False),
                    max_bad_fraction=0)  # fmt: skip


def test_oracle_plan_repairs_known_bad_steps_and_drops_mostly_bad() -> None:
    from trajinf.bench.harm import oracle_plan

    pool = [_traj(i, 4) for i in "abc"]
    pool[1].meta["bad_step"] = 2  # one-bad-step demo: repaired at step 2
    pool[2].meta["noisy_steps"] = [0, 1, 3]  # mostly bad: dropped
    plan = oracle_plan(pool).set_index("id")
    assert plan["choice"].to_dict() == {"a": "kept", "b": "repaired", "c": "dropped"}
    assert plan.loc["b", "bad_steps"] == [2]


def test_everything_flagged_gives_an_empty_drop_selection() -> None:
    pool, scores, steps, _ = _case()
    harm = pd.DataFrame({"id": list("abcd"), "harmful": [True] * 4})
    bad = pd.DataFrame({"id": steps["id"], "step": steps["step"], "bad": [True] * 12})
    sel = select_repaired(pool, fraction=0.5, scores=scores, step_scores=steps,
                          plan=repair_plan(harm, bad), mode="drop")  # fmt: skip
    assert sel.ids == [] and sel.info["n_selected"] == 0 and sel.info["budget"] == 2


def test_reference_dir_names_the_base_agent_and_the_last_warmup_checkpoint(tmp_path):
    from trajinf.bench.harm import reference_dir

    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-1"):
        (tmp_path / "models" / "warmup" / name).mkdir(parents=True)
    assert reference_dir(tmp_path, "base") == tmp_path / "models" / "base"
    # by step number, not by name (checkpoint-2 sorts after checkpoint-10 as text)
    assert reference_dir(tmp_path, "warm").name == "checkpoint-10"
    with pytest.raises(ValueError, match="base or warm"):
        reference_dir(tmp_path, "tuned")
    with pytest.raises(FileNotFoundError, match="no warm-up checkpoint"):
        reference_dir(tmp_path / "empty", "warm")
