"""Supervised fine-tuning on trajectories: action-only, per-step-weighted loss; LoRA; warmup checkpoints.

The loss of a batch is the weighted mean over action tokens,
``sum_t w_t * CE_t / sum_t w_t``, where ``w_t = action_mask[t] * weights[t]`` (``weights`` come
from per-message ``"weight"`` fields, see ``tokenize.py``). A step whose weight is 0 adds nothing to
the numerator nor the denominator, so it contributes exactly zero gradient.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.loss import ActionNLL
from trajinf.models.lora import wrap_lora

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune. Frozen: derive variants with ``dataclasses.replace``."""

    epochs: int = 3  # passes over the training set
    lr: float = 1e-3  # peak learning rate (AdamW)
    batch_size: int = 8  # max trajectories per batch
    batch_tokens: int | None = None  # optional cap on padded tokens per batch (B * T_max)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (recorded in checkpoints)
    eps: float = 1e-8  # AdamW eps
    warmup_ratio: float = 0.1  # fraction of optimizer steps with linear lr warmup from 0
    scheduler: str = "linear"  # decay after warmup: "linear" | "cosine" | "constant"
    seed: int = 0  # batch order, dropout and LoRA init
    max_length: int | None = None  # left-truncate longer trajectories (whole steps)
    lora: bool = False  # train LoRA adapters (peft) instead of all weights
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: 2 * lora_rank (the models.lora default)
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    action_only: bool = True  # loss on assistant tokens only (False: every token after the first)
    log_every: int = 10  # log the running loss every N optimizer steps (0 = never)

    def to_dict(self) -> dict:
        """Plain-JSON dict of the config (for metadata files)."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    """What ``train_sft`` returns."""

    model: torch.nn.Module  # the trained model (a peft model when ``config.lora``)
    losses: list[float]  # mean weighted action loss of each optimizer step
    wall_time: float  # seconds
    tokens_seen: int  # non-padding tokens processed (over all epochs)
    action_tokens_seen: int  # tokens with nonzero loss weight processed
    steps: int  # optimizer steps taken
    checkpoints: list[dict] = field(default_factory=list)  # [{"path", "lr", "step"}]
    skipped: list[str] = field(default_factory=list)  # ids with no action token to learn from


# Demo settings, measured on the built-in ToolWorld (expert rollouts with_tools=False, ~290
# tokens each; tokenizer trained on the pool's texts, BPE saturates at ~700 tokens; rank-mode
# policy on 100 held-out test tasks; torch 1 thread on a shared 2-core machine):
#   200 trajectories, 10 epochs (250 steps): ~45-100 s training, success 0.21-0.25
#   400 trajectories, 10 epochs (500 steps): ~200 s, success 0.23;  30 trajectories: 0.00
# Wider (hidden 128: 0.25) or deeper (3 layers: 0.06) models and a constant lr (0.22) did not
# help: tiny models from scratch learn to copy item names from observations slowly.
# ``DEMO_MODEL`` holds ``train_tokenizer(vocab_size=...)`` and ``tiny_model`` arguments.
DEMO_MODEL: dict = {"arch": "llama", "vocab_size": 1024, "hidden": 64, "layers": 2, "heads": 4}
DEMO_TRAIN = TrainConfig(epochs=10, lr=1e-2, batch_size=8, warmup_ratio=0.1, scheduler="cosine")


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else 0 (padding is masked, so
    any id works; 0 keeps batches valid for tokenizers without one)."""
    pid = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return int(pid) if pid is not None else 0


@dataclass
class SFTBatch:
    """A right-padded batch. ``loss_weights[b, t]`` weighs the loss of predicting token t."""

    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T], 1 on real tokens
    loss_weights: torch.Tensor  # float32 [B, T], 0 on padding, prompts and weight-0 steps

    def to(self, device: torch.device | str) -> SFTBatch:
        """The same batch on ``device``."""
        return SFTBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_weights))
        )


def token_loss_weights(item: TokenizedTrajectory, *, action_only: bool = True) -> np.ndarray:
    """Loss weight per token of one item: float32 [T] (0 where the token's loss does not count).

    ``action_only``: the action-only NLL with per-step weights of the gradient features
    (:class:`~trajinf.gradients.loss.ActionNLL`, summed: the batch divides by its total
    weight); ``action_only=False`` gives every token but the first weight 1 (plain LM loss).
    """
    if action_only:
        return ActionNLL("sum").token_weights(item)
    w = np.ones(len(item.input_ids), dtype=np.float32)
    w[:1] = 0.0  # token 0 has no context to be predicted from
    return w


