"""Warm-up checkpoints from a transformers / TRL training run, in the format ``trajinf score`` reads.

:class:`WarmupCheckpointCallback` is a ``transformers.TrainerCallback``: added to a ``Trainer`` or
TRL ``SFTTrainer``, it writes ``models.checkpoints.save_checkpoint`` directories (model or peft
adapter, tokenizer, AdamW moments, the step's learning rate) at chosen optimizer steps or epoch
ends. Each directory is usable as is: ``trajinf score --model BASE --checkpoint DIR``.

What each training setup gives:

- torch AdamW / Adam (``optim="adamw_torch"`` or ``"adamw_torch_fused"``, the default): moments
  and lr saved; scoring uses them as LESS does.
- Gradient accumulation: supported. ``save_steps`` count optimizer steps (each
  ``gradient_accumulation_steps`` micro-batches); the moments are those of the accumulated gradient,
  as with one larger batch.
- Any other optimizer (Adafactor, SGD, 8-bit Adam, Lion, ...): it has no ``exp_avg`` /
  ``exp_avg_sq`` to save. By default the callback refuses at the start of training; with
  ``require_adam=False`` it saves the model and lr without moments (no ``optimizer.safetensors``),
  which ``trajinf score --preconditioner none`` reads: plain gradients, checkpoints weighted
  equally (the lr is only read together with the moments).
- DeepSpeed / FSDP: the optimizer state is sharded across ranks; refused.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import TrainerCallback

from trajinf.atomic import write_json
from trajinf.errors import TrajinfError
from trajinf.models.checkpoints import save_checkpoint

log = logging.getLogger(__name__)

#: One line per saved checkpoint: {"path", "step", "epoch", "learning_rate", "moments"}.
INDEX_FILE = "checkpoints.json"


def _steps(values: Iterable[int] | None, what: str) -> list[int]:
    out = sorted({int(v) for v in values or ()})
    if any(v < 1 for v in out):
        raise TrajinfError(f"WarmupCheckpointCallback: {what} must be >= 1, got {out}")
    return out


def unwrap_optimizer(optimizer):
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (or ``optimizer`` itself)."""
    while hasattr(optimizer, "optimizer") and isinstance(
        optimizer.optimizer, torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    return optimizer


def step_learning_rate(optimizer) -> float:
    """The lr of the optimizer's parameter groups (they must agree: a checkpoint has one lr)."""
    lrs = {float(g["lr"]) for g in unwrap_optimizer(optimizer).param_groups if g["params"]}
    if len(lrs) != 1:
        raise TrajinfError(
            f"WarmupCheckpointCallback: parameter groups use different learning rates {sorted(lrs)};"
            " a trajinf checkpoint records one lr per step (use one lr for all trained parameters)"
        )
    return lrs.pop()


class WarmupCheckpointCallback(TrainerCallback):
    """Save trajinf warm-up checkpoints during a ``Trainer`` / ``SFTTrainer`` run.

    ``save_steps``: optimizer steps (``state.global_step``, 1-based) after which to save;
    ``save_epochs``: epochs (1-based) at whose end to save. With neither, one checkpoint at the end
    of every epoch (LESS: one per warm-up epoch). Each save writes ``output_dir/step-{N}`` (N the
    global step) and rewrites ``output_dir/checkpoints.json``; ``self.checkpoints`` lists the
    directories in order. The lr recorded is the one the optimizer used for step N (read after
    ``optimizer.step()``, before the scheduler moves it). Only the main process writes.
    ``require_adam=False`` accepts a non-Adam optimizer and saves without moments (see the module
    docstring for what scoring can then do).
    """

    def __init__(
        self,
        output_dir: str | Path,
        save_steps: Iterable[int] | None = None,
        *,
        save_epochs: Iterable[int] | None = None,
        require_adam: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.save_steps = _steps(save_steps, "save_steps")
        self.save_epochs = _steps(save_epochs, "save_epochs")
        self.every_epoch = save_steps is None and save_epochs is None
        self.require_adam = require_adam
        self.checkpoints: list[Path] = []
        self.saved: list[dict] = []
        self._lr: float | None = None
        self._moments = True

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise TrajinfError(
                "WarmupCheckpointCallback: DeepSpeed / FSDP shard the optimizer state across ranks;"
                " trajinf checkpoints need the full AdamW moments (train the warm-up on one device"
                " or with DDP)"
            )
        opt = unwrap_optimizer(optimizer)
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            name = type(opt).__name__
            if self.require_adam:
                raise TrajinfError(
                    f"WarmupCheckpointCallback: optimizer {name} has no Adam moments; trajinf's "
                    "scoring preconditions with AdamW's exp_avg / exp_avg_sq. Use optim='adamw_torch'"
                    " (or 'adamw_torch_fused'), or pass require_adam=False to save model and lr "
                    "only, then score with --preconditioner none (plain gradients, equal "
                    "checkpoint weights)"
                )
            warnings.warn(
                f"WarmupCheckpointCallback: optimizer {name} is not Adam/AdamW: checkpoints are "
                "saved without moments; score them with --preconditioner none (plain gradients, "
                "equal checkpoint weights)",
                stacklevel=2,
            )
            self._moments = False
        if args.gradient_accumulation_steps > 1:
            log.info(
                "WarmupCheckpointCallback: gradient_accumulation_steps=%d: save_steps count "
                "optimizer steps; the saved moments are those of the accumulated gradient (usable "
                "as is)",
                args.gradient_accumulation_steps,
            )
        late = [s for s in self.save_steps if state.max_steps and s > state.max_steps]
        if late:
            warnings.warn(
                f"WarmupCheckpointCallback: save_steps {late} are beyond the run's "
                f"{state.max_steps} optimizer steps and will not be saved",
                stacklevel=2,
            )

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # after optimizer.step(), before lr_scheduler.step(): the lr this step used
        self._lr = step_learning_rate(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.save_steps:
            self._save(args, state, **kwargs)

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = int(round(state.epoch or 0))
        if self.every_epoch or epoch in self.save_epochs:
            self._save(args, state, **kwargs)

    def _save(self, args, state, model=None, processing_class=None, optimizer=None, **_):
        step = int(state.global_step)
        if self.saved and self.saved[-1]["step"] == step:
            return  # an epoch end that is also a save step
        if self._lr is None:
            raise TrajinfError(
                "WarmupCheckpointCallback: no optimizer step was seen before saving (this "
                "transformers version does not call on_optimizer_step?)"
            )
        path = self.output_dir / f"step-{step}"
        entry = {
            "path": str(path),
            "step": step,
            "epoch": float(state.epoch or 0.0),
            "learning_rate": self._lr,
            "moments": self._moments,
        }
        if state.is_world_process_zero:
            opt = unwrap_optimizer(optimizer) if self._moments else None
            save_checkpoint(model, processing_class, opt, path, step=step, learning_rate=self._lr)
            write_json({"checkpoints": [*self.saved, entry]}, self.output_dir / INDEX_FILE)
        self.saved.append(entry)
        self.checkpoints.append(path)
