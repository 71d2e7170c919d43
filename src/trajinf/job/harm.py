"""The scoring job's harm step: the harm score and calibrated flag of every pool trajectory.
Signal ``contrast`` (the default, :mod:`trajinf.job.contrast`) tunes the scoring checkpoint on
the target and reads each action token's log-probability change; ``logprob`` reads the
checkpoint's own log-probabilities (no tuning); ``surprise`` / ``alignment``
(:mod:`trajinf.scoring.calibration`) read the feature stores, with the target re-extracted in
the pool's feature space when the two differ (an extraction preconditioner), into
``OUT/calib/store/pool``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.atomic import write_parquet
from trajinf.data.schema import Trajectory
from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.job.config import ScoreJobConfig
from trajinf.job.contrast import ContrastConfig, contrast_flags, contrast_harm, logprob_harm
from trajinf.job.inputs import subtask_labels
from trajinf.job.shards import resolve_device
from trajinf.scoring.calibration import HarmResult, harm_flags, store_harm
from trajinf.scoring.directions import Directions
from trajinf.scoring.preconditioners import KfacFactors
from trajinf.scoring.source import PoolSource
from trajinf.store.feature_store import FeatureStore

log = logging.getLogger(__name__)

HARM_COLUMNS = ("harm", "worst_step", "harm_p", "n_bad_steps", "assessed")
NO_WARMUP_WARNING = (
    "harm flag (contrast signal) without a warm-up checkpoint: the reference model was not "
    "trained on the pool, so tuning it on the target can move the pool's tokens for reasons "
    "that are not harm (on TextWorld Express the flag fired on 36 of 48 known-good demos at "
    "alpha 0.05, vs 1 of 48 from a pool warm-up; docs/benchmarks.md). Pass --checkpoint dirs "
    "of a short warm-up on a random 5-10 % of the pool, or --harm-signal none to skip the flag."
)


def calibration_store(
    model_dir: str | Path,
    target: Sequence[Trajectory],
    out: Path,
    target_store: FeatureStore,
    checkpoints: Sequence[Path],
    config: ScoreJobConfig,
    extract: Callable,
) -> FeatureStore:
    """The target trajectories in the pool's feature space: the target store itself when the
    pool's extraction equals the target's (no extraction preconditioner), else a resumable
    extraction of the target with the pool's config into ``out/calib/store/pool``
    (``extract``: :func:`trajinf.job.run.extract_job`)."""
    if asdict(config.extraction) == {**asdict(config.extraction), "preconditioner": "none"}:
        return target_store
    return extract(model_dir, list(target), out / "calib", checkpoints=checkpoints,
                   config=config).stores["pool"]  # fmt: skip


def scope_harm(
    res: HarmResult, labels: Mapping[str, str] | None, covered: Iterable[str] | None
) -> HarmResult:
    """``res`` with an ``assessed`` column: True where the trajectory's subtask label
    (``labels``: id -> label) is one of ``covered`` (the known-good target's subtasks), else
    False, and an unassessed trajectory is never flagged (``harmful`` False, no bad steps).
    The harm score itself is kept. ``covered`` None: every trajectory is assessed (scope
    "all"). ``info["scope"]``: the covered subtasks and how many trajectories were left out."""
    t = res.trajectories.copy()
    ids = t["id"].astype(str)
    cover = None if covered is None else sorted(set(map(str, covered)))
    if cover is None:
        assessed = np.ones(len(t), bool)
    else:
        known = labels or {}
        assessed = ids.map(lambda i: known.get(i) in cover).to_numpy(bool)
    t["assessed"] = assessed
    t["harmful"] = t["harmful"].fillna(False).astype(bool) & assessed
    if "n_bad_steps" in t:
        t["n_bad_steps"] = np.where(assessed, t["n_bad_steps"], 0)
    steps = res.steps.copy()
    if "bad" in steps and not assessed.all():
        ok = dict(zip(ids, assessed, strict=True))
        steps["bad"] = steps["bad"].astype(bool) & steps["id"].astype(str).map(ok).fillna(
            False
        ).astype(bool)
    scope = {"covered": cover, "n_unassessed": int((~assessed).sum())}
    return HarmResult(t, steps, {**res.info, "scope": scope})


def job_scope(
    res: HarmResult,
    pool: Sequence[Trajectory],
    target: Sequence[Trajectory],
    config: ScoreJobConfig,
) -> HarmResult:
    """:func:`scope_harm` with the job's ``harm_scope``: "subtask" assesses the pool
    trajectories whose ``subtask_field`` is a known-good target trajectory's (a warning counts
    the others); "all" every one."""
    if config.harm_scope == "all":
        return scope_harm(res, None, None)
    if not pool:
        raise TrajinfError("--harm-scope subtask needs the pool's trajectories (their labels)")
    field_ = config.subtask_field
    covered = {lab for t, lab in zip(target, subtask_labels(list(target), field_), strict=True)
               if t.success is not False}  # fmt: skip
    labels = dict(zip((t.id for t in pool), subtask_labels(list(pool), field_), strict=True))
    res = scope_harm(res, labels, covered)
    n = res.info["scope"]["n_unassessed"]
    if n:
        log.warning(
            "harm flag (--harm-scope subtask): %d of %d pool trajectories have a %s the target "
            "does not show (target: %s); they are not assessed (assessed=False, never flagged)",
            n, len(pool), field_, ", ".join(sorted(covered)),
        )  # fmt: skip
    return res


def contrast_config(config: ScoreJobConfig) -> ContrastConfig:
    """The contrast signal's settings of a job config."""
    return ContrastConfig(epochs=config.harm_epochs, lr=config.harm_lr, folds=config.harm_folds,
                          seed=config.seed, lora=config.lora,
                          batch_tokens=config.extraction.batch_tokens)  # fmt: skip