def collate(
    items: Sequence[TokenizedTrajectory], pad_token_id: int, *, action_only: bool = True
) -> SFTBatch:
    """Right-pad ``items`` into one batch of shape [B, max_T]."""
    if not items:
        raise ValueError("collate() needs at least one item")
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    w = torch.zeros((len(items), width), dtype=torch.float32)
    for b, it in enumerate(items):
        n = len(it.input_ids)
        ids[b, :n] = torch.as_tensor(np.asarray(it.input_ids, dtype=np.int64))
        attn[b, :n] = 1
        w[b, :n] = torch.from_numpy(token_loss_weights(it, action_only=action_only))
    return SFTBatch(ids, attn, w)


def base_forward(model: torch.nn.Module) -> Callable:
    """The ``forward`` of the model under any peft wrapper (for signature checks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.forward


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model(..., logits_to_keep=<bool [B, T] mask>)`` computes only the kept logits.

    Skipping the lm_head on unneeded positions dominates the cost of tiny models (vocab >> hidden).
    """
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:  # older transformers: no boolean-mask support
        return False
    return "logits_to_keep" in inspect.signature(base_forward(model)).parameters


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
) -> torch.Tensor:
    """Log-probability of each masked token given its prefix: float32 [B, T], 0 where unmasked.

    ``score_mask[b, t]`` (bool [B, T]) selects tokens t >= 1 whose ``log p(input_ids[b, t] |
    input_ids[b, :t])`` is wanted. Logits are computed only at the positions needed (t - 1).
    """
    score_mask = score_mask.clone()
    score_mask[:, 0] = False  # the first token has no prefix
    keep = torch.zeros_like(score_mask)
    keep[:, :-1] = score_mask[:, 1:]  # logits at t-1 predict token t
    out = torch.zeros(score_mask.shape, dtype=torch.float32, device=input_ids.device)
    if not bool(keep.any()):
        return out
    targets = input_ids[score_mask]
    if supports_logits_to_keep(model):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep
        ).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[keep]
    # fp32 log-softmax: tiny models trained in fp32, big ones may run in bf16
    out[score_mask] = -F.cross_entropy(logits.float(), targets, reduction="none")
    return out


def sft_loss(model: torch.nn.Module, batch: SFTBatch) -> torch.Tensor:
    """Weighted per-token losses: float32 [B, T], ``w_t * -log p(x_t | x_<t)`` (0 where w_t = 0).

    Position t holds the loss of predicting ``input_ids[t]`` (labels are the inputs shifted by one),
    so a TokenizedTrajectory's ``action_mask[t]`` marks exactly the positions that count. The
    training loss is ``sft_loss(...).sum() / batch.loss_weights.sum()``.
    """
    w = batch.loss_weights
    logp = token_logprobs(model, batch.input_ids, batch.attention_mask, w != 0)
    return -logp * w


def length_bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    batch_tokens: int | None = None,
    bucket_factor: int = 16,
) -> list[list[int]]:
    """Indices grouped into batches of similar length, deterministic in (seed, epoch).

    Shuffle, sort chunks of ``batch_size * bucket_factor`` by length (less padding), split into
    batches (at most ``batch_size`` items and, if given, ``batch_tokens`` padded tokens), shuffle
    the batch order.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    batches: list[list[int]] = []
    chunk = max(1, batch_size * bucket_factor)
    for start in range(0, len(perm), chunk):
        part = sorted(perm[start : start + chunk].tolist(), key=lambda i: lengths[i])
        cur: list[int] = []
        for i in part:
            width = max([lengths[j] for j in cur] + [lengths[i]])
            full = len(cur) >= batch_size or (
                batch_tokens is not None and cur and width * (len(cur) + 1) > batch_tokens
            )
            if full:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def lr_factor(step: int, total: int, warmup_ratio: float, scheduler: str) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based) out of ``total``."""
    warm = int(math.ceil(warmup_ratio * total))
    if step < warm:
        return (step + 1) / (warm + 1)
    if scheduler == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise TrajinfError(f"TrainConfig field 'scheduler': unknown value {scheduler!r}")


def add_lora(
    model: torch.nn.Module, rank: int, alpha: float | None = None, seed: int = 0
) -> torch.nn.Module:
    """``model`` with fresh LoRA adapters (``models.lora.wrap_lora``: the same configuration
    ``score --lora`` uses); no-op for peft models."""
    return wrap_lora(model, rank, alpha, seed=seed)


