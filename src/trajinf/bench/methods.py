"""The benchmark's methods: scoring variants (one feature extraction + scoring each) and the
selection methods built on them or on baselines.

A *variant* is a ``trajinf score`` configuration; a *method* is a variant (or a baseline) plus
selection options. Methods that differ only in selection (per-step weights, zero-variance filter,
drop harmful) share their variant's scores.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from trajinf.bench.harm import read_harm_steps
from trajinf.errors import TrajinfError
from trajinf.job.config import build_job_config
from trajinf.selection.priors import PRIORS

# variant name -> build_job_config options (on top of the bench's common ones) + extras
VARIANTS: dict[str, dict] = {
    "inf": {},  # the default: factorized, factored Adam (warmup checkpoints), cosine, max
    "inf-less": {"mode": "less"},  # LESS mode: per-example gradients, Adam (warmup is full-param)
    "inf-noprec": {"preconditioner": "none"},
    "inf-inner": {"metric": "inner"},  # inner product, mean-token loss (length-normalized)
    "inf-inner-sum": {"metric": "inner", "loss_normalization": "sum"},  # no length normalization
    "inf-meanrm": {"remove_mean": True},
    # a fresh LoRA (B = 0: only B carries gradient, a random sketch by A) on the warm model; no
    # preconditioner because the warmup trained full parameters (no LoRA moments)
    "inf-lora": {"lora": True, "preconditioner": "none"},
    "inf-sparse": {"update_mask": True},  # only parameters that moved base -> last checkpoint
    "inf-losssplit": {"step_split": "loss"},  # per-step features from each step's own loss
    # K-FAC in the projected space (per-layer factors from a pool sample): inner and cosine
    "inf-kfac": {"scoring_preconditioner": "kfac", "metric": "inner"},
    "inf-kfac-cos": {"scoring_preconditioner": "kfac"},
    "inf-smf": {"target_mode": "success_minus_failure"},
    "inf-adv": {"target_mode": "advantage"},
    # the default scores with the logprob harm signal (the reference's own surprise, issue 13)
    "inf-logprob": {"harm_signal": "logprob"},
}


@dataclass(frozen=True)
class Method:
    """A selection method: ``select`` method name + the variant whose scores it reads."""

    name: str
    select: str  # trajinf.selection.select.select method
    variant: str | None = "inf"  # scores / statistics come from this variant's run
    options: dict = field(default_factory=dict)  # step_weights, drop_harmful, zero_variance
    prior: str | None = (
        None  # a trajinf.selection.priors step prior: step weights (and ranking for "prior")
    )
    combine: str | None = None  # combine the prior with the influence step scores: rank | product

    @property
    def full(self) -> bool:
        return self.select == "full"


def _influence(name: str, variant: str, **options) -> Method:
    return Method(name, "influence", variant, options)


BENCH_METHODS: dict[str, Method] = {
    **{v: _influence(v, v) for v in VARIANTS},
    "inf+stepw": _influence("inf+stepw", "inf", step_weights=True),
    "inf-losssplit+stepw": _influence("inf-losssplit+stepw", "inf-losssplit", step_weights=True),
    "inf+zerovar": _influence("inf+zerovar", "inf", zero_variance=True),
    "inf-drop-harmful": _influence("inf-drop-harmful", "inf", drop_harmful=True),
    # harm score + calibrated flag (issue 13): drop every flagged trajectory, or repair it
    # (its bad steps weighted 0, dropped only when too much of it is bad)
    "inf+drop-harm": _influence("inf+drop-harm", "inf", harm="drop"),
    "inf+repair": _influence("inf+repair", "inf", harm="repair"),
    # repair without re-ranking: repaired trajectories keep their place (issue 13: re-ranking
    # promoted repaired noisy demos into the budget)
    "inf+repair-inplace": _influence("inf+repair-inplace", "inf", harm="repair-inplace"),
    # the same with the pool's labels as the detector: what repair is worth when detection works
    "inf+drop-logprob": _influence("inf+drop-logprob", "inf-logprob", harm="drop"),
    "inf+drop-oracle": _influence("inf+drop-oracle", "inf", harm="drop-oracle"),
    "inf+repair-oracle": _influence("inf+repair-oracle", "inf", harm="repair-oracle"),
    # step priors (issue 8): alone (rank by the trajectory's mean prior, weights from the prior)
    # and combined with influence (rank by influence, weights from the rank-combined values)
    **{
        f"prior:{p}": Method(f"prior:{p}", "prior", None, {"step_weights": True}, prior=p)
        for p in PRIORS
    },
    **{
        f"inf*{p}": Method(f"inf*{p}", "influence", "inf", {"step_weights": True}, p, "rank")
        for p in PRIORS
    },
    # early experience (scenario "early"): influence top-k of the other items, plus no / all /
    # the influence-selected (same budget fraction) early-experience examples
    **{
        f"inf{tag}": _influence(f"inf{tag}", "inf", early=mode)
        for tag, mode in (("-noee", "none"), ("+allee", "all"), ("+selee", "selected"))
    },
    "random": Method("random", "random", None),
    # task-matched baselines (issue 15): random / success-only among the pool trajectories of
    # the target's families, what task metadata alone knows (loop.steps.select_for_method)
    "task-random": Method("task-random", "task-random", None),
    "task-success": Method("task-success", "task-success", None),
    "full": Method("full", "full", None),
    "success": Method("success", "success", None),
    "rds": Method("rds", "rds"),  # RDS+: hidden-state cosine (statistics of the inf run)
    "loss": Method("loss", "loss"),
    "gradnorm": Method("gradnorm", "gradnorm"),
    "length": Method("length", "length"),
}


def job_config(
    variant: str, *, proj_dim: int, seed: int, demo, target_mode: str | None = None
) -> object:
    """The ScoreJobConfig of a variant (``demo``: DemoData, for the sparse mask's checkpoints;
    ``target_mode``: overrides the variant's)."""
    if variant not in VARIANTS:
        raise TrajinfError(f"bench: unknown scoring variant '{variant}'; known: {sorted(VARIANTS)}")
    opts = dict(VARIANTS[variant])
    if opts.pop("update_mask", False):
        opts["update_mask_from"] = (str(demo.base_dir), str(demo.warm_dir))
    if target_mode is not None:
        opts["target_mode"] = target_mode
    return build_job_config(
        proj_dim=proj_dim,
        has_checkpoints=True,
        subtask_field="family",
        # the target shows some families: its calibration judges those, not the others
        harm_scope="subtask",
        seed=seed,
        max_length=None,
        **opts,
    )


@dataclass
class Scored:
    """A variant's tables and its cost."""

    scores: pd.DataFrame
    steps: pd.DataFrame
    statistics: pd.DataFrame | None
    seconds: float
    timings: dict
    harm_steps: pd.DataFrame | None = None  # per-step harm table of the job (issue 13)


def run_variant(variant: str, scenario, demo, out: Path, *, proj_dim: int, seed: int) -> Scored:
    """Score ``scenario`` with ``variant`` into ``out`` (reused when a finished run is there)."""
    from trajinf.job.run import score_pool
    from trajinf.selection.export import read_scores

    done = out / "bench_done.json"
    if done.exists():
        meta = json.loads(done.read_text())
        s, st, stats = read_scores(out)
        return Scored(s, st, stats, meta["seconds"], meta["timings"], read_harm_steps(out))
    mode = _target_mode(variant, scenario)
    cfg = job_config(variant, proj_dim=proj_dim, seed=seed, demo=demo, target_mode=mode)
    t0 = time.perf_counter()
    res = score_pool(
        demo.warm_dir,
        scenario.pool,
        scenario.target,
        out,
        checkpoints=demo.checkpoints,
        config=cfg,
    )
    seconds = time.perf_counter() - t0
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seconds": seconds, "timings": res.timings}, default=str))
    tmp.replace(done)
    s, st, stats = read_scores(out)
    return Scored(s, st, stats, seconds, res.timings, read_harm_steps(out))


def _target_mode(variant: str, scenario) -> str:
    """The variant's own target mode, else the scenario's (outcome: success-minus-failure)."""
    mode = VARIANTS[variant].get("target_mode")
    return mode or scenario.target_mode
