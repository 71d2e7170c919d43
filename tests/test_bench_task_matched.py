"""The bench's task-matched baselines (issue 15): random / success-only among the pool
trajectories of the target's families, at the same budget as every other method."""

from __future__ import annotations

import math

from trajinf.bench.env_bench import FULL_GRID, SMALL_GRID
from trajinf.bench.runner import _select
from trajinf.bench.scenarios import Scenario
from trajinf.data.schema import Trajectory


def traj(i: int, fam: str, success: bool) -> Trajectory:
    msgs = [{"role": "user", "content": "go"}, {"role": "assistant", "content": f"a{i}"}]
    return Trajectory(id=f"{fam}-{i}", messages=msgs, task_id=f"{fam}{i}", source="expert",
                      success=success, meta={"family": fam})  # fmt: skip


def scenario() -> Scenario:
    pool = [traj(i, f, i % 3 == 0) for f in ("coin", "twc", "arith") for i in range(20)]
    target = [traj(100 + i, "coin", True) for i in range(2)]
    return Scenario("mixed", pool, target, "subtask", {})


def test_task_random_and_task_success_draw_from_the_target_families_only():
    scn = scenario()
    k = math.ceil(0.1 * len(scn.pool))
    for method in ("task-random", "task-success"):
        sel = _select(method, scn, {}, 0.1, seed=0)
        assert len(sel.ids) == k
        assert all(i.startswith("coin-") for i in sel.ids)
    succ = _select("task-success", scn, {}, 0.1, seed=0)
    by_id = {t.id: t for t in scn.pool}
    assert all(by_id[i].success for i in succ.ids)
    # another seed draws another random subset of the same families
    assert set(_select("task-random", scn, {}, 0.1, seed=1).ids) != set(
        _select("task-random", scn, {}, 0.1, seed=0).ids
    )


def test_task_matched_baselines_are_in_the_mixed_grids():
    for grid in (FULL_GRID, SMALL_GRID):
        assert {"task-random", "task-success"} <= set(grid["mixed"][0])
