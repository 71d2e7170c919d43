"""The scoring job's K-FAC factors: one file per checkpoint under ``OUT/kfac``, fingerprinted,
reused on rerun and by append."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trajinf.atomic import atomic_write
from trajinf.errors import StoreCorruptError, TrajinfError
from trajinf.scoring.directions import KfacFactors
from trajinf.store.feature_store import FeatureStore

if TYPE_CHECKING:
    from trajinf.job.config import ScoreJobConfig


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
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


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
    from trajinf.gradients.kfac import kfac_factors
    from trajinf.job.shards import load_checkpoints

    paths = [Path(out) / "kfac" / f"ckpt-{c}.npz" for c in range(len(checkpoints))]
    fps = [kfac_fingerprint(pool_store, c, config) for c in range(len(checkpoints))]
    found: list[KfacFactors | None] = []
    for p, fp in zip(paths, fps, strict=True):
        loaded = load_kfac(p) if p.exists() else None
        found.append(loaded[0] if loaded is not None and loaded[1] == fp else None)
    if all(f is not None for f in found):
        return found  # type: ignore[return-value]
    mask = update_mask() if callable(update_mask) else update_mask
    models, _info, _fp = load_checkpoints(
        checkpoints,
        config.extraction,
        lora=config.lora,
        device=device,
        trust_remote_code=config.trust_remote_code,
        dtype=config.dtype,
        chat_template=config.chat_template,
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
