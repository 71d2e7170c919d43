"""TRL / transformers Trainer integration, with the real libraries on tiny models.

- SFTTrainer + WarmupCheckpointCallback -> checkpoints that score like trajinf's own trainer's.
- The recorded lr is the one the optimizer used (checked against the AdamW update itself).
- A weight-0 step adds no gradient through the TRL path (full fine-tuning and LoRA).
- Gradient accumulation gives the step of one larger batch; a non-Adam optimizer is refused or
  saved without moments.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from peft import LoraConfig, get_peft_model  # noqa: E402
from trl import SFTConfig  # noqa: E402

from trajinf.data.tokenize import tokenize_trajectory  # noqa: E402
from trajinf.data.trajectories import load_pool  # noqa: E402
from trajinf.errors import TrajinfError  # noqa: E402
from trajinf.integrations import (
    TrajectoryCollator,
    WarmupCheckpointCallback,
    WeightedTrainer,
    to_dataset,
    weighted_loss,
)
from trajinf.integrations.sft_trainer import WeightedSFTTrainer
from trajinf.job.config import build_job_config  # noqa: E402
from trajinf.job.run import score_pool  # noqa: E402
from trajinf.models.checkpoints import load_checkpoint_state, load_model  # noqa: E402
from trajinf.models.tiny import tiny_model  # noqa: E402
from trajinf.train.sft import TrainConfig, train_sft  # noqa: E402

# Scores of the two trainers' checkpoints agree to this, in units of the summed checkpoint lr (a
# score is the lr-weighted sum of cosines, each in [-1, 1]; features are stored in float16, whose
# relative rounding is 2^-11 ~ 5e-4, so equal features give bit-equal rows most of the time).
SCORE_TOL = 1e-5


def _weighted(records: list[dict]) -> list[dict]:
    """Step weights on two trajectories: soft, zero and one weights."""
    recs = copy.deepcopy(records)
    for rec, weights in ((recs[0], [1.0, 0.0, 0.5, 1.0]), (recs[4], [0.0, 1.0, 1.0])):
        actions = [m for m in rec["messages"] if m["role"] == "assistant"]
        for m, w in zip(actions, weights, strict=True):
            m["weight"] = w
    return recs


def _model(tok, lora: bool):
    model = tiny_model(tok, hidden=32, layers=1, heads=2, seed=0)
    if lora:
        cfg = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = get_peft_model(model, cfg)
    return model


def _args(out: Path, **kw) -> SFTConfig:
    base = dict(
        per_device_train_batch_size=8, num_train_epochs=3, learning_rate=1e-3,
        lr_scheduler_type="constant", optim="adamw_torch", max_grad_norm=1.0, weight_decay=0.0,
        bf16=False, use_cpu=True, report_to=[], save_strategy="no", gradient_checkpointing=False,
        disable_tqdm=True, logging_strategy="no", seed=0, max_length=None,
    )  # fmt: skip
    return SFTConfig(str(out), **{**base, **kw})


def _trl_run(tmp: Path, model, tok, ds, cb, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL / transformers deprecation chatter
        trainer = WeightedSFTTrainer(
            model, args=_args(tmp / "run", **kw), train_dataset=ds, processing_class=tok,
            callbacks=[cb] if cb else None,
        )  # fmt: skip
        trainer.train()
    return trainer


def _moment_diff(a, b) -> float:
    """Largest |a - b| of any moment tensor, relative to that tensor's largest |b|."""
    out = 0.0
    for name in ("exp_avg", "exp_avg_sq"):
        ma, mb = getattr(a, name), getattr(b, name)
        assert ma.keys() == mb.keys()
        for k in ma:
            scale = float(mb[k].abs().max()) or 1.0
            out = max(out, float((ma[k] - mb[k]).abs().max()) / scale)
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trl_checkpoints_score_like_trajinf_trainer(
    tmp_path, chatml_tokenizer, tool_pool_records, lora
):
    """SFTTrainer (WeightedSFTTrainer) and train_sft on the same data, seed and hyperparameters:
    one batch holding every trajectory (so data order cannot differ), AdamW, constant lr, grad
    clip 1.0, 3 steps. The checkpoints saved at steps 1 and 3 carry the same lr and step, AdamW
    moments equal to 1e-5 relative, and the scoring job gives the same trajectory and step
    scores to SCORE_TOL (measured, in units of the summed lr: trajectory scores 6e-8 full /
    4e-7 LoRA, step scores 5e-7 / 5e-7; scores themselves reach 0.47 / 0.18)."""
    tok = chatml_tokenizer
    pool = load_pool(_weighted(tool_pool_records))
    target = load_pool(copy.deepcopy(tool_pool_records[1:3]))
    base = _model(tok, lora)
    base_dir = tmp_path / "model"  # the --model the run started from
    (base.get_base_model() if lora else base).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    cb = WarmupCheckpointCallback(tmp_path / "trl", save_steps=[1, 3])
    _trl_run(tmp_path, copy.deepcopy(base), tok, to_dataset(pool), cb)
    own = train_sft(
        copy.deepcopy(base), tok, pool,
        TrainConfig(epochs=3, lr=1e-3, batch_size=8, warmup_ratio=0.0, scheduler="constant", seed=0),
        checkpoint_dir=tmp_path / "own", n_checkpoints=3,
    )  # fmt: skip
    own_dirs = [own.checkpoints[0]["path"], own.checkpoints[2]["path"]]
    assert [p.name for p in cb.checkpoints] == ["step-1", "step-3"]
    index = json.loads((tmp_path / "trl" / "checkpoints.json").read_text())["checkpoints"]
    assert [c["step"] for c in index] == [1, 3]
    for mine, theirs in zip(cb.checkpoints, own_dirs, strict=True):
        a, b = load_checkpoint_state(mine), load_checkpoint_state(theirs)
        assert (a.step, a.optimizer_step, a.learning_rate) == (
            b.step,
            b.optimizer_step,
            b.learning_rate,
        )
        assert _moment_diff(a, b) < 1e-5
        assert (Path(mine) / "adapter_config.json").is_file() == lora

    cfg = build_job_config(proj_dim=256, has_checkpoints=True, subtask_field="task_id")
    cfg = replace(cfg, baselines=False, null_directions=4)
    trl_out = score_pool(
        base_dir, pool, target, tmp_path / "s-trl", checkpoints=cb.checkpoints, config=cfg
    )
    own_out = score_pool(
        base_dir, pool, target, tmp_path / "s-own", checkpoints=own_dirs, config=cfg
    )
    lr_sum = sum(c["learning_rate"] for c in cb.saved)  # scores are in units of this
    a = trl_out.trajectories.set_index("id")["score"] / lr_sum
    b = own_out.trajectories.set_index("id").loc[a.index, "score"] / lr_sum
    print("max |score| / lr_sum:", float(a.abs().max()))
    assert np.isfinite(a).all() and a.abs().max() > 100 * SCORE_TOL
    print("max trajectory score difference / lr_sum:", float((a - b).abs().max()))
    np.testing.assert_allclose(a, b, rtol=0, atol=SCORE_TOL)
    sa = trl_out.steps.set_index(["id", "step"])["score"] / lr_sum
    sb = own_out.steps.set_index(["id", "step"]).loc[sa.index, "score"] / lr_sum
    print("max step score difference / lr_sum:", float((sa - sb).abs().max()))
    np.testing.assert_allclose(sa, sb, rtol=0, atol=SCORE_TOL)
    # the tolerance is tight enough to tell checkpoints apart: the last checkpoint alone scores
    # differently by far more than SCORE_TOL
    last = score_pool(
        base_dir, pool, target, tmp_path / "s-last", checkpoints=cb.checkpoints[1:], config=cfg
    )
    other = last.trajectories.set_index("id").loc[a.index, "score"] / lr_sum
    print("last checkpoint alone, max difference / lr_sum:", float((other - a).abs().max()))
    assert float((other - a).abs().max()) > 10 * SCORE_TOL


