"""The scoring job's harm step: the harm score and calibrated flag of every pool trajectory
(:mod:`trajinf.scoring.calibration`), with the target re-extracted in the pool's feature space
when the two differ (an extraction preconditioner), into ``OUT/calib/store/pool``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.atomic import write_parquet
from trajinf.data.schema import Trajectory
from trajinf.errors import TrajinfError
from trajinf.job.config import ScoreJobConfig
from trajinf.scoring.calibration import HarmResult, harm_flags, store_harm
from trajinf.scoring.directions import Directions
from trajinf.scoring.preconditioners import KfacFactors
from trajinf.scoring.source import PoolSource
from trajinf.store.feature_store import FeatureStore

log = logging.getLogger(__name__)

HARM_COLUMNS = ("harm", "worst_step", "harm_p", "n_bad_steps")


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
) -> HarmResult | None:
    """Harm scores and flags of the pool (None, with a warning, when the target cannot
    calibrate them: fewer than 2 known-good target trajectories with steps). ``extract``:
    :func:`trajinf.job.run.extract_job` (for :func:`calibration_store`)."""
    calib = calibration_store(
        model_dir, target, out, stores["target"], checkpoints, config, extract
    )
    try:
        return store_harm(
            stores["pool"],
            stores["target"],
            calib,
            directions,
            config.scoring,
            alpha=config.harmful_alpha,
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
) -> pd.DataFrame:
    """Harm columns of appended pool rows at the stored calibration (``job["harm"]``: the same
    threshold as the rows scored first); their per-step rows are added to
    ``out/harm_steps.parquet``. A job scored before harm calibration existed gets NaN."""
    info = job.get("harm")
    if not info:
        return merge_harm(traj, None)
    res = harm_flags(
        new,
        directions,
        config.scoring,
        np.asarray(info["calibration"], np.float64),
        alpha=info["alpha"],
        statistic=info["statistic"],
        signal=info.get("signal", "surprise"),
    )
    path = out / "harm_steps.parquet"
    steps = res.steps
    if path.exists():
        steps = pd.concat([pd.read_parquet(path), steps], ignore_index=True)
    write_parquet(steps.drop_duplicates(["id", "step"], keep="last"), path)
    return merge_harm(traj, res)
