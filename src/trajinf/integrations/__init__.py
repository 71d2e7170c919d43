"""Fit a transformers / TRL training run: warm-up checkpoints in, step-weighted datasets out.

- :class:`WarmupCheckpointCallback` (``callback``): a ``TrainerCallback`` that saves checkpoints
  ``trajinf score --checkpoint`` reads (model or LoRA adapter, AdamW moments, the step's lr).
- :func:`to_dataset` (``dataset``): a selection or pool as a ``datasets.Dataset`` with TRL's
  ``messages`` column (assistant messages carry their step ``weight``).
- :class:`TrajectoryCollator` (``collator``): trajinf's tokenization -> input_ids, attention_mask,
  labels and per-token ``loss_weights``.
- :class:`WeightedSFTTrainer` (``sft_trainer``, needs ``trajinf[trl]``) and
  :class:`WeightedTrainer` (``loss``): trainers whose loss honours the weights.
"""

from __future__ import annotations

from typing import Any

from trajinf.integrations.callback import WarmupCheckpointCallback
from trajinf.integrations.collator import TrajectoryCollator
from trajinf.integrations.dataset import row_trajectory, to_dataset
from trajinf.integrations.loss import WeightedTrainer, weighted_loss

__all__ = [
    "TrajectoryCollator",
    "WarmupCheckpointCallback",
    "WeightedSFTTrainer",
    "WeightedTrainer",
    "row_trajectory",
    "to_dataset",
    "weighted_loss",
]


def __getattr__(name: str) -> Any:
    # TRL is an optional extra: import it only when its trainer is asked for
    if name == "WeightedSFTTrainer":
        from trajinf.integrations.sft_trainer import WeightedSFTTrainer

        return WeightedSFTTrainer
    raise AttributeError(f"module 'trajinf.integrations' has no attribute {name!r}")