def test_recorded_lr_is_the_one_the_step_used(tmp_path, chatml_tokenizer, tool_pool_records):
    """Linear warmup (2 steps) then decay over 4 steps: lr 0 at step 1 (so weights do not move),
    then the AdamW update between the saved steps 1 and 2 is exactly -lr_2 * m_hat / (sqrt(v_hat)
    + eps) with the recorded lr_2 and moments."""
    tok = chatml_tokenizer
    pool = load_pool(copy.deepcopy(tool_pool_records))
    base = _model(tok, False)
    cb = WarmupCheckpointCallback(tmp_path / "ck", save_steps=[1, 2, 3, 4])
    _trl_run(
        tmp_path, copy.deepcopy(base), tok, to_dataset(pool), cb, num_train_epochs=4,
        lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=0.0,
    )  # fmt: skip
    lrs = [c["learning_rate"] for c in cb.saved]
    w, n = 2, 4  # transformers' linear schedule: s / w during warmup, then (n - s) / (n - w)
    expected = [1e-3 * (s / w if s < w else (n - s) / (n - w)) for s in range(n)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    m0 = dict(base.named_parameters())
    m1, _ = load_model(cb.checkpoints[0])
    m2, _ = load_model(cb.checkpoints[1])
    st = load_checkpoint_state(cb.checkpoints[1])
    b1, b2 = st.betas
    for name, p1 in m1.named_parameters():
        torch.testing.assert_close(p1, m0[name], rtol=0, atol=0)  # lr 0 at step 1
        m_hat = st.exp_avg[name] / (1 - b1**2)
        v_hat = st.exp_avg_sq[name] / (1 - b2**2)
        step = -st.learning_rate * m_hat / (v_hat.sqrt() + st.eps)
        delta = dict(m2.named_parameters())[name] - p1
        # atol: float32 rounding of weights of magnitude ~1 (the update is ~5e-4)
        torch.testing.assert_close(delta, step, rtol=1e-4, atol=2e-7)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def _trl_grad(
    tmp: Path, model, tok, records, trainer_cls=WeightedSFTTrainer, batch: int | None = None, **kw
) -> torch.Tensor:
    """Gradient of one optimizer step's loss through the trainer's own batching and loss."""
    ds = to_dataset(load_pool(records))
    batch = batch or len(records)
    args = _args(tmp, per_device_train_batch_size=batch, **kw)
    if trainer_cls is WeightedTrainer:
        from transformers import TrainingArguments

        args = TrainingArguments(
            str(tmp), use_cpu=True, report_to=[], per_device_train_batch_size=batch
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model, args=args, train_dataset=ds, processing_class=tok)
    steps = trainer.args.gradient_accumulation_steps
    batches, total = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), steps, "cpu")
    assert len(batches) == steps
    model.zero_grad(set_to_none=True)
    for b in batches:
        trainer.training_step(model, b, total)
    return _grads(model)


