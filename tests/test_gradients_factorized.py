"""Factorized extraction against exact gradients from torch.func on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grad_oracles import (
    VOCAB,
    assert_close,
    exact_weighted_grads,
    module_grads,
    nll_of,
    project_factorized,
    tiny_model,
    token_weights,
)

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import extract_features, feature_dim
from trajinf.gradients.hooks import ActivationGradientCollector
from trajinf.gradients.masks import mask_density, sparse_update_mask
from trajinf.gradients.modules import tracked_modules
from trajinf.gradients.projection import factorized_k
from trajinf.models.checkpoints import CheckpointState

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def make_item(
    seed: int, length: int, n_steps: int = 3, weights: bool = False
) -> TokenizedTrajectory:
    """Prompt, then n_steps spans [gen-prompt token (no loss), action tokens], tool text between."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB - 1, length)  # VOCAB-1 is reserved for the NaN test
    step_ids = np.full(length, -1, np.int32)
    action = np.zeros(length, bool)
    bounds = np.linspace(4, length, n_steps + 1).astype(int)
    for s in range(n_steps):
        lo, hi = bounds[s], bounds[s] + max(2, (bounds[s + 1] - bounds[s]) // 2)
        step_ids[lo:hi] = 2 * s + 1  # original indices need not be 0..S-1
        action[lo + 1 : hi] = True
    w = rng.uniform(0.5, 2.0, length).astype(np.float32) * action if weights else None
    return TokenizedTrajectory(f"it{seed}", ids, action, step_ids, n_steps, weights=w)


def position_slots(step_ids: np.ndarray) -> np.ndarray:
    """Independent reference: position p -> step of token p+1, gaps to the previous step."""
    steps = sorted({int(s) for s in step_ids if s >= 0})
    owner, cur = [], 0
    for s in step_ids:
        if s >= 0:
            cur = steps.index(int(s))
        owner.append(cur)
    return np.array(owner[1:] + owner[-1:])


def exact_item_grads(model, items, names, normalization="mean") -> list[dict[str, torch.Tensor]]:
    """Per-example weight gradients, {param name: grad} per item (equal lengths batched)."""
    out: list[dict] = [{} for _ in items]
    for length in sorted({len(it.input_ids) for it in items}):
        idx = [i for i, it in enumerate(items) if len(it.input_ids) == length]
        ids = torch.stack([torch.from_numpy(items[i].input_ids) for i in idx])
        w = torch.stack([token_weights(items[i], normalization) for i in idx])
        grads = exact_weighted_grads(model, ids, w, names)
        for r, i in enumerate(idx):
            out[i] = {n: grads[n][r] for n in names}
    return out


def exact_step_grads(model, item, tracked) -> dict[str, torch.Tensor]:
    """Per-step gradients [S, out, in]: d loss / d (a copy of W used only at step s's positions)."""
    slots = torch.from_numpy(position_slots(item.step_ids))
    n_steps = int(slots.max()) + 1
    onehot = F.one_hot(slots, n_steps).float()  # [T, S]
    deltas = {
        t.name: torch.zeros(n_steps, t.out_features, t.in_features, requires_grad=True)
        for t in tracked
    }

    def hook_for(name):
        return lambda mod, inp, out: (
            out + torch.einsum("ts,soi,bti->bto", onehot, deltas[name], inp[0])
        )

    handles = [t.module.register_forward_hook(hook_for(t.name)) for t in tracked]
    try:
        ids = torch.from_numpy(item.input_ids)
        logits = model(ids.unsqueeze(0), use_cache=False).logits[0]
        loss = (nll_of(logits, ids) * token_weights(item)).sum()
        grads = torch.autograd.grad(loss, list(deltas.values()))
    finally:
        for h in handles:
            h.remove()
    return dict(zip(deltas, grads, strict=True))


ITEMS = [make_item(0, 40), make_item(1, 23, 2), make_item(2, 40, 4), make_item(3, 31, 1)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "lora"])
def test_features_equal_projected_exact_gradients(arch):
    model = tiny_model(arch)
    config = ExtractionConfig(proj_dim=512, batch_tokens=4096)
    tracked = tracked_modules(model)
    if arch == "lora":
        assert tracked and all(".lora_A." in t.name or ".lora_B." in t.name for t in tracked)
    feats = list(extract_features(model, ITEMS, config))
    assert len(feats[0].trajectory) == feature_dim(model, config)
    exact = exact_item_grads(model, ITEMS, [t.param_name for t in tracked])
    for it, f, g in zip(ITEMS, feats, exact, strict=True):
        mats = module_grads(tracked, g)  # G in [out, in]
        assert_close(f.trajectory, project_factorized(tracked, config, mats))
        steps = exact_step_grads(model, it, tracked)
        for t in tracked:  # the reference itself: step copies sum to the full gradient
            torch.testing.assert_close(steps[t.name].sum(0), mats[t.name], rtol=1e-4, atol=1e-6)
        assert_close(f.steps, project_factorized(tracked, config, steps))
        assert_close(f.steps.sum(0), f.trajectory, rtol=1e-5)
        assert f.finite and list(f.step_index) == sorted(set(it.step_ids[it.step_ids >= 0]))
        assert f.step_tokens.sum() == it.action_mask.sum()


