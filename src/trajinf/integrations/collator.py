"""A data collator that tokenizes conversations the way trajinf does, with per-token loss weights.

Rows are rendered and tokenized by ``data.tokenize.tokenize_trajectory`` and padded by
``train.sft.collate``: the action mask (assistant content plus end-of-turn token, never the
header) and the weights (each assistant message's ``weight``) are exactly those of trajinf's own
trainer and of the scoring job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trajinf.data.tokenize import tokenize_trajectory
from trajinf.integrations.dataset import row_trajectory
from trajinf.train.sft import collate, pad_id

IGNORE_INDEX = -100


@dataclass
class TrajectoryCollator:
    """Collate dataset rows (``messages``, optional ``tools``; see ``to_dataset``) into a batch.

    Returns right-padded tensors ``input_ids`` int64 [B, T], ``attention_mask`` int64 [B, T],
    ``loss_weights`` float32 [B, T] (the weight of predicting token t: 0 on padding, prompts,
    observations and weight-0 steps) and ``labels`` int64 [B, T] (``input_ids`` with -100 where the
    weight is 0, for code that only looks at labels). ``max_length``: longer trajectories lose whole
    steps from the left (``tokenize_trajectory``), never a cut action. ``action_only=False``: every
    non-system token but the first is weighted 1 (plain LM loss).
    """

    tokenizer: Any
    max_length: int | None = None
    action_only: bool = True

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        items = [
            tokenize_trajectory(
                row_trajectory(r, i),
                self.tokenizer,
                max_length=self.max_length,
                action_only=self.action_only,
            )
            for i, r in enumerate(rows)
        ]
        batch = collate(items, pad_id(self.tokenizer), action_only=self.action_only)
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "labels": batch.input_ids.masked_fill(batch.loss_weights == 0, IGNORE_INDEX),
            "loss_weights": batch.loss_weights,
        }
