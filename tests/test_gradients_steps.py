"""Factorized step_split="loss": each step's feature is its own loss's projected gradient.

References are exact weight gradients of each step's masked loss from torch.func
(vmap over the steps' token-weight rows of grad(functional_call)), projected with the same
seeded P_out G P_in^T as the extractor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from grad_oracles import (
    VOCAB,
    assert_close,
    flatten_grads,
    module_grads,
    project_factorized,
    reference_projection,
    step_loss_grads,
    tiny_model,
)

import trajinf.gradients.factorized as factorized
from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import extract_features
from trajinf.gradients.loss_split import capture_head_input
from trajinf.gradients.modules import tracked_modules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
LOSS = dict(step_split="loss")


def make_item(
    seed: int, length: int, n_steps: int = 3, weights: bool = False, tight: bool = False
) -> TokenizedTrajectory:
    """Prompt, then n_steps spans [gen-prompt token (no loss), action tokens], text between.

    tight: steps are back to back and all action tokens, so the first token of a step is
    predicted from the previous step's last position (step boundaries are off-by-one sensitive).
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, length)
    step_ids = np.full(length, -1, np.int32)
    action = np.zeros(length, bool)
    bounds = np.linspace(4, length, n_steps + 1).astype(int)
    for s in range(n_steps):
        lo, hi = bounds[s], bounds[s] + max(2, (bounds[s + 1] - bounds[s]) // 2)
        hi = bounds[s + 1] if tight else hi
        step_ids[lo:hi] = 3 * s + 2  # original indices need not be 0..S-1
        action[lo + (0 if tight else 1) : hi] = True
    w = rng.uniform(0.5, 2.0, length).astype(np.float32) * action if weights else None
    return TokenizedTrajectory(f"it{seed}", ids, action, step_ids, n_steps, weights=w)


ITEMS = [
    make_item(0, 40),
    make_item(1, 23, 2, weights=True),
    make_item(2, 40, 4),
    make_item(4, 30, 3, tight=True),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "lora"])
def test_loss_split_equals_projected_own_loss_gradients(arch):
    model = tiny_model(arch)
    tracked = tracked_modules(model)
    names = [t.param_name for t in tracked]
    config = ExtractionConfig(proj_dim=512, **LOSS)
    got = list(extract_features(model, ITEMS, config))
    position = list(extract_features(model, ITEMS, ExtractionConfig(proj_dim=512)))
    for it, f, p in zip(ITEMS, got, position, strict=True):
        grads = module_grads(tracked, step_loss_grads(model, it, names))
        expected = project_factorized(tracked, config, grads)
        assert f.finite and f.steps.shape == expected.shape
        assert_close(f.steps, expected)
        assert_close(f.steps.sum(0), f.trajectory, rtol=1e-5)
        # L = sum_s L_s: the two splits share the trajectory feature
        assert_close(f.trajectory, p.trajectory)
        assert f.loss == pytest.approx(p.loss, rel=1e-6)
        np.testing.assert_array_equal(f.step_index, p.step_index)
        np.testing.assert_array_equal(f.step_tokens, p.step_tokens)


def test_splits_differ_when_later_steps_attend_to_earlier_ones():
    model = tiny_model("llama")
    item = make_item(3, 40, 4)
    loss = next(extract_features(model, [item], ExtractionConfig(proj_dim=512, **LOSS)))
    pos = next(extract_features(model, [item], ExtractionConfig(proj_dim=512)))
    rel = np.linalg.norm(loss.steps - pos.steps, axis=1) / np.linalg.norm(pos.steps, axis=1)
    assert (rel > 0.05).all(), rel
    # the step losses after step 0 also flow through step 0's positions (position split
    # credits them to step 0), so step 0 gets more under the position split's definition
    assert not np.allclose(loss.steps[0], pos.steps[0], rtol=1e-2)
    assert_close(loss.trajectory, pos.trajectory)


