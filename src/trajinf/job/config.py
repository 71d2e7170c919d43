"""The scoring job's configuration: one dataclass, saved into ``OUT/job.json``."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

import pandas as pd

from trajinf.errors import ConfigError, TrajinfError, check_fields
from trajinf.gradients.config import ExtractionConfig
from trajinf.scoring.preconditioners import PRECONDITIONERS
from trajinf.scoring.source import ScoreConfig


@dataclass
class ScoreJobConfig:
    """Everything the scoring job needs besides its inputs; saved into ``OUT/job.json``.

    Each field's help is in its metadata; with the fields of :class:`ExtractionConfig` and
    :class:`ScoreConfig` they are the job's flat options (:func:`job_options`): the keyword
    arguments of :func:`build_job_config` and the CLI options of ``trajinf score`` /
    ``extract``. Invalid values raise :class:`~trajinf.errors.ConfigError` on construction.
    """

    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    scoring: ScoreConfig = field(default_factory=ScoreConfig)
    max_length: int | None = field(
        default=2048,
        metadata={"help": "Max tokens; longer trajectories lose early steps.", "min": 1},
    )
    subtask_field: str = field(
        default="task_id",
        metadata={"help": "Trajectory field naming its subtask (target subtasks group by it)."},
    )
    lora: bool = field(
        default=False, metadata={"help": "Wrap a plain model in a fresh LoRA; track only it."}
    )
    harmful_alpha: float = field(
        default=0.05,
        metadata={"help": "Level of the harmful flag (false-positive rate on known-good data)."},
    )
    harm_signal: Literal["contrast", "logprob", "surprise", "alignment", "none"] = field(
        default="contrast",
        metadata={
            "help": "Harm evidence per step: contrast (log-prob change of its action tokens "
            "when the model is tuned on the target), logprob (the model's own log-prob of its "
            "least likely action token, no tuning: needs a model that knows the skill), "
            "surprise (gradient norm) or alignment (cosine to the target direction); none "
            "skips the harm step (no flag). The flag is calibrated on the target."
        },
    )
    harm_scope: Literal["all", "subtask"] = field(
        default="all",
        metadata={
            "help": "Pool trajectories the harm flag assesses: all, or subtask (only those whose "
            "--subtask-field value is one of the known-good target's: a target calibrates only "
            "the skills it shows; the others get assessed=False and are never flagged)."
        },
    )
    harm_reference: Literal["checkpoint", "model"] = field(
        default="checkpoint",
        metadata={
            "help": "The model the contrast and logprob harm signals read: checkpoint (the last "
            "warm-up checkpoint; the model itself without one) or model (the --model itself, "
            "e.g. an agent you trust, when the warm-up trained on a pool with wrong demos)."
        },
    )
    harm_epochs: int = field(
        default=2, metadata={"help": "Epochs of the contrast signal's tuning on the target.",
                             "min": 1}
    )  # fmt: skip
    harm_lr: float = field(
        default=1e-3, metadata={"help": "Learning rate of the contrast signal's tuning."}
    )
    harm_folds: int = field(
        default=4,
        metadata={"help": "Cross-fitting folds of the target calibrating the contrast flag.",
                  "min": 2},
    )  # fmt: skip
    null_directions: int = field(
        default=32,
        metadata={"help": "Random target directions of the harmful null.", "min": 1},
    )
    shard_items: int = field(
        default=256,
        metadata={"help": "Trajectories per store shard (the unit of resume).", "min": 1},
    )
    baselines: bool = field(
        default=True,
        metadata={"help": "Also compute baseline statistics (loss, grad norm, length, RDS+)."},
    )
    seed: int = field(default=0, metadata={"help": "Projection, K-FAC sample and null seed."})
    device: str = field(
        default="auto",
        metadata={"help": "auto (cuda if visible, else cpu), cpu, cuda, cuda:1, ..."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model code from the model directory (off: no code from data)."},
    )
    dtype: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32",
        metadata={
            "help": "Dtype of the model's weights (fp16 needs a GPU); features and scores stay "
            "fp32."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Replace the model's chat template: chatml-tools, llama3-tools or a Jinja "
            "file (recorded in the store fingerprint). Templates that drop tool calls are "
            "refused."
        },
    )
    update_mask_from: tuple[str, str] | None = field(
        default=None,
        metadata={
            "help": "Two checkpoint dirs (repeat the option): track only parameters that moved "
            "between them by more than --update-mask-threshold (where RL updates land)."
        },
    )
    kfac_max_items: int = field(
        default=256,
        metadata={"help": "Pool items sampled (seeded) for K-FAC factors.", "min": 1},
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.update_mask_from is not None and len(self.update_mask_from) != 2:
            raise ConfigError(
                "ScoreJobConfig", "update_mask_from", "needs exactly two checkpoint dirs"
            )
        modes = PRECONDITIONERS[self.scoring.preconditioner].modes
        if self.extraction.mode not in modes:
            raise ConfigError(
                "ScoreConfig",
                "preconditioner",
                f"{self.scoring.preconditioner!r} needs mode {' or '.join(modes)}",
            )
        if not self.harm_lr > 0:
            raise ConfigError("ScoreJobConfig", "harm_lr", f"must be > 0, got {self.harm_lr}")
        if not 0 < self.harmful_alpha < 1:
            raise ConfigError(
                "ScoreJobConfig", "harmful_alpha", f"must be in (0, 1), got {self.harmful_alpha}"
            )

    def to_dict(self) -> dict:
        """A JSON-able dict of the whole config."""
        return asdict(self)


@dataclass(frozen=True)
class JobOption:
    """One flat option of the scoring job: field ``field`` of config class ``owner``."""

    name: str
    owner: type
    field: str
    type: Any
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def job_options() -> dict[str, JobOption]:
    """The job's flat options, in order, from the fields of :class:`ExtractionConfig`,
    :class:`ScoreConfig` and :class:`ScoreJobConfig` that have a help (``metadata["cli"]``
    False hides one). A field's option name is the field's (``metadata["flag"]`` where two
    configs share one) and its default the field's (``metadata["cli_default"]`` where the
    option resolves a value, e.g. ``preconditioner="auto"``)."""
    out: dict[str, JobOption] = {}
    for owner in (ExtractionConfig, ScoreConfig, ScoreJobConfig):
        hints = get_type_hints(owner)
        for f in fields(owner):
            if "help" not in f.metadata or f.metadata.get("cli") is False:
                continue
            name = f.metadata.get("flag", f.name)
            if name in out:
                raise TypeError(f"job option '{name}' defined twice")  # a bug, not user input
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            default = f.metadata.get("cli_default", default)
            out[name] = JobOption(name, owner, f.name, hints[f.name], default, f.metadata["help"])
    return out


def build_job_config(*, has_checkpoints: bool = False, **options: Any) -> ScoreJobConfig:
    """A scoring job config from flat options (:func:`job_options`: what the CLI exposes);
    options not given keep their defaults.

    ``preconditioner="auto"`` (the default) picks Adam in LESS mode and the factored Adam in
    factorized mode when warmup checkpoints (with optimizer moments) are given
    (``has_checkpoints``), and none otherwise. ``seed`` seeds the projections too. A bad value
    raises :class:`TrajinfError` naming its option (``--workers: must be >= 1, got 0``).
    """
    table = job_options()
    unknown = sorted(set(options) - set(table))
    if unknown:
        raise TrajinfError(f"unknown job option(s) {unknown}; known: {sorted(table)}")
    values = {name: opt.default for name, opt in table.items()} | options
    if values["preconditioner"] == "auto":
        auto = "adam" if values["mode"] == "less" else "factored_adam"
        values["preconditioner"] = auto if has_checkpoints else "none"
    kwargs: dict[type, dict[str, Any]] = {o: {} for o in (ExtractionConfig, ScoreConfig)}
    kwargs[ScoreJobConfig] = {}
    for name, value in values.items():
        kwargs[table[name].owner][table[name].field] = value
    try:
        return ScoreJobConfig(
            extraction=ExtractionConfig(**kwargs[ExtractionConfig], seed=values["seed"]),
            scoring=ScoreConfig(**kwargs[ScoreConfig]),
            **kwargs[ScoreJobConfig],
        )
    except ConfigError as e:
        flag = next(
            (o.flag for o in table.values() if o.owner.__name__ == e.owner and o.field == e.field),
            e.field,
        )
        raise TrajinfError(f"{flag}: {e.problem}") from e


@dataclass
class ScoreOutputs:
    """Paths and tables the job produced."""

    out: Path
    trajectories: pd.DataFrame
    steps: pd.DataFrame
    harmful_info: dict
    timings: dict
