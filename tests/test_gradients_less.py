"""LESS mode against a hand-computed reference: exact grads -> Adam formula -> projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from grad_oracles import (
    VOCAB,
    flatten_grads,
    reference_projection,
    step_loss_grads,
    tiny_model,
)
from grad_oracles import assert_close as _assert_close

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import extract_features
from trajinf.gradients.modules import tracked_modules
from trajinf.gradients.projection import DenseProjector
from trajinf.models.checkpoints import CheckpointState

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def make_item(seed: int, length: int, n_steps: int = 3) -> TokenizedTrajectory:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB - 1, length)
    step_ids = np.full(length, -1, np.int32)
    action = np.zeros(length, bool)
    bounds = np.linspace(3, length, n_steps + 1).astype(int)
    for s in range(n_steps):
        lo, hi = bounds[s], bounds[s] + max(2, (bounds[s + 1] - bounds[s]) // 2)
        step_ids[lo:hi] = s
        action[lo + 1 : hi] = True
    return TokenizedTrajectory(f"it{seed}", ids, action, step_ids, n_steps)


def reference_grads(model, item, names) -> torch.Tensor:
    """Exact flattened gradients [1 + S, N] of the item loss and each step's masked loss."""
    return flatten_grads(step_loss_grads(model, item, names, with_item=True), names)


def moments(model, names, seed=1) -> CheckpointState:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    m = {n: torch.randn(params[n].shape, generator=gen) * 1e-2 for n in names}
    v = {n: torch.rand(params[n].shape, generator=gen) * 1e-4 for n in names}
    return CheckpointState(3, 2e-4, (0.9, 0.999), 1e-8, 30, m, v)


ITEMS = [make_item(0, 30), make_item(1, 18, 2), make_item(2, 26, 4)]


def assert_close(actual, expected, rtol=1e-4):
    _assert_close(actual, expected, rtol=rtol, atol_floor=0.0)  # atol: 1e-6 x max |expected|


@pytest.mark.parametrize("arch", ["llama", "gpt2", "lora"])
@pytest.mark.parametrize("precond", ["none", "adam"])
def test_less_matches_reference(arch, precond):
    model = tiny_model(arch)
    names = [t.param_name for t in tracked_modules(model)]
    state = moments(model, names)
    config = ExtractionConfig(mode="less", proj_dim=64, preconditioner=precond, seed=7)
    got = list(extract_features(model, ITEMS, config, checkpoint_state=state))
    proj = reference_projection(model, names, 64, 7)
    m = torch.cat([state.exp_avg[n].reshape(-1) for n in names])
    v = torch.cat([state.exp_avg_sq[n].reshape(-1) for n in names])
    for it, f in zip(ITEMS, got, strict=True):
        g = reference_grads(model, it, names)
        if precond == "adam":
            m2, v2 = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
            g = m2 / (v2.sqrt() + 1e-8)
        expected = (g @ proj).numpy()
        assert_close(f.trajectory, expected[0])
        assert_close(f.steps, expected[1:])
        assert f.finite and f.steps.shape == (len(f.step_index), 64)
        if precond == "none":  # linear: steps add up; with adam they do not
            assert_close(f.steps.sum(0), f.trajectory)


def test_less_adam_steps_do_not_add_up():
    model = tiny_model("lora")
    names = [t.param_name for t in tracked_modules(model)]
    config = ExtractionConfig(mode="less", proj_dim=64, preconditioner="adam")
    f = next(extract_features(model, ITEMS[:1], config, checkpoint_state=moments(model, names)))
    assert not np.allclose(f.steps.sum(0), f.trajectory, rtol=1e-2)
    with pytest.raises(TrajinfError, match="checkpoint_state"):
        list(extract_features(model, ITEMS[:1], config))


def test_less_batch_order_and_seed():
    model = tiny_model("lora")
    config = ExtractionConfig(mode="less", proj_dim=128)
    a = list(extract_features(model, ITEMS, config))
    b = list(extract_features(model, ITEMS[::-1], config))[::-1]
    alone = next(extract_features(model, ITEMS[1:2], config))
    c = next(
        extract_features(model, ITEMS[:1], ExtractionConfig(mode="less", proj_dim=128, seed=1))
    )
    for x, y in zip(a, b, strict=True):
        assert x.id == y.id
        assert_close(x.steps, y.steps, rtol=1e-5)
    assert_close(a[1].steps, alone.steps, rtol=1e-5)
    assert not np.allclose(a[0].trajectory, c.trajectory, rtol=1e-2)


def test_less_elementwise_mask():
    model = tiny_model("llama")
    tracked = tracked_modules(model)
    names = [t.param_name for t in tracked]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    mask = {n: torch.rand(params[n].shape, generator=gen) < 0.1 for n in names[:3]}
    config = ExtractionConfig(mode="less", proj_dim=64)
    f = next(extract_features(model, ITEMS[:1], config, update_mask=mask))
    keep = torch.cat(
        [mask[n].reshape(-1).float() if n in mask else torch.ones(params[n].numel()) for n in names]
    )
    g = reference_grads(model, ITEMS[0], names) * keep
    proj = reference_projection(model, names, 64, 0)
    assert_close(f.trajectory, (g @ proj)[0].numpy())


def test_less_nonfinite_item_is_isolated():
    model = tiny_model("lora")
    bad = make_item(9, 20)
    bad.input_ids[5] = VOCAB - 1
    handle = model.get_input_embeddings().register_forward_hook(
        lambda mod, inp, out: out.masked_fill((inp[0] == VOCAB - 1).unsqueeze(-1), float("nan"))
    )
    config = ExtractionConfig(mode="less", proj_dim=64)
    try:
        out = list(extract_features(model, [ITEMS[0], bad], config))
    finally:
        handle.remove()
    assert out[0].finite and not out[1].finite
    assert not out[1].trajectory.any() and not out[1].steps.any()
    assert_close(out[0].steps, next(extract_features(model, ITEMS[:1], config)).steps, rtol=1e-5)


def test_dense_projection_preserves_norms_and_is_row_independent():
    proj = DenseProjector([("a", 5000), ("b", 3000)], dim=2048, seed=0)
    x = torch.randn(6, 8000, generator=torch.Generator().manual_seed(0))
    y = proj.project(x)
    ratio = y.norm(dim=1) / x.norm(dim=1)
    assert torch.all((ratio > 0.9) & (ratio < 1.1))
    torch.testing.assert_close(proj.project(x[2:3]), y[2:3], rtol=1e-5, atol=1e-5)
