"""The one LoRA configuration trajinf uses, for training (``train.sft``) and for scoring
(``score --lora`` on a plain model): adapters on the attention and MLP projections, rank r,
alpha = 2 r by default, no dropout.

Scoring a LoRA run's checkpoints tracks the adapters those checkpoints carry; a fresh LoRA made
here for a plain model has the same shape, so a store's features mean the same thing either way.
"""

from __future__ import annotations

import torch

from trajinf.errors import TrajinfError

# Linear layers LoRA adapts, across the architectures trajinf builds or loads
# (llama/qwen2/mistral names, then gpt2's Conv1D names).
LORA_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "c_attn", "c_proj", "c_fc",
)  # fmt: skip
DEFAULT_RANK = 8


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """Names (last component) of the LORA_TARGETS projections present in ``model``."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [n for n in LORA_TARGETS if n in present]
    if not found:
        raise TrajinfError(
            f"LoRA: no known projection layer ({', '.join(LORA_TARGETS)}) in {type(model).__name__}"
        )
    return found


def lora_config(model: torch.nn.Module, rank: int = DEFAULT_RANK, alpha: float | None = None):
    """The peft ``LoraConfig`` for ``model`` (alpha None: 2 * rank)."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    if rank < 1:
        raise TrajinfError(f"LoRA rank must be >= 1, got {rank}")
    targets = lora_target_modules(model)
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=0.0,
        target_modules=targets,
        # gpt2's Conv1D stores weights transposed
        fan_in_fan_out=any(
            isinstance(m, Conv1D)
            for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in targets
        ),
        task_type="CAUSAL_LM",
    )


def wrap_lora(
    model: torch.nn.Module, rank: int = DEFAULT_RANK, alpha: float | None = None, seed: int = 0
) -> torch.nn.Module:
    """``model`` with fresh LoRA adapters (:func:`lora_config`); a peft model is returned as is.

    The adapters' A matrices are drawn from a generator seeded by ``seed`` (the caller's global
    RNG state is left untouched).
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        return model
    config = lora_config(model, rank, alpha)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A init draws from the global generator
        return get_peft_model(model, config)
