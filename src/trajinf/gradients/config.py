"""Extraction settings and the per-item result type (see docs/contracts.md, gradients/)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from trajinf.errors import TrajinfError

MODES = ("factorized", "less")
PRECONDITIONERS = {"factorized": ("none", "factored_adam"), "less": ("none", "adam")}
NORMALIZATIONS = ("mean", "sum")
STEP_SPLITS = ("position", "loss")


@dataclass
class ExtractionConfig:
    """How gradient features are extracted.

    mode: "factorized" (per-token rank-one projection, one backward per batch) or "less"
        (per-example flattened gradients, Adam preconditioning, dense projection).
    proj_dim: total feature dim D. Factorized: per-module k_in = k_out = k with
        k = max(2, floor(sqrt(proj_dim / n_modules))), so D = n_modules * k * k.
    seed: projection seed; projections depend only on (seed, module/parameter name).
    modules: fnmatch patterns over module names; None = every Linear/Conv1D inside the
        blocks (not lm_head / embeddings), or only the LoRA lora_A / lora_B linears with peft.
    preconditioner: "none" | "adam" (less) | "factored_adam" (factorized).
    loss_normalization: "mean" weights each action token by 1/n_action_tokens(item); "sum" by 1.
    batch_tokens: padded-token budget per batch (items are length-bucketed).
    update_mask_threshold: threshold the caller used for `sparse_update_mask` (recorded only).
    step_split: what a step's feature is (factorized mode). "position": the gradient of the
        whole item's loss flowing through the step's token positions (one backward per batch).
        "loss": the gradient of the step's own loss (its action tokens, with the item's
        normalization) through all positions - what a per-step loss weight acts on (one
        backward per step slot). Both sum to the same trajectory feature. LESS mode always
        computes "loss"; `to_dict` records the split actually computed.
    """

    mode: str = "factorized"
    proj_dim: int = 8192
    seed: int = 0
    modules: list[str] | None = None
    preconditioner: str = "none"
    loss_normalization: str = "mean"
    batch_tokens: int = 8192
    update_mask_threshold: float | None = None
    step_split: str = "position"

    def validate(self) -> None:
        """Raise TrajinfError naming the offending field."""
        if self.mode not in MODES:
            raise TrajinfError(f"ExtractionConfig field 'mode': {self.mode!r} not in {MODES}")
        allowed = PRECONDITIONERS[self.mode]
        if self.preconditioner not in allowed:
            raise TrajinfError(
                f"ExtractionConfig field 'preconditioner': {self.preconditioner!r} is not "
                f"available in mode {self.mode!r} (choose from {allowed})"
            )
        if self.loss_normalization not in NORMALIZATIONS:
            raise TrajinfError(
                f"ExtractionConfig field 'loss_normalization': {self.loss_normalization!r} "
                f"not in {NORMALIZATIONS}"
            )
        if self.step_split not in STEP_SPLITS:
            raise TrajinfError(
                f"ExtractionConfig field 'step_split': {self.step_split!r} not in {STEP_SPLITS}"
            )
        if self.proj_dim < 1:
            raise TrajinfError(
                f"ExtractionConfig field 'proj_dim': must be >= 1, got {self.proj_dim}"
            )
        if self.batch_tokens < 1:
            raise TrajinfError(
                f"ExtractionConfig field 'batch_tokens': must be >= 1, got {self.batch_tokens}"
            )

    def to_dict(self) -> dict:
        """JSON-ready dict (goes into the store manifest), with the step split actually computed."""
        return {**asdict(self), "step_split": self.effective_step_split}

    @property
    def effective_step_split(self) -> str:
        """The split actually computed: "loss" in LESS mode, else `step_split`."""
        return "loss" if self.mode == "less" else self.step_split


@dataclass
class ItemFeatures:
    """Features of one tokenized trajectory.

    trajectory: float32 [D] (== steps.sum(0) in factorized mode, and in LESS mode with
    preconditioner "none"); steps: float32 [S, D]; step_index / step_tokens: int32 [S].
    """

    index: int
    id: str
    trajectory: np.ndarray
    steps: np.ndarray
    step_index: np.ndarray
    step_tokens: np.ndarray
    loss: float
    finite: bool
