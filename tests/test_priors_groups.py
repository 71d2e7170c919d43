"""Rollout-group priors on constructed groups: branch credit, variance, DAPO / DRO filters."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from trajinf.data.trajectories import trajectory_from_messages
from trajinf.errors import TrajinfError
from trajinf.selection.priors import group_filter, step_prior, variance_filter
from trajinf.selection.priors.groups import action_key


def traj(rid, task, actions, success, *, start="go", tree=None):
    msgs = [{"role": "user", "content": start}]
    for a in actions:
        msgs += [{"role": "assistant", "content": a}, {"role": "user", "content": f"did {a}"}]
    meta = {} if tree is None else {"tree": tree}
    return trajectory_from_messages(msgs, id=rid, task_id=task, success=success, meta=meta)


def values(df: pd.DataFrame) -> dict[str, list[float]]:
    df = df.sort_values(["id", "step"])
    return {i: list(g["value"]) for i, g in df.groupby("id")}


@pytest.fixture
def tree():
    """root -a-> {b: {c: r1 (1), r4 (1); d: r2 (0)}; e: r3 (0)}; outcome mean .5, std .5."""
    return [
        traj("r1", "T", ["a", "b", "c"], True),
        traj("r2", "T", ["a", "b", "d"], False),
        traj("r3", "T", ["a", "e"], False),
        traj("r4", "T", ["a", "b", "c"], True),
    ]


def test_branch_credit_at_known_branch_points(tree):
    v = values(step_prior("branch", tree))
    # step 0 is shared by all: no comparison (one tree -> 0). Step 1: b (mean 2/3) vs e (0),
    # over std .5. Step 2: c (1) vs d (0).
    np.testing.assert_allclose(v["r1"], [0.0, 4 / 3, 2.0])
    np.testing.assert_allclose(v["r4"], [0.0, 4 / 3, 2.0])
    np.testing.assert_allclose(v["r2"], [0.0, 4 / 3, -2.0])
    np.testing.assert_allclose(v["r3"], [0.0, -4 / 3])
    nan = values(step_prior("branch", tree, shared="nan"))
    assert math.isnan(nan["r1"][0]) and nan["r1"][1] == pytest.approx(4 / 3)


def test_branch_across_trees_adds_the_tree_term():
    pool = [
        traj("a1", "T", ["x"], True, tree="A"),
        traj("a2", "T", ["y"], False, tree="A"),
        traj("b1", "T", ["x"], False, tree="B"),
        traj("b2", "T", ["x"], False, tree="B"),
    ]
    v = values(step_prior("branch", pool, tree_field="tree"))
    inter = 0.25 / np.std([1, 0, 0, 0])  # tree mean minus task mean, over the task's std
    assert v["a1"][0] == pytest.approx(1 / 0.5 + inter)
    assert v["a2"][0] == pytest.approx(-1 / 0.5 + inter)
    assert v["b1"] == pytest.approx([-inter]) and v["b2"] == pytest.approx([-inter])


def test_branch_undefined_without_a_group(tree):
    pool = [*tree, traj("solo", "U", ["a", "b"], True), traj("nolabel", None, ["a"], True)]
    v = values(step_prior("branch", pool))
    assert all(math.isnan(x) for x in v["solo"] + v["nolabel"])
    with pytest.raises(TrajinfError, match="shared"):
        step_prior("branch", tree, shared="mean")
    with pytest.raises(TrajinfError, match="unknown option"):
        step_prior("branch", tree, bogus=1)


def test_action_key_ignores_argument_formatting():
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "f", "arguments": '{"b": 1, "a": 2}'},
    }
    other = {**call, "function": {"name": "f", "arguments": '{"a":2,"b":1}'}}
    m1 = {"role": "assistant", "content": "", "tool_calls": [call]}
    m2 = {"role": "assistant", "content": " ", "tool_calls": [other]}
    assert action_key(m1) == action_key(m2) == 'f({"a": 2, "b": 1})'


def test_group_variance_of_a_given_statistic():
    pool = [traj(f"r{i}", "T", ["a"] * n, True) for i, n in enumerate([3, 2, 1])]
    stat = pd.DataFrame(
        {"id": ["r0", "r1", "r2", "r0", "r1", "r0"], "step": [0, 0, 0, 1, 1, 2],
         "value": [0.0, 1.0, 2.0, 1.0, 1.0, 5.0]}
    )  # fmt: skip
    v = values(step_prior("group_variance", pool, stat=stat))
    assert v["r0"][:2] == pytest.approx([2 / 3, 0.0]) and math.isnan(v["r0"][2])
    assert v["r2"] == pytest.approx([2 / 3])


def test_group_variance_default_is_prefix_value_variance(tree):
    v = values(step_prior("group_variance", tree))
    # after step 0 every rollout is at the same node (value .5): no variance; after step 1 the
    # prefix values are 2/3, 2/3, 0, 2/3 -> variance 1/12; step 2 values 1, 0, 1 -> 2/9
    assert v["r1"] == pytest.approx([0.0, 1 / 12, 2 / 9])
    assert v["r3"] == pytest.approx([0.0, 1 / 12])


def test_variance_filter_drops_tasks_without_signal(tree):
    flat = [traj("f1", "F", ["a"], True), traj("f2", "F", ["b"], True)]
    solo = [traj("s1", "S", ["a"], False)]
    kept, info = variance_filter([*tree, *flat, *solo])
    assert kept == ["r1", "r2", "r3", "r4", "s1"]
    assert info["tasks_removed"] == 1 and info["items_removed"] == 2
    kept, info = variance_filter([*tree, *flat], min_signal=1.0)
    assert kept == [] and info["tasks_removed"] == 2


def test_group_filter_counts():
    pool = [
        traj("a1", "A", ["x"], True), traj("a2", "A", ["y"], True),
        traj("b1", "B", ["x"], False), traj("b2", "B", ["x"], False), traj("b3", "B", ["y"], False),
        traj("c1", "C", ["x"], True), traj("c2", "C", ["y"], False),
        traj("d1", "D", ["x"], True), traj("n1", None, ["x"], True),
    ]  # fmt: skip
    kept, info = group_filter(pool)
    assert kept == ["c1", "c2", "d1", "n1"]
    assert info == {"tasks_total": 4, "tasks_removed": 2, "all_success": 1, "all_fail": 1,
                    "items_removed": 5, "items_kept": 4}  # fmt: skip
    kept, info = group_filter(pool, drop_singletons=True)
    assert kept == ["c1", "c2", "n1"] and info["all_success"] == 2