def _reference_grad(model, tok, records, drop: tuple[int, int]) -> torch.Tensor:
    """Gradient of sum(w * CE) / sum(w) over action tokens from full logits, with the steps in
    ``drop`` = (trajectory index, step index) taken out of the loss (not out of the context)."""
    trajs = load_pool(records)
    num = torch.zeros(())
    den = 0.0
    for i, t in enumerate(trajs):
        it = tokenize_trajectory(t, tok)
        ids = torch.as_tensor(it.input_ids)[None]
        logits = model(input_ids=ids).logits[0, :-1]
        ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        w = torch.as_tensor(it.action_mask[1:], dtype=torch.float32)
        if it.weights is not None:
            w = w * torch.as_tensor(it.weights[1:])
        if i == drop[0]:
            w = w * torch.as_tensor(it.step_ids[1:] != drop[1], dtype=torch.float32)
        num = num + (w * ce).sum()
        den += float(w.sum())
    model.zero_grad(set_to_none=True)
    (num / den).backward()
    return _grads(model)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_weight_zero_step_adds_no_gradient_through_trl(
    tmp_path, chatml_tokenizer, tool_pool_records, lora
):
    """Step 1 of trajectory 0 with weight 0: the TRL path's gradient equals the gradient of the
    loss with that step removed (full logits, explicit mask) to float32 rounding, and differs
    from the gradient with the step kept by far more than that."""
    tok = chatml_tokenizer
    records = copy.deepcopy(tool_pool_records[:3])
    model = _model(tok, lora)
    keep = _trl_grad(tmp_path / "a", model, tok, records)
    actions = [m for m in records[0]["messages"] if m["role"] == "assistant"]
    for k, m in enumerate(actions):
        m["weight"] = 0.0 if k == 1 else 1.0
    zero = _trl_grad(tmp_path / "b", model, tok, records)
    ref = _reference_grad(model, tok, records, drop=(0, 1))
    scale = float(ref.abs().max())
    assert float((zero - ref).abs().max()) < 1e-5 * scale
    assert float((keep - zero).abs().max()) > 1e-2 * scale
    # the plain transformers Trainer variant runs the same loss
    plain = _trl_grad(tmp_path / "c", model, tok, records, trainer_cls=WeightedTrainer)
    assert float((plain - ref).abs().max()) < 1e-5 * scale


