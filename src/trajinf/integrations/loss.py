"""The step-weighted loss inside a ``transformers.Trainer`` (and, in ``sft_trainer``, TRL's).

Loss of an optimizer step = ``sum_t w_t * CE_t / sum_t w_t`` over every token of the (accumulated)
batch, ``w`` the :class:`~trajinf.integrations.collator.TrajectoryCollator`'s ``loss_weights``:
``train.sft``'s loss, computed by ``train.sft.sft_loss`` itself. With gradient accumulation the
denominator is the weight sum of all micro-batches of the step (``get_batch_samples``), so
accumulating k micro-batches gives the gradient of one k-times larger batch. A step with weight
0 is in no numerator nor denominator: its own loss contributes exactly zero gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from trajinf.errors import TrajinfError
from trajinf.integrations.collator import TrajectoryCollator
from trajinf.train.sft import SFTBatch, sft_loss


def weighted_loss(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    total_weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``sum(w * CE) / total_weight`` of one batch from ``TrajectoryCollator`` (a 0-dim tensor).

    ``total_weight``: the normalizer (default: this batch's weight sum). Logits are computed only
    at positions with a nonzero weight. A batch without any weight gives a zero loss that still
    backpropagates (to zero gradients).
    """
    if "loss_weights" not in inputs:
        raise TrajinfError(
            "the batch has no 'loss_weights': use trajinf.integrations.TrajectoryCollator as the "
            "trainer's data_collator"
        )
    batch = SFTBatch(inputs["input_ids"], inputs["attention_mask"], inputs["loss_weights"])
    total = batch.loss_weights.sum() if total_weight is None else total_weight
    loss = sft_loss(model, batch).sum() / torch.as_tensor(total).clamp_min(1e-12)
    if not loss.requires_grad:  # no weighted token at all: nothing was computed
        loss = loss + sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
    return loss


class WeightedLossMixin:
    """``compute_loss`` and ``get_batch_samples`` for a ``Trainer`` subclass: the step-weighted
    loss, normalized over the whole accumulated batch (see the module docstring)."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated weight sum itself

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches or "loss_weights" not in batches[0]:
            return batches, None
        total = sum(b["loss_weights"].sum() for b in batches).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return batches, total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # in training, get_batch_samples gave the step's weight sum; Trainer's evaluation passes
        # a label count instead, so evaluation normalizes each batch by its own weight sum
        total = num_items_in_batch if model.training else None
        loss = weighted_loss(model, inputs, total)
        if (
            total is not None
            and self.args.average_tokens_across_devices
            and self.args.world_size > 1
        ):
            # the normalizer spans every rank, and DDP averages the ranks' gradients
            loss = loss * self.accelerator.num_processes
        if return_outputs:
            with torch.no_grad():
                outputs = model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            return loss, outputs
        return loss


def prepare_args(args: Any) -> None:
    """Keep the dataset's ``messages`` column for the collator (Trainer drops unknown columns)."""
    if args is None:
        raise TrajinfError("pass args (TrainingArguments / SFTConfig): the trainer needs them")
    args.remove_unused_columns = False


class WeightedTrainer(WeightedLossMixin, Trainer):
    """A ``transformers.Trainer`` on ``to_dataset`` rows with trajinf's step-weighted loss.

    ``data_collator`` defaults to ``TrajectoryCollator(processing_class)``;
    ``args.remove_unused_columns`` is set to False (the collator reads ``messages``).
    """

    def __init__(self, model=None, args=None, data_collator=None, *a, **kwargs):
        prepare_args(args)
        if data_collator is None:
            tok = kwargs.get("processing_class")
            if tok is None:
                raise TrajinfError("WeightedTrainer needs processing_class=<the tokenizer>")
            data_collator = TrajectoryCollator(tok)
        super().__init__(model, args, data_collator, *a, **kwargs)
