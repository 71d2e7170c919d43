"""The scoring job's configuration: one dataclass, saved into ``OUT/job.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from trajinf.errors import TrajinfError
from trajinf.gradients import ExtractionConfig
from trajinf.scoring.source import ScoreConfig


@dataclass
class ScoreJobConfig:
    """Everything the scoring job needs besides its inputs; saved into ``OUT/job.json``."""

    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    scoring: ScoreConfig = field(default_factory=ScoreConfig)
    max_length: int | None = 2048
    subtask_field: str = "task_id"
    lora: bool = False
    harmful_alpha: float = 0.05
    null_directions: int = 32
    shard_items: int = 256
    baselines: bool = True
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if visible, else cpu) | "cpu" | "cuda" | "cuda:1" ...
    trust_remote_code: bool = False  # only with an explicit --trust-remote-code
    # Track only parameters that moved by more than extraction.update_mask_threshold between
    # these two checkpoints (where RL / fine-tuning updates land); None tracks everything.
    update_mask_from: tuple[str, str] | None = None
    # scoring.preconditioner="kfac": pool items sampled (seeded by ``seed``) for the factors
    kfac_max_items: int = 256

    def to_dict(self) -> dict:
        """A JSON-able dict of the whole config."""
        return asdict(self)


def build_job_config(
    *,
    mode: str = "factorized",
    proj_dim: int = 8192,
    lora: bool = False,
    preconditioner: str = "auto",
    has_checkpoints: bool = False,
    metric: str = "cosine",
    aggregate: str = "max",
    remove_mean: bool = False,
    target_mode: str = "subtask",
    subtask_field: str = "task_id",
    max_length: int | None = 2048,
    seed: int = 0,
    scoring_preconditioner: str = "none",
    kfac_damping: float = 0.1,
    **extraction: object,
) -> ScoreJobConfig:
    """A scoring job config from flat options (what the CLI exposes).

    ``preconditioner="auto"`` picks Adam in LESS mode and the factored Adam in factorized mode
    when warmup checkpoints (with optimizer moments) are given, and none otherwise.
    ``scoring_preconditioner`` acts on the target directions at scoring time: none, gram
    (damped inverse pool Gram) or kfac (per-layer K-FAC factors, factorized mode only,
    damped by ``kfac_damping``; the job saves the factors under ``OUT/kfac/``).
    """
    if preconditioner == "auto":
        if not has_checkpoints:
            preconditioner = "none"
        else:
            preconditioner = "adam" if mode == "less" else "factored_adam"
    valid = {"factorized": {"none", "factored_adam"}, "less": {"none", "adam"}}
    if mode not in valid:
        raise TrajinfError(f"--mode must be factorized or less, got '{mode}'")
    if preconditioner not in valid[mode]:
        raise TrajinfError(
            f"--preconditioner '{preconditioner}' does not apply to --mode {mode} "
            f"(choose from {sorted(valid[mode])})"
        )
    for name, value, choices in (
        ("--metric", metric, ("cosine", "inner")),
        ("--aggregate", aggregate, ("max", "mean")),
        ("--target-mode", target_mode, ("subtask", "success_minus_failure", "advantage")),
        ("--scoring-preconditioner", scoring_preconditioner, ("none", "gram", "kfac")),
    ):
        if value not in choices:
            raise TrajinfError(f"{name} must be one of {', '.join(choices)}, got '{value}'")
    if scoring_preconditioner == "kfac" and mode != "factorized":
        raise TrajinfError("--scoring-preconditioner kfac needs --mode factorized")
    if kfac_damping < 0:
        raise TrajinfError(f"--kfac-damping must be >= 0, got {kfac_damping}")
    return ScoreJobConfig(
        extraction=ExtractionConfig(
            mode=mode, proj_dim=proj_dim, seed=seed, preconditioner=preconditioner, **extraction
        ),
        scoring=ScoreConfig(
            metric=metric,
            aggregate=aggregate,
            remove_mean=remove_mean,
            target_mode=target_mode,
            preconditioner=scoring_preconditioner,
            kfac_damping=kfac_damping,
        ),
        max_length=max_length,
        subtask_field=subtask_field,
        lora=lora,
        seed=seed,
    )


@dataclass
class ScoreOutputs:
    """Paths and tables the job produced."""

    out: Path
    trajectories: pd.DataFrame
    steps: pd.DataFrame
    harmful_info: dict
    timings: dict
