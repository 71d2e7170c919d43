"""Steps of the scoring job shared by the full and the appending run: reading inputs,
the tables it writes (atomically), the baseline statistics and the job's K-FAC factors."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from trajinf.checkpoints import load_model
from trajinf.errors import StoreCorruptError, TrajinfError
from trajinf.scoring import (
    Directions,
    PoolSource,
    ScoreConfig,
    ScoreResult,
)
from trajinf.scoring_directions import KfacFactors, kfac_precondition
from trajinf.store import FeatureStore, _atomic_write
from trajinf.tokenize import tokenize_pool
from trajinf.trajectories import Trajectory, field_value, load_pool

if TYPE_CHECKING:
    from trajinf.pipeline import ScoreJobConfig


def _subtask_of(trajs: Sequence[Trajectory], name: str) -> list[str]:
    out = []
    for t in trajs:
        v = field_value(t, name)
        out.append("all" if v is None else str(v))
    return out


def _checkpoint_list(model_dir: Path, checkpoints: Sequence[str | Path]) -> list[Path]:
    return [Path(c) for c in checkpoints] if checkpoints else [Path(model_dir)]


def _load_inputs(
    model_dir: Path, pool, target, config: ScoreJobConfig, *, tokenize_pool_too: bool = True
):
    """(pool trajectories, target trajectories, pool tokens or None, target tokens)."""
    pool_trajs = list(pool) if not isinstance(pool, (str, Path)) else load_pool(pool)
    target_trajs = list(target) if not isinstance(target, (str, Path)) else load_pool(target)
    tokenizer = _load_tokenizer(model_dir, trust_remote_code=config.trust_remote_code)
    pool_tok = (
        tokenize_pool(pool_trajs, tokenizer, max_length=config.max_length)
        if tokenize_pool_too
        else None
    )
    target_tok = tokenize_pool(target_trajs, tokenizer, max_length=config.max_length)
    return pool_trajs, target_trajs, pool_tok, target_tok


def _load_tokenizer(model_dir: Path, *, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if (
        not (Path(model_dir) / "config.json").is_file()
        and not (Path(model_dir) / "adapter_config.json").is_file()
    ):
        raise TrajinfError(f"{model_dir}: not a model directory (no config.json)")
    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)


def _with_meta(traj: pd.DataFrame, pool_trajs: Sequence[Trajectory]) -> pd.DataFrame:
    meta = pd.DataFrame(
        {
            "id": [t.id for t in pool_trajs],
            "task_id": [t.task_id for t in pool_trajs],
            "source": [t.source for t in pool_trajs],
            "success": [t.success for t in pool_trajs],
        }
    )
    return meta.merge(traj, on="id", how="left")


def nonfinite_ids(store: FeatureStore) -> list[str]:
    """Ids of the store's trajectories whose loss or gradient was not finite (zero features)."""
    it = store.items
    bad = it[(it["step"] == -1) & ~it["finite"].astype(bool)]
    return [str(i) for i in bad.sort_values("row")["id"]]


def baseline_statistics(
    model_dir,
    pool_tok,
    target_tok,
    pool_store,
    target_store,
    pool_trajs,
    *,
    trust_remote_code: bool = False,
) -> pd.DataFrame:
    """Per-item statistics the baseline selectors need: loss, grad_norm, length, rds."""
    from trajinf.baselines import hidden_state_embeddings, rds_scores

    model, _ = load_model(Path(model_dir), trust_remote_code=trust_remote_code)
    pool_emb = hidden_state_embeddings(model, pool_tok)
    target_emb = hidden_state_embeddings(model, target_tok)
    t_items = target_store.items
    t_sub = t_items[t_items["step"] == -1].sort_values("item")["subtask"].tolist()
    rds = rds_scores(pool_emb, target_emb, t_sub)
    p_items = pool_store.items
    traj_rows = p_items[p_items["step"] == -1].sort_values("item")
    last = len(pool_store.manifest["checkpoints"]) - 1
    feats = pool_store.features(last, rows=traj_rows["row"].to_numpy())
    return pd.DataFrame(
        {
            "id": [t.id for t in pool_trajs],
            "loss": traj_rows["loss"].to_numpy(),
            "grad_norm": np.linalg.norm(feats, axis=1),
            "length": traj_rows["n_action_tokens"].to_numpy(),
            "rds": rds,
        }
    )


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a table atomically (temp file, fsync, rename): readers see old or new, never half."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    _atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def write_json(obj: dict, path: Path) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    text = json.dumps(obj, indent=2, default=str).encode()
    _atomic_write(Path(path), lambda f: f.write(text))


# ---------------------------------------------------------------- K-FAC factors of a job
_KFAC_FP = "__fingerprint__"
_KFAC_MODULES = "__modules__"