def job_model_harm(
    model_dir: str | Path,
    checkpoints: Sequence[Path],
    pool_tokens: Sequence[TokenizedTrajectory],
    target: Sequence[Trajectory],
    target_tokens: Sequence[TokenizedTrajectory],
    config: ScoreJobConfig,
) -> HarmResult:
    """The model-based harm signals at the job's last checkpoint (the model itself without
    checkpoints): :func:`trajinf.job.contrast.contrast_harm` (``contrast``: the target's
    subtasks stratify the calibration folds) or :func:`trajinf.job.contrast.logprob_harm`
    (``logprob``); the target's failures (an outcome target) do not calibrate."""
    if not checkpoints and config.harm_signal == "contrast":
        warnings.warn(NO_WARMUP_WARNING, stacklevel=2)
    model, tokenizer = contrast_reference(model_dir, checkpoints, config)
    good = np.array([t.success is not False for t in target])
    if config.harm_signal == "contrast":
        res = contrast_harm(
            model, tokenizer, pool_tokens, target_tokens,
            subtasks=subtask_labels(list(target), config.subtask_field), known_good=good,
            config=contrast_config(config), alpha=config.harmful_alpha,
        )  # fmt: skip
    else:
        res = logprob_harm(model, tokenizer, pool_tokens, target_tokens, known_good=good,
                           alpha=config.harmful_alpha,
                           batch_tokens=config.extraction.batch_tokens)  # fmt: skip
    res.info["reference"] = (
        "checkpoint" if reads_checkpoint(checkpoints, config)
        else "model (--harm-reference model)" if checkpoints
        else "model (no warm-up checkpoint)"
    )  # fmt: skip
    return res


def recorded_reference(harm_info: dict | None) -> str:
    """The ``--harm-reference`` a job's model-based harm step used, from the label
    :func:`job_model_harm` wrote (``job.json["harm"]["reference"]``; "checkpoint" when none)."""
    label = str((harm_info or {}).get("reference", "checkpoint"))
    return "model" if label.startswith("model") else "checkpoint"


def reads_checkpoint(checkpoints: Sequence[Path], config: ScoreJobConfig) -> bool:
    """Whether the model-based harm signals read the last checkpoint (``--harm-reference
    checkpoint`` with a checkpoint) rather than the job's model."""
    return bool(checkpoints) and config.harm_reference == "checkpoint"


def contrast_reference(model_dir: str | Path, checkpoints: Sequence[Path], config: ScoreJobConfig):
    """(model, tokenizer) the model-based harm signals read (and contrast tunes): the job's last
    checkpoint, else (no checkpoint, or ``--harm-reference model``) the model, wrapped in a fresh
    LoRA with ``--lora``; on the job's device."""
    from trajinf.models.checkpoints import load_model

    on_checkpoint = reads_checkpoint(checkpoints, config)
    ref = checkpoints[-1] if on_checkpoint else model_dir
    model, tokenizer = load_model(
        ref, trust_remote_code=config.trust_remote_code, dtype=config.dtype,
        chat_template=config.chat_template, lora=config.lora and not on_checkpoint,
    )  # fmt: skip
    model.to(resolve_device(config.device))
    return model, tokenizer


