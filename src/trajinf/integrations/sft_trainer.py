"""TRL's ``SFTTrainer`` with trajinf's tokenization and step-weighted loss (needs ``trajinf[trl]``)."""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from trajinf.errors import TrajinfError
from trajinf.integrations.collator import TrajectoryCollator
from trajinf.integrations.loss import WeightedLossMixin, prepare_args


class WeightedSFTTrainer(WeightedLossMixin, SFTTrainer):
    """``SFTTrainer`` on ``to_dataset`` rows that honours each step's ``weight``.

    The default collator is ``TrajectoryCollator(processing_class, max_length=args.max_length)``
    (trajinf's chat-template tokenization, action mask and weights; over-long trajectories lose
    whole steps from the left). TRL's own dataset preparation is skipped
    (``dataset_kwargs["skip_prepare_dataset"] = True``) and the ``messages`` column is kept
    (``remove_unused_columns = False``): both are set on ``args``. The loss is trajinf's
    (``integrations.loss``); packing, padding-free batches and ``formatting_func`` do not apply
    to it and are refused. Everything else (optimizer, schedule, PEFT ``peft_config``, callbacks,
    logging, saving) is TRL's.
    """

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, **kwargs):
        prepare_args(args)
        if not isinstance(args, SFTConfig):
            raise TrajinfError(
                f"WeightedSFTTrainer: args must be an SFTConfig, got {type(args).__name__}"
            )
        if args.packing or args.padding_free:
            raise TrajinfError(
                "WeightedSFTTrainer: packing / padding_free merge trajectories into one row; the "
                "step-weighted loss needs one trajectory per row (set packing=False, padding_free=False)"
            )
        if kwargs.get("formatting_func") is not None:
            raise TrajinfError(
                "WeightedSFTTrainer: formatting_func turns conversations into plain text, which "
                "loses the steps; pass to_dataset rows instead"
            )
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        own_collator = data_collator is None
        if own_collator:
            data_collator = TrajectoryCollator(kwargs.get("processing_class"), args.max_length)
        super().__init__(model, args=args, data_collator=data_collator, **kwargs)
        if own_collator and data_collator.tokenizer is None:
            data_collator.tokenizer = self._tokenizer  # loaded by SFTTrainer from the model