def kfac_fingerprint(store: FeatureStore, ckpt: int, config: ScoreJobConfig) -> str:
    """sha256 naming what checkpoint ``ckpt``'s factors depend on: the pool store's
    fingerprint (models, tokenizer, modules, extraction config, input), that checkpoint, the
    update mask's source and the factor sample (size, seed)."""
    key = {
        "store": store.manifest["fingerprint"],
        "dim": store.dim,
        "checkpoint": store.manifest["checkpoints"][ckpt],
        "update_mask_from": config.update_mask_from,
        "max_items": config.kfac_max_items,
        "seed": config.seed,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def save_kfac(path: Path, factors: KfacFactors, fingerprint: str) -> None:
    """Write factors atomically as ``.npz``: ``{module}.A`` / ``{module}.G`` float64 [k, k],
    the module order in ``__modules__`` and the fingerprint in ``__fingerprint__`` (no pickle:
    every array is numeric or fixed-width unicode)."""
    arrays: dict[str, np.ndarray] = {
        _KFAC_FP: np.asarray(fingerprint),
        _KFAC_MODULES: np.asarray(list(factors), dtype=str),
    }
    for name, (a, g) in factors.items():
        arrays[f"{name}.A"], arrays[f"{name}.G"] = a, g
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def load_kfac(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """(factors in module order, fingerprint) of a file written by :func:`save_kfac`."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            names = [str(n) for n in z[_KFAC_MODULES]]
            factors = {n: (z[f"{n}.A"], z[f"{n}.G"]) for n in names}
            return factors, str(z[_KFAC_FP])
    except (OSError, ValueError, KeyError) as e:  # truncated zip, missing array, pickled data
        raise StoreCorruptError(f"{path}: unreadable K-FAC factors ({e}); delete it") from e


def job_kfac_factors(
    out: Path,
    checkpoints: Sequence[Path],
    pool_tok,
    pool_store: FeatureStore,
    config: ScoreJobConfig,
    *,
    update_mask: dict | Callable[[], dict | None] | None = None,
    device: str = "cpu",
) -> list[KfacFactors]:
    """K-FAC factors of every checkpoint, from ``out/kfac/ckpt-{c}.npz`` when the file's
    fingerprint matches, else computed on the pool's tokenized items with the extraction's
    models, optimizer state, update mask and projections, and saved there. ``update_mask`` may
    be a callable, called only when factors are computed (building a mask loads two models)."""
    from trajinf.extract_shards import _load_checkpoints
    from trajinf.gradients.kfac import kfac_factors

    paths = [Path(out) / "kfac" / f"ckpt-{c}.npz" for c in range(len(checkpoints))]
    fps = [kfac_fingerprint(pool_store, c, config) for c in range(len(checkpoints))]
    found: list[KfacFactors | None] = []
    for p, fp in zip(paths, fps, strict=True):
        loaded = load_kfac(p) if p.exists() else None
        found.append(loaded[0] if loaded is not None and loaded[1] == fp else None)
    if all(f is not None for f in found):
        return found  # type: ignore[return-value]
    mask = update_mask() if callable(update_mask) else update_mask
    models, _info, _fp = _load_checkpoints(
        checkpoints,
        config.extraction,
        lora=config.lora,
        device=device,
        trust_remote_code=config.trust_remote_code,
    )
    for c, (model, _tok, state) in enumerate(models):
        if found[c] is None:
            found[c] = kfac_factors(
                model,
                pool_tok,
                config.extraction,
                max_items=config.kfac_max_items,
                seed=config.seed,
                checkpoint_state=state,
                update_mask=mask,
            )
            save_kfac(paths[c], found[c], fps[c])
    return found  # type: ignore[return-value]


def stored_kfac_factors(out: Path, pool_store: FeatureStore, config: ScoreJobConfig):
    """The factors a full run saved under ``out/kfac`` (for appending): they must exist and
    match the pool store, as the appended rows are scored with the stored directions."""
    sets = []
    for c in range(pool_store.n_checkpoints):
        p = Path(out) / "kfac" / f"ckpt-{c}.npz"
        if not p.exists():
            raise TrajinfError(f"{p}: no K-FAC factors to append with; rerun without append")
        factors, fp = load_kfac(p)
        if fp != kfac_fingerprint(pool_store, c, config):
            raise TrajinfError(f"{p}: K-FAC factors of another job; rerun without append")
        sets.append(factors)
    return sets


def kfac_null_scores(
    pool: FeatureStore | PoolSource,
    directions: Directions,
    factors: Sequence[KfacFactors],
    config: ScoreConfig,
    *,
    n_directions: int = 32,
    seed: int = 0,
) -> ScoreResult:
    """:func:`trajinf.selection.null_scores` for K-FAC scoring: each random target is an
    isotropic Gaussian passed through the same (G + lambda I)^-1 . (A + lambda I)^-1 as the
    real targets, then scaled to the real direction's norm, so the null has the anisotropy of
    preconditioned targets rather than of white noise (same table layout as null_scores)."""
    from trajinf.selection import null_scores

    def precondition(c: int, g: np.ndarray) -> np.ndarray:
        return kfac_precondition(g, factors[c], config.kfac_damping)

    res = null_scores(
        pool, directions, config, n_directions=n_directions, seed=seed, transform=precondition
    )
    res.info["kfac"] = True
    return res
