"""Sharded, resumable feature extraction into a store, over one process or many (``torchrun``).

``extract_store`` is the extraction stage of the scoring job. A pool is cut into shards of
``shard_items`` trajectories; a shard's features depend only on its items, so any process may
compute it.

Each rank extracts the shards ``s`` with ``s % world == rank`` into its own partial store
``STORE/.ranks/rank-RRRRR-of-WWWWW/`` (a complete FeatureStore with the same fingerprint, so it
is resumable and checksummed like any other). After a barrier, rank 0 adopts every partial shard
into ``STORE`` in (checkpoint, shard) order, writing each new shard's items table and then the
manifest once; the result is byte-identical to a single-process run over the same pool. Ranks
never write to the same file, so the only shared-filesystem requirement is that
``os.link``/``os.replace`` work inside ``STORE``.

Rank contexts and the launcher live in :mod:`trajinf.job.ranks`, the per-shard extraction in
:mod:`trajinf.job.shards`; both are re-exported here. Everything also works with
``world == 1`` (no process group), which is what the single-process path uses.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.data.schema import Trajectory
from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import feature_dim
from trajinf.job.ranks import RankContext
from trajinf.job.shards import (
    UpdateMask,
    extract_into,
    items_table,
    load_checkpoints,
    plan_shards,
)
from trajinf.store.feature_store import FeatureStore
from trajinf.store.format import ITEMS_DIR

log = logging.getLogger(__name__)
ProgressFactory = Callable[[str, int], Callable[[int], None]]

RANKS_DIR = ".ranks"


def partial_store_path(store: str | Path, rank: int, world: int) -> Path:
    """The partial store of ``rank`` inside ``store``."""
    return Path(store) / RANKS_DIR / f"rank-{rank:05d}-of-{world:05d}"


def merge_partial_stores(
    store: FeatureStore,
    world: int,
    shard_rows: Sequence[pd.DataFrame],
) -> int:
    """Adopt every shard the ranks wrote into ``store`` (rank 0, after a barrier); returns the
    number of shard files adopted. ``shard_rows[s]`` is the items table (with final ``row``
    ids) of shard ``s``. Shards already in ``store`` are left alone; a shard that is in neither
    raises TrajinfError naming the rank that should have written it. Partial stores are
    removed once the merged manifest is written."""
    partials: dict[int, FeatureStore | None] = {}
    todo = []
    for c in range(store.n_checkpoints):
        for s, rows in enumerate(shard_rows):
            if store.has_shard(c, s):
                continue
            r = s % world
            if r not in partials:
                p = partial_store_path(store.path, r, world)
                partials[r] = FeatureStore.open(p) if (p / "manifest.json").exists() else None
            part = partials[r]
            if part is None or not part.has_shard(c, s):
                raise TrajinfError(
                    f"{store.path}: rank {r} of {world} did not finish shard {s} of checkpoint "
                    f"{c}; rerun the job (finished shards are kept)"
                )
            # the rank's items carry what extraction added (loss, finite)
            r0, r1 = int(rows["row"].iloc[0]), int(rows["row"].iloc[-1]) + 1
            got = part.items[(part.items["row"] >= r0) & (part.items["row"] < r1)]
            if got["id"].tolist() != rows["id"].tolist():
                raise TrajinfError(
                    f"{part.path}: shard {s} holds other items than this pool's shard {s}; "
                    "remove the partial store and rerun"
                )
            todo.append((c, s, got, part.shard_path(c, s)))
    store.adopt_shards(todo)
    ranks = Path(store.path) / RANKS_DIR
    if ranks.exists():
        shutil.rmtree(ranks)
    return len(todo)


def clean_temp_files(store: str | Path) -> int:
    """Remove temp files a killed writer left in ``store`` (``.NAME.*.tmp``, ``.NAME.adopt``);
    only call it while this process is the store's only writer. Returns how many."""
    n = 0
    root = Path(store)
    for d in [root, root / ITEMS_DIR, *sorted(root.glob("ckpt-*"))]:
        for f in list(d.glob(".*.tmp")) + list(d.glob(".*.adopt")):
            f.unlink(missing_ok=True)
            n += 1
    return n