def job_harm(
    model_dir: str | Path,
    target: Sequence[Trajectory],
    out: Path,
    stores: dict[str, FeatureStore],
    directions: Directions,
    checkpoints: Sequence[Path],
    config: ScoreJobConfig,
    *,
    extract: Callable,
    kfac: Sequence[KfacFactors] | None = None,
    pool_tokens: Sequence[TokenizedTrajectory] | None = None,
    target_tokens: Sequence[TokenizedTrajectory] | None = None,
    pool: Sequence[Trajectory] = (),
) -> HarmResult | None:
    """Harm scores and flags of the pool with ``config.harm_signal`` (None, with a warning,
    when the target cannot calibrate them: fewer than 2 known-good target trajectories with
    steps). ``extract``: :func:`trajinf.job.run.extract_job` (for :func:`calibration_store`);
    the contrast signal needs the pool's and target's tokens. Signal ``none``: None (no flag;
    the contrast step costs folds + 1 short tunings on the target). ``pool``: the pool's
    trajectories, whose subtask labels ``--harm-scope subtask`` reads (:func:`job_scope`)."""
    if config.harm_signal == "none":
        return None
    res = _job_harm(model_dir, target, out, stores, directions, checkpoints, config,
                    extract=extract, kfac=kfac, pool_tokens=pool_tokens,
                    target_tokens=target_tokens)  # fmt: skip
    return None if res is None else job_scope(res, pool, target, config)


def _job_harm(
    model_dir, target, out, stores, directions, checkpoints, config, *, extract, kfac,
    pool_tokens, target_tokens,
) -> HarmResult | None:  # fmt: skip
    try:
        if config.harm_signal in ("contrast", "logprob"):
            if pool_tokens is None or target_tokens is None:
                raise TrajinfError(
                    f"harm signal '{config.harm_signal}' needs the pool and target tokens"
                )
            return job_model_harm(
                model_dir, checkpoints, pool_tokens, target, target_tokens, config
            )
        calib = calibration_store(
            model_dir, target, out, stores["target"], checkpoints, config, extract
        )
        return store_harm(
            stores["pool"],
            stores["target"],
            calib,
            directions,
            config.scoring,
            alpha=config.harmful_alpha,
            signal=config.harm_signal,
            kfac=kfac,
        )
    except TrajinfError as e:
        if "need >= 2" not in str(e):
            raise
        log.warning("harm flag not calibrated: %s", e)
        return None


def merge_harm(traj: pd.DataFrame, harm: HarmResult | None) -> pd.DataFrame:
    """Trajectory table with the harm columns; ``harmful`` becomes the calibrated flag and the
    random-direction null's flag is kept as ``harmful_null`` (``reason_null``)."""
    traj = traj.rename(columns={"harmful": "harmful_null", "reason": "reason_null"})
    if harm is None:
        for c in HARM_COLUMNS:
            traj[c] = np.nan
        traj["harmful"] = False
        return traj
    cols = ["id", *HARM_COLUMNS, "harmful"]
    return traj.merge(harm.trajectories[cols], on="id", how="left")


def append_harm(
    traj: pd.DataFrame,
    new: PoolSource,
    directions: Directions,
    config: ScoreJobConfig,
    job: dict,
    out: Path,
    *,
    reference: Callable[[], tuple] | None = None,
    labels: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Harm columns of appended pool rows at the stored calibration (``job["harm"]``: the same
    threshold as the rows scored first); their per-step rows are added to
    ``out/harm_steps.parquet``. A job scored before harm calibration existed gets NaN.
    ``reference``: () -> (reference model, tokenizer, new rows' tokens, target tokens), for a
    job whose signal is model-based (contrast or logprob). ``labels``: the new rows' subtask
    labels (id -> label), read when the job assessed only the target's subtasks
    (``job["harm"]["scope"]``)."""
    info = job.get("harm")
    if not info:
        return merge_harm(traj, None)
    calibration = np.asarray(info["calibration"], np.float64)
    if info.get("signal") in ("contrast", "logprob"):
        if reference is None:
            raise TrajinfError(f"append: the stored harm signal '{info['signal']}' needs the model")
        model, tokenizer, tokens, target_tokens = reference()
        if info["signal"] == "logprob":
            res = logprob_harm(model, tokenizer, tokens, target_tokens, calibration=calibration,
                               alpha=info["alpha"], statistic=info["statistic"],
                               batch_tokens=config.extraction.batch_tokens)  # fmt: skip
        else:
            cc = ContrastConfig(**info["contrast"])
            res = contrast_flags(model, tokenizer, tokens, target_tokens, calibration, config=cc,
                                 alpha=info["alpha"], statistic=info["statistic"])  # fmt: skip
    else:
        res = harm_flags(
            new,
            directions,
            config.scoring,
            calibration,
            alpha=info["alpha"],
            statistic=info["statistic"],
            signal=info.get("signal", "surprise"),
        )
    res = scope_harm(res, labels, (info.get("scope") or {}).get("covered"))
    path = out / "harm_steps.parquet"
    steps = res.steps
    if path.exists():
        steps = pd.concat([pd.read_parquet(path), steps], ignore_index=True)
    write_parquet(steps.drop_duplicates(["id", "step"], keep="last"), path)
    return merge_harm(traj, res)