def test_padding_and_batch_composition_invariance():
    model = tiny_model("llama")
    target = make_item(7, 30, 3, weights=True)
    crowd = [make_item(8, 60, 5), target, make_item(9, 12, 1), make_item(10, 45, 2)]
    alone = next(extract_features(model, [target], ExtractionConfig(proj_dim=256, **LOSS)))
    mixed = list(extract_features(model, crowd, ExtractionConfig(proj_dim=256, **LOSS)))
    single = list(
        extract_features(model, crowd, ExtractionConfig(proj_dim=256, batch_tokens=1, **LOSS))
    )
    assert [f.id for f in mixed] == [it.id for it in crowd]
    assert_close(mixed[1].steps, alone.steps, rtol=1e-5)
    for a, b in zip(single, mixed, strict=True):
        assert a.steps.shape == b.steps.shape
        assert_close(a.steps, b.steps, rtol=1e-5)


def test_head_shortcut_matches_backward_from_the_loss(monkeypatch):
    """The shared head backward (dL/dh masked per step) == per-step backwards from the nll."""
    model = tiny_model("gpt2")
    config = ExtractionConfig(proj_dim=256, **LOSS)
    with capture_head_input(model, tracked_modules(model)) as head:
        model(torch.arange(1, 9).unsqueeze(0), use_cache=False)
    assert head.calls == 1 and head.hidden is not None and head.hidden.shape[:2] == (1, 8)
    fast = list(extract_features(model, ITEMS, config))

    def without_head(model, tracked, *, active=True):
        return capture_head_input(model, tracked, active=False)

    monkeypatch.setattr(factorized, "capture_head_input", without_head)
    slow = list(extract_features(model, ITEMS, config))
    for a, b in zip(fast, slow, strict=True):
        assert_close(a.steps, b.steps, rtol=1e-5)


def test_tracked_head_uses_per_step_backwards():
    """With lm_head tracked, its per-step output gradients still match the reference."""
    model = tiny_model("llama")
    tracked = tracked_modules(model, ["*.mlp.down_proj", "lm_head"])
    assert tracked[-1].name == "lm_head"
    config = ExtractionConfig(proj_dim=256, modules=["*.mlp.down_proj", "lm_head"], **LOSS)
    f = next(extract_features(model, ITEMS[3:], config))
    grads = step_loss_grads(model, ITEMS[3], [t.param_name for t in tracked])
    assert_close(f.steps, project_factorized(tracked, config, module_grads(tracked, grads)))


def test_less_steps_share_the_definition():
    """LESS (preconditioner none) step features are the dense projection of the same grads."""
    model = tiny_model("lora")
    tracked = tracked_modules(model)
    names = [t.param_name for t in tracked]
    less = next(extract_features(model, ITEMS[3:], ExtractionConfig(mode="less", proj_dim=64)))
    grads = flatten_grads(step_loss_grads(model, ITEMS[3], names), names)
    assert_close(less.steps, (grads @ reference_projection(model, names, 64, 0)).numpy())


def test_config_field():
    assert ExtractionConfig().to_dict()["step_split"] == "position"
    assert ExtractionConfig(step_split="loss").to_dict()["step_split"] == "loss"
    # LESS always computes the loss split; the manifest says so
    assert ExtractionConfig(mode="less").to_dict()["step_split"] == "loss"
    with pytest.raises(TrajinfError, match="step_split"):
        list(
            extract_features(tiny_model("llama"), ITEMS[:1], ExtractionConfig(step_split="tokens"))
        )


def test_item_without_steps_in_a_batch():
    model = tiny_model("llama")
    empty = TokenizedTrajectory(
        "empty", np.arange(1, 21), np.zeros(20, bool), np.full(20, -1, np.int32), 0
    )
    config = ExtractionConfig(proj_dim=128, **LOSS)
    out = list(extract_features(model, [ITEMS[0], empty], config))
    assert not out[1].finite and out[1].steps.shape == (0, out[1].trajectory.shape[0])
    assert_close(out[0].steps, next(extract_features(model, ITEMS[:1], config)).steps, rtol=1e-5)