def extract_store(
    path: Path,
    trajs: Sequence[Trajectory],
    tokens: Sequence[TokenizedTrajectory],
    subtasks: Sequence[str],
    checkpoints: Sequence[Path],
    config: ExtractionConfig,
    *,
    input_digest: str,
    lora: bool = False,
    shard_items: int = 256,
    progress: ProgressFactory | None = None,
    label: str = "pool",
    rank: RankContext | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    update_mask: UpdateMask | dict | None = None,
    dtype: str = "fp32",
    chat_template: str | None = None,
) -> FeatureStore:
    """Extract (or resume extracting) features of ``trajs`` at every checkpoint into a store.

    The store's fingerprint covers the model weights at each checkpoint, the tokenizer, the
    tracked modules, the extraction config and the input, so reopening it with anything else
    raises StoreMismatchError naming what differs; an ``update_mask`` is part of the
    fingerprint too (its source and bits). Shards recorded in the manifest are checked
    against their sha256 first; damaged ones are named in a warning and re-extracted.

    With ``rank`` (world > 1, every rank calls this with the same arguments) each rank extracts
    its shards into a partial store and rank 0 merges them (``trajinf.job.distributed``); every
    rank returns the merged store.
    """
    ctx = rank or RankContext()
    items = items_table(trajs, tokens, subtasks)
    items.insert(0, "row", np.arange(len(items), dtype=np.int64))
    plan = plan_shards(items, len(tokens), shard_items)
    shard_rows = [p.rows for p in plan]
    if update_mask is not None and not isinstance(update_mask, UpdateMask):
        update_mask = UpdateMask(update_mask)

    def prepare() -> tuple[list[tuple], list[dict], dict, int]:
        models, ckpt_info, fp = load_checkpoints(
            checkpoints,
            config,
            lora=lora,
            device=device,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            chat_template=chat_template,
        )
        fingerprint = {**fp, "input_sha256": input_digest, "n_items": len(trajs)}
        # always a key (None: no mask), so a masked store refuses an unmasked job and back
        fingerprint["update_mask"] = update_mask.fingerprint() if update_mask is not None else None
        return models, ckpt_info, fingerprint, feature_dim(models[0][0], config)

    models: list[tuple] = []

    def run(store: FeatureStore, shards: Sequence[int], elsewhere=lambda c, s: False) -> None:
        clean_temp_files(store.path)
        total = sum(plan[s].stop - plan[s].start for s in shards)
        for c, (model, _tok, state) in enumerate(models):
            tick = (
                progress(f"{label} features, checkpoint {c + 1}/{len(models)}", total)
                if progress
                else None
            )
            extract_into(
                store,
                c,
                model,
                tokens,
                [plan[s] for s in shards],
                config,
                state,
                tick,
                elsewhere,
                update_mask=update_mask,
            )

    if ctx.world == 1:
        models, ckpt_info, fingerprint, dim = prepare()
        store = FeatureStore.create(path, fingerprint=fingerprint, dim=dim, checkpoints=ckpt_info)
        _report_damaged(store)
        run(store, range(len(plan)))
        return store

    error: BaseException | None = None
    try:  # everything a rank can fail at, so no rank waits at the merge for a dead one
        models, ckpt_info, fingerprint, dim = prepare()
        merged = (
            FeatureStore.open(path, expect={**fingerprint, "dim": dim, "checkpoints": ckpt_info})
            if (path / "manifest.json").exists()
            else None
        )
        part = FeatureStore.create(
            partial_store_path(path, ctx.rank, ctx.world),
            fingerprint=fingerprint,
            dim=dim,
            checkpoints=ckpt_info,
        )
        run(part, ctx.shards(len(plan)), merged.has_shard if merged else lambda c, s: False)
    except Exception as e:
        error = e
    if not ctx.all_ok(error is None):
        raise error or TrajinfError(f"{path}: another rank failed during extraction; see its log")
    if ctx.is_main:
        try:
            store = FeatureStore.create(
                path, fingerprint=fingerprint, dim=dim, checkpoints=ckpt_info
            )
            clean_temp_files(store.path)
            merge_partial_stores(store, ctx.world, shard_rows)
        except Exception as e:
            error = e
    if not ctx.all_ok(error is None):
        raise error or TrajinfError(f"{path}: rank 0 failed to merge the rank stores")
    return FeatureStore.open(path)


def _report_damaged(store: FeatureStore) -> list[str]:
    """Verify every recorded shard (checksums on open); warn naming each damaged file."""
    bad = [str(store.shard_path(c, s)) for c, s in store.verify()]
    for p in bad:
        log.warning("%s: missing, truncated or corrupted; it will be re-extracted", p)
    return bad