def test_padding_and_batch_composition_invariance():
    model = tiny_model("llama")
    config = ExtractionConfig(proj_dim=256)
    target = make_item(7, 30, 3, weights=True)
    alone = next(extract_features(model, [target], config))
    crowd = [make_item(8, 60), target, make_item(9, 12, 1), make_item(10, 45)]
    mixed = list(extract_features(model, crowd, config))
    assert [f.index for f in mixed] == [0, 1, 2, 3] and mixed[1].id == target.id
    assert_close(mixed[1].trajectory, alone.trajectory, rtol=1e-5)
    assert_close(mixed[1].steps, alone.steps, rtol=1e-5)
    assert mixed[1].loss == pytest.approx(alone.loss, rel=1e-6)
    # a tiny token budget forces one item per batch: still the same features
    single = list(extract_features(model, crowd, ExtractionConfig(proj_dim=256, batch_tokens=1)))
    for a, b in zip(single, mixed, strict=True):
        assert_close(a.steps, b.steps, rtol=1e-5)


def test_determinism_and_seed():
    model = tiny_model("llama")
    a = list(extract_features(model, ITEMS, ExtractionConfig(proj_dim=256, seed=3)))
    b = list(extract_features(model, ITEMS[::-1], ExtractionConfig(proj_dim=256, seed=3)))[::-1]
    c = list(extract_features(model, ITEMS, ExtractionConfig(proj_dim=256, seed=4)))
    for x, y, z in zip(a, b, c, strict=True):
        assert_close(x.steps, y.steps, rtol=1e-5)
        assert not np.allclose(x.trajectory, z.trajectory, rtol=1e-2)


def test_loss_weights_and_normalization():
    model = tiny_model("qwen2")
    item = make_item(11, 35, 3)
    mean = next(extract_features(model, [item], ExtractionConfig(proj_dim=256)))
    summed = next(
        extract_features(model, [item], ExtractionConfig(proj_dim=256, loss_normalization="sum"))
    )
    assert_close(summed.steps, mean.steps * item.action_mask.sum())
    doubled = TokenizedTrajectory(
        item.id,
        item.input_ids,
        item.action_mask,
        item.step_ids,
        3,
        weights=np.full(35, 2.0, np.float32),
    )
    assert_close(
        next(extract_features(model, [doubled], ExtractionConfig(proj_dim=256))).steps,
        2 * mean.steps,
    )
    ids = torch.from_numpy(item.input_ids)
    with torch.no_grad():
        nll = nll_of(model(ids.unsqueeze(0)).logits[0], ids)
    assert mean.loss == pytest.approx(
        float(nll[torch.from_numpy(item.action_mask)].mean()), rel=1e-5
    )


def test_factored_adam_matches_formula():
    model = tiny_model("gpt2")
    tracked = tracked_modules(model)
    gen = torch.Generator().manual_seed(5)
    params = dict(model.named_parameters())
    v = {t.param_name: torch.rand(params[t.param_name].shape, generator=gen) ** 4 for t in tracked}
    eps = 1e-8
    state = CheckpointState(
        1, 1e-3, (0.9, 0.999), eps, 10, {n: torch.zeros_like(x) for n, x in v.items()}, v
    )
    config = ExtractionConfig(proj_dim=512, preconditioner="factored_adam")
    got = list(extract_features(model, ITEMS[:2], config, checkpoint_state=state))
    exact = exact_item_grads(model, ITEMS[:2], [t.param_name for t in tracked])
    for f, g in zip(got, exact, strict=True):
        mats = {}
        for t in tracked:
            vv = v[t.param_name].T  # Conv1D -> [out, in]
            a, b = vv.sum(1), vv.sum(0)
            r, c = a / a.sum().sqrt(), b / a.sum().sqrt()  # v ~ r c^T
            mats[t.name] = g[t.param_name].T / (
                (r.sqrt() + eps)[:, None] * (c.sqrt() + eps)[None, :]
            )
        assert_close(f.trajectory, project_factorized(tracked, config, mats))
    with pytest.raises(TrajinfError, match="checkpoint_state"):
        list(extract_features(model, ITEMS[:1], config))


