"""Sharded, resumable feature extraction into a store, over one process or many (``torchrun``).

``extract_store`` is the extraction stage of the scoring job. A pool is cut into shards of
``shard_items`` trajectories; a shard's features depend only on its items, so any process may
compute it.

Each rank extracts the shards ``s`` with ``s % world == rank`` into its own partial store
``STORE/.ranks/rank-RRRRR-of-WWWWW/`` (a complete FeatureStore with the same fingerprint, so it
is resumable and checksummed like any other). After a barrier, rank 0 adopts every partial shard
into ``STORE`` in (checkpoint, shard) order and writes the items table and the manifest once; the
result is byte-identical to a single-process run over the same pool. Ranks never write to the
same file, so the only shared-filesystem requirement is that ``os.link``/``os.replace`` work
inside ``STORE``.

Process groups use gloo on CPU and nccl when ranks extract on GPUs. Everything here also works
with ``world == 1`` (no process group), which is what the single-process path uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.checkpoints import (
    load_checkpoint_state,
    load_model,
    model_fingerprint,
    tokenizer_fingerprint,
)
from trajinf.errors import TrajinfError
from trajinf.gradients import ExtractionConfig, extract_features, feature_dim, tracked_modules
from trajinf.store import FeatureStore, file_sha256
from trajinf.tokenize import TokenizedTrajectory
from trajinf.trajectories import Trajectory

log = logging.getLogger(__name__)
ProgressFactory = Callable[[str, int], Callable[[int], None]]

RANKS_DIR = ".ranks"


@dataclass(frozen=True)
class RankContext:
    """Where this process sits in a (possibly one-process) extraction job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (world == 1)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that merges and scores."""
        return self.rank == 0

    def shards(self, n_shards: int) -> list[int]:
        """The shard indices this rank extracts: ``s % world == rank`` (deterministic)."""
        return [s for s in range(n_shards) if s % self.world == self.rank]

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group)."""
        if self.backend is not None:
            import torch.distributed as dist

            dist.barrier()

    def device(self) -> str:
        """The torch device this rank extracts on: ``cuda:LOCAL_RANK`` with nccl, else cpu."""
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"

    def all_ok(self, ok: bool) -> bool:
        """True if ``ok`` on every rank, so one rank's error stops the others at a barrier
        instead of leaving them waiting forever."""
        if self.backend is None:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if ok else 1], device=self.device())
        dist.all_reduce(flag)
        return int(flag.item()) == 0


