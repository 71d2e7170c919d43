"""train.py: masked weighted loss, learning, determinism, warmup checkpoints, LoRA, batching."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trajinf.data.schema import Trajectory
from trajinf.data.tokenize import TokenizedTrajectory, tokenize_pool
from trajinf.errors import TrajinfError
from trajinf.models.tiny import tiny_model
from trajinf.train.sft import (
    TrainConfig,
    checkpoint_steps,
    collate,
    length_bucketed_batches,
    lr_factor,
    sft_loss,
    train_sft,
)

VOCAB = 48
FAST = TrainConfig(epochs=2, lr=1e-2, batch_size=4, warmup_ratio=0.0, scheduler="constant")


def _item(tid: str, n: int, spans: list[tuple[int, int, float]], seed: int) -> TokenizedTrajectory:
    """Random tokens with action spans [(start, end, weight)] as steps 0, 1, ..."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    steps = np.full(n, -1, dtype=np.int32)
    weights = np.zeros(n, dtype=np.float32)
    for k, (a, b, w) in enumerate(spans):
        mask[a:b], steps[a:b], weights[a:b] = True, k, w
    return TokenizedTrajectory(
        id=tid,
        input_ids=rng.integers(1, VOCAB, n).astype(np.int64),
        action_mask=mask,
        step_ids=steps,
        n_steps=len(spans),
        weights=weights,
    )


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sft_loss_is_hand_masked_weighted_ce():
    model = tiny_model(VOCAB, hidden=32, layers=2, heads=4, seed=0)
    items = [_item("a", 12, [(3, 6, 1.0), (8, 12, 0.5)], 0), _item("b", 9, [(4, 9, 2.0)], 1)]
    batch = collate(items, pad_token_id=0)
    assert batch.input_ids.shape == (2, 12) and batch.attention_mask[1, 9:].sum() == 0
    got = sft_loss(model, batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch.input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(2, -1)
    want = torch.zeros(2, 12)
    want[:, 1:] = ce * batch.loss_weights[:, 1:]
    assert torch.allclose(got, want, atol=1e-5)
    assert got[0, :3].abs().sum() == 0 and got[1, 9:].abs().sum() == 0  # prompt, padding
    expected_w = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0.5, 0.5, 0.5, 0.5])
    assert torch.equal(batch.loss_weights[0], expected_w)


def test_weight_zero_step_contributes_zero_gradient():
    model = tiny_model(VOCAB, hidden=32, layers=2, heads=4, seed=0)
    zero = _item("a", 14, [(3, 6, 1.0), (9, 14, 0.0)], 0)
    only_first = _item("a", 14, [(3, 6, 1.0)], 0)  # same tokens, second step not an action
    for item in (zero, only_first):
        batch = collate([item], 0)
        model.zero_grad()
        (sft_loss(model, batch).sum() / batch.loss_weights.sum()).backward()
        item.grads = _grads(model)  # type: ignore[attr-defined]
    for name, g in zero.grads.items():  # type: ignore[attr-defined]
        assert torch.allclose(g, only_first.grads[name], atol=1e-7), name  # type: ignore[attr-defined]


def test_action_only_false_counts_every_token_but_the_first():
    batch = collate([_item("a", 8, [(5, 8, 1.0)], 0)], 0, action_only=False)
    assert batch.loss_weights.tolist() == [[0, 1, 1, 1, 1, 1, 1, 1]]


def _records(n: int) -> list[Trajectory]:
    out = []
    for i in range(n):
        item = ["apple", "key", "coin", "lamp"][i % 4]
        out.append(
            Trajectory(
                id=f"t{i}",
                messages=[
                    {"role": "system", "content": "You are an agent in a text world."},
                    {"role": "user", "content": f"Goal: take the {item}. You are in the kitchen."},
                    {"role": "assistant", "content": f"take {item}"},
                    {"role": "user", "content": f"You take the {item}."},
                    {"role": "assistant", "content": "inventory"},
                ],
            )
        )
    return out


@pytest.fixture(scope="module")
def items(chatml_tokenizer):
    return tokenize_pool(_records(8), chatml_tokenizer)


def test_training_drives_action_loss_down(chatml_tokenizer, items):
    model = tiny_model(chatml_tokenizer, hidden=64, layers=2, heads=4, seed=0)
    cfg = TrainConfig(epochs=8, lr=1e-2, batch_size=4, warmup_ratio=0.1, scheduler="cosine")
    res = train_sft(model, chatml_tokenizer, items, cfg)
    assert res.steps == 16 and len(res.losses) == 16
    assert np.mean(res.losses[-4:]) < 0.3 * np.mean(res.losses[:2])
    n_tokens = sum(len(it.input_ids) for it in items)
    assert res.tokens_seen == 8 * n_tokens
    assert res.action_tokens_seen == 8 * sum(int(it.action_mask.sum()) for it in items)
    assert not res.model.training


def test_accepts_trajectories_and_is_deterministic(chatml_tokenizer):
    trajs = _records(6)

    def run(seed: int) -> dict[str, torch.Tensor]:
        model = tiny_model(chatml_tokenizer, hidden=32, layers=1, heads=2, seed=0)
        train_sft(model, chatml_tokenizer, trajs, replace(FAST, seed=seed))
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another batch order