def test_sparse_update_mask_rows_and_columns():
    model_a, model_b = tiny_model("llama"), tiny_model("llama")
    tracked = tracked_modules(model_a)
    target = tracked[2]
    with torch.no_grad():
        model_b.get_parameter(target.param_name)[3, 5] += 1e-3  # one element of one row/col
        model_b.get_parameter(target.param_name)[7, 1] += 1e-6  # below threshold
    mask = sparse_update_mask(model_a, model_b, threshold=1e-5)
    assert int(mask[target.param_name].sum()) == 1 and bool(mask[target.param_name][3, 5])
    n_total = sum(p.numel() for p in model_a.parameters())
    assert mask_density(mask) == pytest.approx(1 / n_total)
    # partial mask: only the target module is masked, the others are tracked fully
    partial = {target.param_name: mask[target.param_name]}
    config = ExtractionConfig(proj_dim=512)
    f = next(extract_features(model_b, ITEMS[:1], config, update_mask=partial))
    g = exact_item_grads(model_b, ITEMS[:1], [t.param_name for t in tracked])[0]
    mats = {t.name: g[t.param_name] for t in tracked}
    keep = torch.zeros_like(mats[target.name])
    keep[3, :] = 0
    keep[3, 5] = 1  # row 3 x column 5
    mats[target.name] = mats[target.name] * keep
    assert_close(f.trajectory, project_factorized(tracked, config, mats))


def test_nonfinite_item_is_isolated():
    model = tiny_model("llama")
    bad = make_item(20, 30)
    bad.input_ids[10] = VOCAB - 1

    def poison(module, inputs, output):  # NaN at the embedding of token VOCAB-1
        return output.masked_fill((inputs[0] == VOCAB - 1).unsqueeze(-1), float("nan"))

    good = [make_item(21, 30), make_item(22, 28)]
    config = ExtractionConfig(proj_dim=256)
    solo = [next(extract_features(model, [g], config)) for g in good]
    handle = model.get_input_embeddings().register_forward_hook(poison)
    try:
        out = list(extract_features(model, [good[0], bad, good[1]], config))
    finally:
        handle.remove()
    assert not out[1].finite and not out[1].trajectory.any() and not out[1].steps.any()
    for o, s in zip([out[0], out[2]], solo, strict=True):
        assert o.finite
        assert_close(o.steps, s.steps, rtol=1e-5)


def test_model_state_restored_and_hooks_removed():
    model = tiny_model("lora")
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    list(extract_features(model, ITEMS[:2], ExtractionConfig(proj_dim=128)))
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(not m._forward_hooks for m in model.modules())
    tracked = tracked_modules(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationGradientCollector(tracked, lambda t, x: None, lambda t, g: None):
            assert tracked[0].module._forward_hooks
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


def test_module_selection_and_config_errors():
    llama = tiny_model("llama")
    names = [t.name for t in tracked_modules(llama)]
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)
    assert [t.name for t in tracked_modules(llama, ["*.mlp.down_proj"])] == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    gpt2 = tracked_modules(tiny_model("gpt2"))
    assert len(gpt2) == 8 and all(t.transposed for t in gpt2)
    with pytest.raises(TrajinfError, match="modules"):
        tracked_modules(llama, ["nothing.*"])
    for bad in [dict(mode="x"), dict(preconditioner="adam"), dict(loss_normalization="avg")]:
        with pytest.raises(TrajinfError):
            list(extract_features(llama, ITEMS[:1], ExtractionConfig(**bad)))
    k = factorized_k(8192, 14)
    assert feature_dim(llama, ExtractionConfig()) == 14 * k * k


def test_item_without_actions_and_progress():
    model = tiny_model("llama")
    empty = TokenizedTrajectory(
        "empty", np.arange(1, 21), np.zeros(20, bool), np.full(20, -1, np.int32), 0
    )
    calls: list[int] = []
    out = list(
        extract_features(
            model, [ITEMS[0], empty], ExtractionConfig(proj_dim=128), progress=calls.append
        )
    )
    assert sum(calls) == 2
    assert not out[1].finite and out[1].steps.shape == (0, out[1].trajectory.shape[0])
    alone = next(extract_features(model, ITEMS[:1], ExtractionConfig(proj_dim=128)))
    assert out[0].finite
    assert_close(out[0].steps, alone.steps, rtol=1e-5)
