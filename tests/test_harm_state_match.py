"""benchmarks/harm_state_match.py against cases with a known answer: a state that carries the
cue retrieves same-cue target steps and separates the planted (wrong-item) steps; a state
without it does not."""

import numpy as np
import pytest

from trajinf.envs.families import PART, PART_WRONG


@pytest.fixture(scope="module")
def match(load_benchmark):
    return load_benchmark("harm_state_match")


def _rows(carry_cue: bool, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    cues = sorted(PART)
    basis = {c: rng.normal(size=16) for c in cues}
    rows = []
    for kind, n in (("target", 3), ("expert", 6), ("planted", 6)):
        for c in cues:
            for _ in range(n):
                h = rng.normal(scale=0.3, size=16) + (3 * basis[c] if carry_cue else 0)
                item = PART_WRONG[c] if kind == "planted" else PART[c]
                rows.append({"h": h, "item": item, "cue": c, "family": "repair", "kind": kind})
    return rows


def test_cue_in_state_is_found_and_separates_planted(match):
    r = match.family_rows(_rows(carry_cue=True))
    assert r["cue_acc_target"] == 1.0
    assert r["auroc_k1"] == 1.0 and r["auroc_k3"] == 1.0


def test_state_without_cue_is_at_chance(match):
    r = match.family_rows(_rows(carry_cue=False))
    assert r["cue_acc_target"] < 0.5  # 4 cues: chance 0.25
    assert 0.2 < r["auroc_k1"] < 0.8