@contextlib.contextmanager
def _seeded_deterministic(seed: int) -> Iterator[None]:
    """Seed torch and enable deterministic kernels, restoring the caller's global state after."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


def _as_tokenized(
    trajectories: Sequence, tokenizer, config: TrainConfig
) -> list[TokenizedTrajectory]:
    if all(isinstance(t, TokenizedTrajectory) for t in trajectories):
        return list(trajectories)
    from trajinf.data.tokenize import tokenize_pool

    return tokenize_pool(
        trajectories, tokenizer, max_length=config.max_length, action_only=config.action_only
    )


def checkpoint_steps(total_steps: int, n_checkpoints: int) -> list[int]:
    """Evenly spaced optimizer steps (1-based counts) after which to checkpoint.

    When ``n_checkpoints`` divides the epoch count these are the ends of epochs (LESS: 4 warmup
    epochs, one checkpoint after each).
    """
    if n_checkpoints <= 0 or total_steps <= 0:
        return []
    return sorted(
        {max(1, round(total_steps * (i + 1) / n_checkpoints)) for i in range(n_checkpoints)}
    )


def train_sft(
    model: torch.nn.Module,
    tokenizer,
    trajectories: Sequence,
    config: TrainConfig = TrainConfig(),
    *,
    checkpoint_dir: str | Path | None = None,
    n_checkpoints: int = 0,
    progress: Callable[[int], None] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on trajectories (``Trajectory`` or ``TokenizedTrajectory``) with AdamW.

    Loss: weighted mean over action tokens of each batch (see module docstring). Batches are
    right-padded and length-bucketed; batch order, dropout and LoRA init are seeded by
    ``config.seed`` and deterministic on CPU. With ``n_checkpoints > 0`` the model, tokenizer, lr
    and AdamW moments are saved to ``checkpoint_dir/checkpoint-{i}`` after evenly spaced steps;
    the lr recorded is the one the last step before the checkpoint used. ``progress(1)`` is called
    after every optimizer step. Trajectories without any weighted action token are skipped with a
    warning.
    """
    if config.epochs < 1 or config.batch_size < 1:
        raise TrajinfError("TrainConfig fields 'epochs' and 'batch_size' must be >= 1")
    if n_checkpoints > 0 and checkpoint_dir is None:
        raise TrajinfError("train_sft: n_checkpoints > 0 needs a checkpoint_dir")
    t0 = time.perf_counter()
    items = _as_tokenized(trajectories, tokenizer, config)
    kept, skipped = [], []
    for it in items:
        (kept if token_loss_weights(it, action_only=config.action_only).any() else skipped).append(
            it
        )
    if skipped:
        warnings.warn(
            f"train_sft: skipping {len(skipped)} trajectories with no weighted action token "
            f"(first: {skipped[0].id})",
            stacklevel=2,
        )
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    lengths = [len(it.input_ids) for it in kept]

    with _seeded_deterministic(config.seed):
        if config.lora:
            model = add_lora(model, config.lora_rank, config.lora_alpha, seed=config.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        plan = [
            length_bucketed_batches(
                lengths, config.batch_size, seed=config.seed, epoch=e, batch_tokens=config.batch_tokens
            )
            for e in range(config.epochs)
        ] if kept else []  # fmt: skip
        total = sum(len(p) for p in plan)
        save_at = set(checkpoint_steps(total, n_checkpoints))
        losses: list[float] = []
        ckpts: list[dict] = []
        tokens = action_tokens = step = 0
        model.train()
        for epoch_batches in plan:
            for idx in epoch_batches:
                lr = config.lr * lr_factor(step, total, config.warmup_ratio, config.scheduler)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                batch = collate([kept[i] for i in idx], pad, action_only=config.action_only)
                batch = batch.to(device)
                per_token = sft_loss(model, batch)
                loss = per_token.sum() / batch.loss_weights.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                step += 1
                losses.append(float(loss.detach()))
                tokens += int(batch.attention_mask.sum())
                action_tokens += int((batch.loss_weights != 0).sum())
                if config.log_every and step % config.log_every == 0:
                    recent = losses[-config.log_every :]
                    log.info(
                        "step %d/%d loss %.4f lr %.2e", step, total, sum(recent) / len(recent), lr
                    )
                if progress is not None:
                    progress(1)
                if step in save_at:
                    from trajinf.models.checkpoints import save_checkpoint

                    path = Path(checkpoint_dir) / f"checkpoint-{len(ckpts)}"
                    model.eval()
                    save_checkpoint(model, tokenizer, optimizer, path, step=step, learning_rate=lr)
                    model.train()
                    ckpts.append({"path": str(path), "lr": lr, "step": step})
        model.eval()
    return TrainResult(
        model=model,
        losses=losses,
        wall_time=time.perf_counter() - t0,
        tokens_seen=tokens,
        action_tokens_seen=action_tokens,
        steps=step,
        checkpoints=ckpts,
        skipped=[it.id for it in skipped],
    )


def warmup(
    model: torch.nn.Module,
    tokenizer,
    trajectories: Sequence,
    config: TrainConfig,
    checkpoint_dir: str | Path,
    *,
    n_checkpoints: int = 4,
    progress: Callable[[int], None] | None = None,
) -> TrainResult:
    """LESS warmup: ``train_sft`` saving ``n_checkpoints`` evenly spaced checkpoints (default 4)."""
    return train_sft(
        model,
        tokenizer,
        trajectories,
        config,
        checkpoint_dir=checkpoint_dir,
        n_checkpoints=n_checkpoints,
        progress=progress,
    )
