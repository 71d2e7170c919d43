"""Length-bucketed, right-padded batches with per-token loss weights and step assignments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.gradients.loss import ActionNLL


@dataclass
class ItemSteps:
    """Step bookkeeping of one item (all arrays over its own T tokens)."""

    step_index: np.ndarray  # int32 [S] original step indices, sorted
    step_tokens: np.ndarray  # int32 [S] action tokens per step
    token_slot: np.ndarray  # int64 [T] slot (0..S-1) of token t's step, -1 outside steps
    position_slot: np.ndarray  # int64 [T] slot whose feature position t's activations go to
    token_weight: np.ndarray  # float32 [T] loss weight of predicting token t
    n_action: int


def item_steps(item: TokenizedTrajectory, loss: ActionNLL) -> ItemSteps:
    """Step slots and loss weights (``loss.token_weights``) of one item.

    Position p computes the logits for token p+1, so its activations belong to token p+1's
    step. Positions between steps (tool results, user turns) belong to the step before them
    (a step is its action plus its consequences); positions before the first step belong to
    the first step. Every position thus belongs to one step, which makes the step features
    sum exactly to the trajectory feature.
    """
    step_ids = np.asarray(item.step_ids, dtype=np.int64)
    action = np.asarray(item.action_mask, dtype=bool)
    t_len = len(step_ids)
    step_index = np.unique(step_ids[step_ids >= 0])
    token_slot = np.where(step_ids >= 0, np.searchsorted(step_index, step_ids), -1)
    if len(step_index):
        last = np.where(token_slot >= 0, np.arange(t_len), -1)
        np.maximum.accumulate(last, out=last)
        filled = np.where(last >= 0, token_slot[np.maximum(last, 0)], 0)
        position_slot = np.concatenate([filled[1:], filled[-1:]])
    else:
        position_slot = np.full(t_len, -1, dtype=np.int64)
    n_action = int(action.sum())
    weight = loss.token_weights(item)
    step_tokens = np.bincount(token_slot[action & (token_slot >= 0)], minlength=len(step_index))
    return ItemSteps(
        step_index=step_index.astype(np.int32),
        step_tokens=step_tokens.astype(np.int32),
        token_slot=token_slot,
        position_slot=position_slot,
        token_weight=weight,
        n_action=n_action,
    )


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices into batches by length so that B * T_max <= batch_tokens (>= 1 item)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending, so the newest item sets T_max
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class Batch:
    """Right-padded tensors of B items; pads have zero weight and slot -1."""

    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T]
    token_weight: torch.Tensor  # float32 [B, T]
    action_mask: torch.Tensor  # bool [B, T]
    position_slot: torch.Tensor  # int64 [B, T]
    steps: list[ItemSteps]

    @property
    def max_steps(self) -> int:
        return max((len(s.step_index) for s in self.steps), default=0)


def make_batch(
    items: Sequence[TokenizedTrajectory], steps: Sequence[ItemSteps], device: torch.device
) -> Batch:
    """Pad `items` on the right to a common length (pad id 0, masked out)."""
    t_max = max(len(it.input_ids) for it in items)
    b = len(items)
    ids = np.zeros((b, t_max), dtype=np.int64)
    attn = np.zeros((b, t_max), dtype=np.int64)
    weight = np.zeros((b, t_max), dtype=np.float32)
    action = np.zeros((b, t_max), dtype=bool)
    slot = np.full((b, t_max), -1, dtype=np.int64)
    for r, (it, st) in enumerate(zip(items, steps, strict=True)):
        n = len(it.input_ids)
        ids[r, :n] = it.input_ids
        attn[r, :n] = 1
        weight[r, :n] = st.token_weight
        action[r, :n] = it.action_mask
        slot[r, :n] = st.position_slot
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return Batch(as_t(ids), as_t(attn), as_t(weight), as_t(action), as_t(slot), list(steps))


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """-log p(input_ids[:, t] | input_ids[:, :t]) as float32 [B, T] (column 0 is 0).

    logits: [B, T, V] of the same positions as input_ids.
    """
    b, t, v = logits.shape
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, v), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(b, t - 1)
    return F.pad(nll, (1, 0))


def model_logits(
    model: torch.nn.Module, batch: Batch, *, embeds_requires_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward with explicit positions (right padding keeps real tokens at 0..n-1).

    Returns (logits [B, T, V], inputs_embeds [B, T, H]). With embeds_requires_grad the
    embeddings are a fresh leaf that requires grad, so gradients can be taken w.r.t. it alone.
    """
    embeds = model.get_input_embeddings()(batch.input_ids)
    if embeds_requires_grad:
        embeds = embeds.detach().requires_grad_(True)
    positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    out = model(
        inputs_embeds=embeds,
        attention_mask=batch.attention_mask,
        position_ids=positions.unsqueeze(0).expand_as(batch.input_ids),
        use_cache=False,
    )
    return out.logits, embeds