def test_gradient_accumulation_is_one_larger_batch(tmp_path, chatml_tokenizer, tool_pool_records):
    """Two micro-batches of 3 (accumulated) give the gradient of one batch of 6, soft weights
    included (the weight sum of the whole step normalizes the loss)."""
    tok = chatml_tokenizer
    records = _weighted(tool_pool_records)
    model = _model(tok, False)
    one = _trl_grad(tmp_path / "a", model, tok, records)
    acc = _trl_grad(tmp_path / "b", model, tok, records, batch=3, gradient_accumulation_steps=2)
    scale = float(one.abs().max())
    assert float((one - acc).abs().max()) < 1e-5 * scale
    # the mean of the two micro-batch means (each normalized by its own weight sum) differs
    collate = TrajectoryCollator(tok)
    rows = to_dataset(load_pool(records))
    model.zero_grad(set_to_none=True)
    for part in (range(0, 3), range(3, 6)):
        (weighted_loss(model, collate([rows[i] for i in part])) / 2).backward()
    assert float((_grads(model) - one).abs().max()) > 1e-3 * scale


def test_trl_peft_config_and_epoch_saves(tmp_path, chatml_tokenizer, tool_pool_records):
    """SFTTrainer wrapping the model itself (peft_config), TRL's default fused AdamW, and the
    callback's default: one checkpoint per epoch, each an adapter that load_model reloads with the
    trained LoRA weights and moments for exactly the trained parameters."""
    tok = chatml_tokenizer
    pool = load_pool(copy.deepcopy(tool_pool_records))
    cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], task_type="CAUSAL_LM"
    )
    cb = WarmupCheckpointCallback(tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = WeightedSFTTrainer(
            tiny_model(tok, hidden=32, layers=1, heads=2, seed=0), args=_args(
                tmp_path / "run", num_train_epochs=2, per_device_train_batch_size=3,
                optim="adamw_torch_fused",  # TRL's default
            ),
            train_dataset=to_dataset(pool), processing_class=tok, peft_config=cfg, callbacks=[cb],
        )  # fmt: skip
        trainer.train()
    assert [c["step"] for c in cb.saved] == [2, 4] and [c["epoch"] for c in cb.saved] == [1.0, 2.0]
    model, _ = load_model(cb.checkpoints[-1])
    state = load_checkpoint_state(cb.checkpoints[-1])
    trained = dict(trainer.model.named_parameters())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and set(names) == set(state.exp_avg)
    for n in names:
        torch.testing.assert_close(dict(model.named_parameters())[n], trained[n].detach())


def test_non_adam_optimizer_is_refused_or_saved_without_moments(
    tmp_path, chatml_tokenizer, tool_pool_records
):
    tok = chatml_tokenizer
    ds = to_dataset(load_pool(copy.deepcopy(tool_pool_records)))
    model = _model(tok, False)
    with pytest.raises(TrajinfError, match="no Adam moments.*require_adam=False"):
        _trl_run(
            tmp_path,
            copy.deepcopy(model),
            tok,
            ds,
            WarmupCheckpointCallback(tmp_path / "a", [1]),
            optim="sgd",
            num_train_epochs=1,
        )
    cb = WarmupCheckpointCallback(tmp_path / "b", [1], require_adam=False)
    with pytest.warns(UserWarning, match="--preconditioner none"):
        trainer = WeightedSFTTrainer(
            copy.deepcopy(model), args=_args(tmp_path / "run", optim="sgd", num_train_epochs=1),
            train_dataset=ds, processing_class=tok, callbacks=[cb],
        )  # fmt: skip
        trainer.train()
    assert cb.saved[0]["moments"] is False
    assert not (cb.checkpoints[0] / "optimizer.safetensors").exists()
    assert load_checkpoint_state(cb.checkpoints[0]) is None
    assert (
        json.loads((cb.checkpoints[0] / "trajinf_checkpoint.json").read_text())["learning_rate"]
        == 1e-3
    )


def test_dataset_and_collator_round_trip(
    tmp_path, chatml_tokenizer, tool_pool_records, write_jsonl
):
    """to_dataset keeps the selection's weights (or applies step_weights) and drops trajectories
    whose steps all weigh 0; the collator's loss weights equal train_sft's for the same data."""
    from trajinf.train.sft import collate

    recs = _weighted(tool_pool_records)
    recs[2]["messages"][2]["weight"] = 1  # an int weight next to float ones
    path = write_jsonl(tmp_path, recs, "sel.jsonl")
    ds = to_dataset(path)
    assert len(ds) == len(recs) and set(ds.column_names) >= {"messages", "tools", "id"}
    weights = [m["weight"] for m in ds[0]["messages"] if m["role"] == "assistant"]
    assert weights == [1.0, 0.0, 0.5, 1.0]
    trajs = load_pool(recs)
    with pytest.warns(UserWarning, match="all weigh 0"):
        fewer = to_dataset(trajs, step_weights={trajs[1].id: [0.0, 0.0, 0.0]})
    assert trajs[1].id not in fewer["id"] and len(fewer) == len(recs) - 1
    batch = TrajectoryCollator(chatml_tokenizer)([ds[i] for i in range(len(ds))])
    items = [tokenize_trajectory(t, chatml_tokenizer) for t in trajs]
    ref = collate(items, chatml_tokenizer.pad_token_id)
    torch.testing.assert_close(batch["input_ids"], ref.input_ids)
    torch.testing.assert_close(batch["loss_weights"], ref.loss_weights)
    assert ((batch["labels"] == -100) == (ref.loss_weights == 0)).all()
    with pytest.raises(TrajinfError, match="no 'messages' column"):
        TrajectoryCollator(chatml_tokenizer)([{"input_ids": [1, 2]}])


@pytest.mark.parametrize("trainer_cls", [WeightedSFTTrainer, WeightedTrainer])
def test_evaluation_loss_is_the_weighted_loss(
    tmp_path, chatml_tokenizer, tool_pool_records, trainer_cls
):
    """evaluate() on soft-weighted rows (one batch) reports sum(w * CE) / sum(w)."""
    from transformers import TrainingArguments

    tok = chatml_tokenizer
    ds = to_dataset(load_pool(_weighted(tool_pool_records)))
    model = _model(tok, False)
    if trainer_cls is WeightedSFTTrainer:
        args = _args(tmp_path, per_device_eval_batch_size=len(ds))
    else:
        args = TrainingArguments(
            str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=len(ds)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model, args=args, train_dataset=ds, processing_class=tok)
        got = trainer.evaluate(ds)["eval_loss"]
    with torch.no_grad():
        want = float(weighted_loss(model, TrajectoryCollator(tok)([ds[i] for i in range(len(ds))])))
    assert got == pytest.approx(want, rel=1e-5)
