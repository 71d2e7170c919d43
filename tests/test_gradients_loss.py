"""The loss objects of gradients/loss.py: token weights against an independent formula, and
advantage-weighted features against exact gradients from torch.func."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from grad_oracles import (
    assert_close,
    exact_weighted_grads,
    module_grads,
    project_factorized,
    tiny_model,
    token_weights,
)
from test_gradients_factorized import make_item

from trajinf.errors import TrajinfError
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import extract_features
from trajinf.gradients.loss import ActionNLL, AdvantageWeightedNLL
from trajinf.gradients.modules import tracked_modules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ITEMS = [make_item(10, 30, weights=True), make_item(11, 24, 2), make_item(12, 36, 3, True)]
ADV = {"it10": 1.5, "it11": -0.75, "it12": 0.0}


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_action_nll_weights(normalization):
    for it in ITEMS:
        got = ActionNLL(normalization).token_weights(it)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, token_weights(it, normalization).numpy(), rtol=1e-6)
    assert ExtractionConfig(loss_normalization=normalization).loss == ActionNLL(normalization)


def test_advantage_weighted_features_are_exact_gradients():
    """Factorized features of sum_i A_i NLL_i: the projection of the exact gradient of
    A_i * sum_t w_t nll_t (per item), so A_i times the plain features, zero for A_i = 0."""
    model = tiny_model("llama")
    config = ExtractionConfig(proj_dim=256, batch_tokens=4096)
    tracked = tracked_modules(model)
    names = [t.param_name for t in tracked]
    loss = AdvantageWeightedNLL(advantages=ADV)
    got = list(extract_features(model, ITEMS, config, loss=loss))
    plain = list(extract_features(model, ITEMS, config))
    for it, f, p in zip(ITEMS, got, plain, strict=True):
        a = ADV[it.id]
        rows = (a * token_weights(it)).unsqueeze(0)
        grads = exact_weighted_grads(model, torch.from_numpy(it.input_ids), rows, names)
        ref = project_factorized(
            tracked, config, module_grads(tracked, {n: g[0] for n, g in grads.items()})
        )
        if a == 0:
            assert not f.trajectory.any() and not f.steps.any()
        else:
            assert_close(f.trajectory, ref)
        assert_close(f.trajectory, a * p.trajectory, atol_floor=np.abs(p.trajectory).max())
        assert_close(f.steps, a * p.steps, atol_floor=np.abs(p.steps).max())


def test_advantage_weighted_less_mode_scales_per_item():
    model = tiny_model("llama")
    config = ExtractionConfig(mode="less", proj_dim=64)
    loss = AdvantageWeightedNLL("sum", advantages=ADV)
    got = list(extract_features(model, ITEMS, config, loss=loss))
    plain = list(extract_features(model, ITEMS, config, loss=ActionNLL("sum")))
    for it, f, p in zip(ITEMS, got, plain, strict=True):
        assert_close(f.trajectory, ADV[it.id] * p.trajectory, atol_floor=np.abs(p.trajectory).max())


def test_missing_advantage_names_the_trajectory():
    with pytest.raises(TrajinfError, match="it11"):
        AdvantageWeightedNLL(advantages={"it10": 1.0}).token_weights(ITEMS[1])