def rank_context(backend: str | None = None, *, timeout_s: float = 1800.0) -> RankContext:
    """The rank of this process from the ``torchrun`` environment (RANK, WORLD_SIZE,
    LOCAL_RANK); joins the default process group when WORLD_SIZE > 1.

    ``backend`` None picks nccl when CUDA is available, else gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return RankContext()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    import torch
    import torch.distributed as dist

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise TrajinfError(f"--backend must be gloo or nccl, got '{backend}'")
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return RankContext(rank=rank, world=world, local_rank=local, backend=backend)


def shutdown(ctx: RankContext) -> None:
    """Leave the process group joined by :func:`rank_context` (no-op for one process)."""
    if ctx.backend is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def partial_store_path(store: str | Path, rank: int, world: int) -> Path:
    """The partial store of ``rank`` inside ``store``."""
    return Path(store) / RANKS_DIR / f"rank-{rank:05d}-of-{world:05d}"


def shard_bounds(n_items: int, shard_items: int) -> list[tuple[int, int]]:
    """``[start, stop)`` item ranges of the shards of a pool of ``n_items``."""
    return [(a, min(a + shard_items, n_items)) for a in range(0, n_items, shard_items)]


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
    for d in [root, *sorted(root.glob("ckpt-*"))]:
        for f in list(d.glob(".*.tmp")) + list(d.glob(".*.adopt")):
            f.unlink(missing_ok=True)
            n += 1
    return n


def launch(args: Sequence[str], nproc: int, *, torchrun_args: Sequence[str] = ()) -> int:
    """Run ``python -m trajinf ARGS`` on ``nproc`` local processes via ``torchrun
    --standalone`` and return its exit code (multi-node: call torchrun yourself)."""
    if nproc < 1:
        raise TrajinfError(f"--nproc must be >= 1, got {nproc}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *torchrun_args,
        "-m",
        "trajinf",
        *args,
    ]
    env = dict(os.environ)
    # torchrun would otherwise set 1 thread per worker with a warning; share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def items_table(
    trajs: Sequence[Trajectory], tokens: Sequence[TokenizedTrajectory], subtasks: Sequence[str]
) -> pd.DataFrame:
    """One row per trajectory (step -1) followed by one row per kept step, in input order."""
    rows = []
    for i, (t, tok) in enumerate(zip(trajs, tokens, strict=True)):
        act = tok.action_mask.astype(bool)
        steps = np.unique(tok.step_ids[tok.step_ids >= 0])
        base = {
            "id": t.id,
            "task_id": t.task_id,
            "subtask": subtasks[i],
            "source": t.source,
            "success": t.success,
            "reward": t.reward,
            "item": i,
        }
        rows.append({**base, "step": -1, "n_action_tokens": int(act.sum())})
        for s in steps:
            n = int((act & (tok.step_ids == s)).sum())
            rows.append({**base, "step": int(s), "n_action_tokens": n})
    return pd.DataFrame(rows)


def _extract_into(
    store: FeatureStore,
    ckpt: int,
    model,
    tokens: Sequence[TokenizedTrajectory],
    shard_rows: Sequence[pd.DataFrame],
    bounds: Sequence[tuple[int, int]],
    config: ExtractionConfig,
    state,
    shards: Sequence[int],
    progress: Callable[[int], None] | None,
    done_elsewhere: Callable[[int, int], bool] = lambda c, s: False,
    *,
    update_mask: dict | None = None,
) -> int:
    """Extract features of ``shards`` not yet in ``store``; returns the number of items done.

    A shard's features are computed from that shard's items alone, so they do not depend on
    which process computes it or in which order (the distributed byte-identity relies on this).
    """
    done = 0
    for shard in shards:
        start, stop = bounds[shard]
        if store.has_shard(ckpt, shard) or done_elsewhere(ckpt, shard):
            if progress:
                progress(stop - start)
            continue
        by_item = {}
        for f in extract_features(
            model, tokens[start:stop], config, checkpoint_state=state, update_mask=update_mask
        ):
            by_item[start + f.index] = f
            done += 1
            if progress:
                progress(1)
        order = [_storable(by_item[i]) for i in range(start, stop)]
        feats = [r for f in order for r in (f.trajectory[None, :], f.steps)]
        meta = [{"item": start + f.index, "loss": f.loss, "finite": f.finite} for f in order]
        rows = shard_rows[shard].copy()
        block = np.concatenate(feats, axis=0) if feats else np.zeros((0, store.dim), np.float32)
        if len(block) != len(rows):
            raise TrajinfError(
                f"internal: shard {shard} has {len(block)} feature rows for {len(rows)} items"
            )
        info = pd.DataFrame(meta).set_index("item")
        rows["loss"] = rows["item"].map(info["loss"]).astype(float)
        rows["finite"] = rows["item"].map(info["finite"]).astype(bool)
        store.write_shard(ckpt, shard, rows, block)
    return done


_FP16_MAX = float(np.finfo(np.float16).max)


def _storable(f):
    """``f`` itself, or ``f`` zeroed and marked non-finite when the fp16 store cannot hold it.

    Features beyond float16's range (a diverged item) would be stored as inf; such an item is
    reported in ``job.json["nonfinite"]`` and never scored, like an item with a non-finite loss.
    """
    if not f.finite:
        return f
    peak = max(
        float(np.abs(f.trajectory).max(initial=0.0)), float(np.abs(f.steps).max(initial=0.0))
    )
    if np.isfinite(peak) and peak <= _FP16_MAX:
        return f
    warnings.warn(
        f"item {f.id}: features overflow float16 (max |x| = {peak:.3g}); skipped as non-finite",
        stacklevel=2,
    )
    return replace(
        f, trajectory=np.zeros_like(f.trajectory), steps=np.zeros_like(f.steps), finite=False
    )


def _pool_digest(source, trajs: Sequence[Trajectory]) -> str:
    if isinstance(source, (str, Path)) and Path(source).is_file():
        return file_sha256(Path(source))
    h = hashlib.sha256()
    for t in trajs:
        h.update(json.dumps([t.id, t.messages], sort_keys=True, default=str).encode())
    return h.hexdigest()


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; other values unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_checkpoints(
    checkpoints: Sequence[Path],
    config: ExtractionConfig,
    *,
    lora: bool,
    device: str,
    trust_remote_code: bool,
) -> tuple[list[tuple], list[dict], dict]:
    """Models (with optimizer state) of every checkpoint, their manifest entries, and the
    fingerprint keys that identify the features (models, tokenizer, tracked modules, config)."""
    ckpt_info, models = [], []
    for c in checkpoints:
        model, tok = load_model(c, lora=lora, trust_remote_code=trust_remote_code)
        model.to(device)
        state = load_checkpoint_state(c)
        lr = float(state.learning_rate) if state is not None else 1.0
        ckpt_info.append({"path": str(c), "lr": lr, "model": model_fingerprint(model)})
        models.append((model, tok, state))
    for c, (_m, _t, state) in enumerate(models):
        if config.preconditioner != "none" and state is None:
            raise TrajinfError(
                f"preconditioner '{config.preconditioner}' needs optimizer moments, but "
                f"{checkpoints[c]} has no optimizer.safetensors (pass warmup --checkpoint dirs)"
            )
    extraction = asdict(config)
    # The token budget only changes batching, not features (within the fp tolerance stated in
    # docs/operations.md), so a job may resume with another one, e.g. after running out of memory.
    extraction.pop("batch_tokens")
    fingerprint = {
        "models": [ci["model"] for ci in ckpt_info],
        "tokenizer": tokenizer_fingerprint(models[0][1]),
        "modules": [m.name for m in tracked_modules(models[0][0], config.modules)],
        "extraction": extraction,
    }
    return models, ckpt_info, fingerprint


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
    update_mask: dict | None = None,
) -> FeatureStore:
    """Extract (or resume extracting) features of ``trajs`` at every checkpoint into a store.

    The store's fingerprint covers the model weights at each checkpoint, the tokenizer, the
    tracked modules, the extraction config and the input, so reopening it with anything else
    raises StoreMismatchError naming what differs. Shards recorded in the manifest are checked
    against their sha256 first; damaged ones are named in a warning and re-extracted.

    With ``rank`` (world > 1, every rank calls this with the same arguments) each rank extracts
    its shards into a partial store and rank 0 merges them (``trajinf.distributed``); every
    rank returns the merged store.
    """
    ctx = rank or RankContext()
    items = items_table(trajs, tokens, subtasks)
    items.insert(0, "row", np.arange(len(items), dtype=np.int64))
    bounds = shard_bounds(len(tokens), shard_items)
    shard_rows = [items[(items["item"] >= a) & (items["item"] < b)] for a, b in bounds]

    def prepare() -> tuple[list[tuple], list[dict], dict, int]:
        models, ckpt_info, fp = _load_checkpoints(
            checkpoints, config, lora=lora, device=device, trust_remote_code=trust_remote_code
        )
        fingerprint = {**fp, "input_sha256": input_digest, "n_items": len(trajs)}
        return models, ckpt_info, fingerprint, feature_dim(models[0][0], config)

    models: list[tuple] = []

    def run(store: FeatureStore, shards: Sequence[int], elsewhere=lambda c, s: False) -> None:
        clean_temp_files(store.path)
        total = sum(bounds[s][1] - bounds[s][0] for s in shards)
        for c, (model, _tok, state) in enumerate(models):
            tick = (
                progress(f"{label} features, checkpoint {c + 1}/{len(models)}", total)
                if progress
                else None
            )
            _extract_into(
                store,
                c,
                model,
                tokens,
                shard_rows,
                bounds,
                config,
                state,
                shards,
                tick,
                elsewhere,
                update_mask=update_mask,
            )

    if ctx.world == 1:
        models, ckpt_info, fingerprint, dim = prepare()
        store = FeatureStore.create(path, fingerprint=fingerprint, dim=dim, checkpoints=ckpt_info)
        _report_damaged(store)
        run(store, range(len(bounds)))
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
        run(part, ctx.shards(len(bounds)), merged.has_shard if merged else lambda c, s: False)
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