def test_global_rng_and_determinism_flags_untouched(chatml_tokenizer, items):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    flag = torch.are_deterministic_algorithms_enabled()
    model = tiny_model(chatml_tokenizer, hidden=32, layers=1, heads=2, seed=0)
    train_sft(model, chatml_tokenizer, items[:4], replace(FAST, epochs=1))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.are_deterministic_algorithms_enabled() == flag


def test_zero_action_items_skipped_with_warning(chatml_tokenizer, items):
    dead = _item("dead", 10, [(3, 6, 0.0)], 0)
    model = tiny_model(chatml_tokenizer, hidden=32, layers=1, heads=2, seed=0)
    with pytest.warns(UserWarning, match="skipping 1"):
        res = train_sft(model, chatml_tokenizer, [*items[:4], dead], replace(FAST, epochs=1))
    assert res.skipped == ["dead"] and res.steps == 1


def test_warmup_checkpoints_store_lr_and_moments(chatml_tokenizer, items, tmp_path):
    from trajinf.models.checkpoints import load_checkpoint_state, load_model

    model = tiny_model(chatml_tokenizer, hidden=32, layers=1, heads=2, seed=0)
    cfg = TrainConfig(epochs=4, lr=5e-3, batch_size=4, warmup_ratio=0.25, scheduler="linear")
    res = train_sft(model, chatml_tokenizer, items, cfg, checkpoint_dir=tmp_path, n_checkpoints=4)
    assert [c["step"] for c in res.checkpoints] == [2, 4, 6, 8]  # ends of the 4 epochs
    lrs = [c["lr"] for c in res.checkpoints]
    assert lrs == [
        pytest.approx(cfg.lr * lr_factor(s - 1, 8, 0.25, "linear")) for s in (2, 4, 6, 8)
    ]
    assert all(lr > 0 for lr in lrs)
    state = load_checkpoint_state(res.checkpoints[-1]["path"])
    assert state is not None and state.step == 8 and state.learning_rate == pytest.approx(lrs[-1])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state.exp_avg) == names and set(state.exp_avg_sq) == names
    assert all(float(v.min()) >= 0 for v in state.exp_avg_sq.values())
    loaded, tok = load_model(res.checkpoints[-1]["path"])
    ids = torch.as_tensor(items[0].input_ids)[None]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert tok.chat_template == chatml_tokenizer.chat_template


def test_lora_trains_only_adapters(chatml_tokenizer, items):
    model = tiny_model(chatml_tokenizer, hidden=32, layers=2, heads=2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = replace(FAST, lora=True, lora_rank=4, lr=2e-2)
    res = train_sft(model, chatml_tokenizer, items, cfg)
    trainable = [n for n, p in res.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("mlp" in n for n in trainable) and any("self_attn" in n for n in trainable)
    base = res.model.get_base_model()
    lora_b = [p for n, p in base.named_parameters() if "lora_B" in n]
    assert any(float(p.detach().abs().sum()) > 0 for p in lora_b)  # B starts at 0: it moved
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(p, before[key]), name
    assert res.losses[-1] < res.losses[0]


def test_batches_bucketed_deterministic_and_complete():
    lengths = [5, 50, 7, 48, 6, 52, 9, 47, 8, 51, 10, 49]
    b1 = length_bucketed_batches(lengths, 2, seed=0, epoch=0)
    assert b1 == length_bucketed_batches(lengths, 2, seed=0, epoch=0)
    assert b1 != length_bucketed_batches(lengths, 2, seed=0, epoch=1)
    assert sorted(i for b in b1 for i in b) == list(range(12))
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 3 for b in b1)
    capped = length_bucketed_batches(lengths, 8, seed=0, epoch=0, batch_tokens=100)
    assert all(max(lengths[i] for i in b) * len(b) <= 100 or len(b) == 1 for b in capped)


def test_schedule_and_checkpoint_steps():
    assert lr_factor(0, 10, 0.2, "linear") == pytest.approx(1 / 3)
    assert lr_factor(2, 10, 0.2, "linear") == 1.0
    assert lr_factor(9, 10, 0.2, "linear") == pytest.approx(1 / 8)
    assert lr_factor(2, 10, 0.2, "cosine") == 1.0
    assert lr_factor(9, 10, 0.0, "constant") == 1.0
    with pytest.raises(TrajinfError, match="scheduler"):
        lr_factor(5, 10, 0.0, "exp")
    assert checkpoint_steps(12, 4) == [3, 6, 9, 12]
    assert checkpoint_steps(3, 4) == [1, 2, 3]
    assert checkpoint_steps(10, 0) == []


def test_config_errors(chatml_tokenizer, items):
    model = tiny_model(chatml_tokenizer, hidden=32, layers=1, heads=2, seed=0)
    with pytest.raises(TrajinfError, match="checkpoint_dir"):
        train_sft(model, chatml_tokenizer, items, FAST, n_checkpoints=2)
    with pytest.raises(TrajinfError, match="epochs"):
        train_sft(model, chatml_tokenizer, items, replace(FAST, epochs=0))
    assert TrainConfig().to_dict()["betas"] == [0.9, 0.999]
