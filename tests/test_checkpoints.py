"""Checkpoint save/load round trips: weights, optimizer moments, LoRA adapters, fingerprints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from grad_oracles import tiny_model
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import extract_features
from trajinf.models.checkpoints import (
    load_checkpoint_state,
    load_model,
    model_fingerprint,
    save_checkpoint,
    tokenizer_fingerprint,
)
from trajinf.models.lora import wrap_lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
VOCAB = 50


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1} | {f"w{i}": i + 2 for i in range(VOCAB - 2)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def llama() -> torch.nn.Module:
    """The tiny Llama with the default init std (0.02) on this file's vocabulary."""
    return tiny_model("llama", vocab=VOCAB, init_std=0.02)


def train_steps(model, n=2, lr=1e-3):
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.8, 0.99), eps=1e-7
    )
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_full_model_round_trip(tmp_path):
    model, tok = llama(), tokenizer()
    opt = train_steps(model)
    path = tmp_path / "ckpt-1"
    save_checkpoint(model, tok, opt, path, step=7, learning_rate=1e-3)
    assert json.loads((path / "trajinf_checkpoint.json").read_text()) == {
        "step": 7,
        "learning_rate": 1e-3,
        "betas": [0.8, 0.99],
        "eps": 1e-7,
        "optimizer_step": 2,
    }
    loaded, loaded_tok = load_model(path)
    for (n, p), (n2, p2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert n == n2 and torch.equal(p, p2)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    state = load_checkpoint_state(path)
    assert state.betas == (0.8, 0.99) and state.optimizer_step == 2 and state.step == 7
    names = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert sorted(state.exp_avg) == sorted(names) == sorted(state.exp_avg_sq)
    for n, p in model.named_parameters():
        assert torch.equal(state.exp_avg[n], opt.state[p]["exp_avg"])
        assert torch.equal(state.exp_avg_sq[n], opt.state[p]["exp_avg_sq"])
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert tokenizer_fingerprint(loaded_tok) == tokenizer_fingerprint(tok)


def test_lora_adapter_round_trip_and_extraction(tmp_path):
    model = wrap_lora(llama(), rank=4)
    opt = train_steps(model)
    path = tmp_path / "lora"
    save_checkpoint(model, tokenizer(), opt, path, step=1, learning_rate=1e-3)
    assert (path / "adapter_config.json").is_file() and (path / "base" / "config.json").is_file()
    loaded, _ = load_model(path)
    assert isinstance(loaded, PeftModel)
    trainable = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    original = dict(model.named_parameters())
    for n, p in loaded.named_parameters():
        assert torch.equal(p, original[n]), n
    state = load_checkpoint_state(path)
    assert sorted(state.exp_avg) == sorted(trainable)
    # the saved moments drive both preconditioners by parameter name
    pos = np.arange(20)
    ids = np.random.default_rng(0).integers(1, VOCAB, 20)
    item = TokenizedTrajectory("a", ids, pos >= 11, np.where(pos >= 10, 0, -1).astype(np.int32), 1)
    for cfg in [
        ExtractionConfig(proj_dim=128, preconditioner="factored_adam"),
        ExtractionConfig(mode="less", proj_dim=32, preconditioner="adam"),
    ]:
        f = next(extract_features(loaded, [item], cfg, checkpoint_state=state))
        assert f.finite and f.trajectory.any()


def test_load_model_wraps_lora_and_overwrite_is_atomic(tmp_path):
    gpt2 = tiny_model("gpt2", vocab=VOCAB, init_std=0.02)
    for name, model, targets in [
        # one LoRA config for training and scoring: attention and MLP projections
        ("g", gpt2, {"c_attn", "c_proj", "c_fc"}),
        (
            "l",
            llama(),
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        ),
    ]:
        save_checkpoint(model, tokenizer(), None, tmp_path / name, step=0, learning_rate=0.0)
        save_checkpoint(model, tokenizer(), None, tmp_path / name, step=1, learning_rate=0.0)
        assert load_checkpoint_state(tmp_path / name) is None
        wrapped, _ = load_model(tmp_path / name, lora=True, lora_rank=2)
        lora_parents = {
            n.split(".lora_A")[0].rsplit(".", 1)[-1]
            for n, _ in wrapped.named_parameters()
            if ".lora_A." in n
        }
        assert lora_parents == targets
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "l"]  # no temp dirs left


def test_fingerprints_change_with_weights():
    model = llama()
    before = model_fingerprint(model)
    assert before == model_fingerprint(llama())
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != before
    other = tokenizer()
    other.add_tokens(["extra"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer())
