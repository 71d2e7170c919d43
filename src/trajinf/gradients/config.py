"""Extraction settings and the per-item result type (see docs/contracts.md, gradients/)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from trajinf.errors import ConfigError, check_fields
from trajinf.gradients.loss import ActionNLL

# Extraction-time preconditioners and the modes that compute them. These names are also the
# extraction stage of the preconditioner registry (trajinf.scoring.preconditioners).
EXTRACTION_PRECONDITIONERS: dict[str, tuple[str, ...]] = {
    "none": ("factorized", "less"),
    "adam": ("less",),  # LESS: m' / (sqrt(v') + eps) on per-example gradients
    "factored_adam": ("factorized",),  # rank-one Adam second moment folded into projections
}
ExtractionPreconditioner = Literal[tuple(EXTRACTION_PRECONDITIONERS)]  # type: ignore[valid-type]


@dataclass
class ExtractionConfig:
    """How gradient features are extracted (every field's help is in its metadata; the CLI
    options of ``trajinf score`` / ``extract`` are built from it).

    Factorized mode: per-module k_in = k_out = k with k = max(2, floor(sqrt(proj_dim /
    n_modules))), so D = n_modules * k * k. Projections depend only on (seed, module name).
    ``step_split``: LESS mode always computes "loss"; ``to_dict`` records the split actually
    computed. Invalid values raise :class:`~trajinf.errors.ConfigError` on construction.
    """

    mode: Literal["factorized", "less"] = field(
        default="factorized",
        metadata={
            "help": "factorized (fast: per-token rank-one projection, one backward per batch) "
            "or less (reference: per-example gradients, dense projection)."
        },
    )
    proj_dim: int = field(
        default=8192, metadata={"help": "Total projected feature dimension D.", "min": 1}
    )
    seed: int = field(default=0, metadata={"help": "Projection seed.", "cli": False})
    modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "fnmatch pattern of tracked module names (repeat); default: every "
            "Linear/Conv1D inside the blocks (only the LoRA A/B linears with peft).",
        },
    )
    preconditioner: ExtractionPreconditioner = field(
        default="none",
        metadata={
            "help": "Optimizer preconditioner of pool gradients: none, adam (less mode) or "
            "factored_adam (factorized mode); auto: adam / factored_adam when checkpoints "
            "carry optimizer state, else none.",
            "cli_default": "auto",
        },
    )
    loss_normalization: Literal["mean", "sum"] = field(
        default="mean",
        metadata={
            "help": "Item loss over action tokens: mean (LESS) or sum (no length normalization)."
        },
    )
    batch_tokens: int = field(
        default=8192,
        metadata={"help": "Padded-token budget per batch (memory knob).", "min": 1},
    )
    update_mask_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Sparse update mask threshold (with --update-mask-from; default 1e-5).",
            "min": 0,
        },
    )
    step_split: Literal["position", "loss"] = field(
        default="position",
        metadata={
            "help": "Per-step features (factorized mode): position (gradient through the step's "
            "positions; one backward) or loss (each step's own loss: what a step weight acts "
            "on; one backward per step, ~4x)."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~trajinf.errors.ConfigError` naming the offending field."""
        check_fields(self)
        modes = EXTRACTION_PRECONDITIONERS[self.preconditioner]
        if self.mode not in modes:
            allowed = [p for p, m in EXTRACTION_PRECONDITIONERS.items() if self.mode in m]
            raise ConfigError(
                "ExtractionConfig",
                "preconditioner",
                f"{self.preconditioner!r} is not available in mode {self.mode!r} "
                f"(choose from {allowed})",
            )

    def to_dict(self) -> dict:
        """JSON-ready dict (goes into the store manifest), with the step split actually computed."""
        return {**asdict(self), "step_split": self.effective_step_split}

    @property
    def loss(self) -> ActionNLL:
        """The default loss of this config: action-only NLL with ``loss_normalization``."""
        return ActionNLL(self.loss_normalization)

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
