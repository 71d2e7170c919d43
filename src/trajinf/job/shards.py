"""Extraction of a pool's shards into a store, and what it needs: the items table, shard
bounds, checkpoint models and the fingerprint that identifies their features.

A shard's features are computed from that shard's items alone, so they do not depend on which
process computes it or in which order (the distributed byte-identity relies on this).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.data.schema import Trajectory
from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import extract_features
from trajinf.gradients.modules import tracked_modules
from trajinf.models.checkpoints import (
    load_checkpoint_state,
    load_model,
    model_fingerprint,
    tokenizer_fingerprint,
)
from trajinf.models.load import resolve_dtype
from trajinf.store.feature_store import FeatureStore
from trajinf.store.format import file_sha256


def shard_bounds(n_items: int, shard_items: int) -> list[tuple[int, int]]:
    """``[start, stop)`` item ranges of the shards of a pool of ``n_items``."""
    return [(a, min(a + shard_items, n_items)) for a in range(0, n_items, shard_items)]


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


@dataclass(frozen=True)
class PlannedShard:
    """One store shard to extract: the items at positions ``[start, stop)`` of the token list
    handed to :func:`extract_into`, written as shard ``index`` with items table ``rows`` (in
    item order; its ``item`` values need not equal the positions, e.g. when appending)."""

    index: int
    start: int
    stop: int
    rows: pd.DataFrame


def plan_shards(
    items: pd.DataFrame, n_items: int, shard_items: int, *, first_shard: int = 0
) -> list[PlannedShard]:
    """Cut ``n_items`` items (positions 0.. of the token list; ``items["item"]`` counts from
    its minimum) into shards of ``shard_items``, numbered from ``first_shard``."""
    first = int(items["item"].min()) if len(items) else 0
    item = items["item"].to_numpy() - first
    return [
        PlannedShard(first_shard + k, a, b, items[(item >= a) & (item < b)])
        for k, (a, b) in enumerate(shard_bounds(n_items, shard_items))
    ]


@dataclass(frozen=True)
class UpdateMask:
    """A sparse update mask (parameter name -> bool tensor, as from
    :func:`trajinf.gradients.sparse_update_mask`) and where it came from."""

    masks: dict
    source: dict = field(default_factory=dict)  # e.g. {"from": [a, b], "threshold": t}

    def fingerprint(self) -> dict:
        """What identifies the mask in a store fingerprint: its source and a sha256 of the
        mask bits, so features extracted under another mask (or none) are refused."""
        h = hashlib.sha256()
        for name in sorted(self.masks):
            bits = self.masks[name].detach().cpu().numpy().astype(bool)
            h.update(json.dumps([name, list(bits.shape)]).encode())
            h.update(np.packbits(bits.reshape(-1)).tobytes())
        return {**self.source, "sha256": h.hexdigest()}


def extract_into(
    store: FeatureStore,
    ckpt: int,
    model,
    tokens: Sequence[TokenizedTrajectory],
    shards: Sequence[PlannedShard],
    config: ExtractionConfig,
    state,
    progress: Callable[[int], None] | None,
    done_elsewhere: Callable[[int, int], bool] = lambda c, s: False,
    *,
    update_mask: UpdateMask | dict | None = None,
) -> int:
    """Extract features of ``shards`` not yet in ``store`` at checkpoint ``ckpt``; returns the
    number of items done. The one extraction loop of the job (full runs, ranks and appends).

    A shard's features are computed from that shard's items alone, so they do not depend on
    which process computes it or in which order (the distributed byte-identity relies on this).
    """
    masks = update_mask.masks if isinstance(update_mask, UpdateMask) else update_mask
    done = 0
    for shard in shards:
        start, stop = shard.start, shard.stop
        if store.has_shard(ckpt, shard.index) or done_elsewhere(ckpt, shard.index):
            if progress:
                progress(stop - start)
            continue
        rows = shard.rows.copy()
        item_ids = pd.unique(rows["item"])  # the shard's items, in order
        if len(item_ids) != stop - start:
            raise TrajinfError(
                f"internal: shard {shard.index} has {len(item_ids)} items for "
                f"{stop - start} token sequences"
            )
        by_pos = {}
        for f in extract_features(
            model, tokens[start:stop], config, checkpoint_state=state, update_mask=masks
        ):
            by_pos[f.index] = f
            done += 1
            if progress:
                progress(1)
        order = [storable(by_pos[i]) for i in range(stop - start)]
        feats = [r for f in order for r in (f.trajectory[None, :], f.steps)]
        block = np.concatenate(feats, axis=0) if feats else np.zeros((0, store.dim), np.float32)
        if len(block) != len(rows):
            raise TrajinfError(
                f"internal: shard {shard.index} has {len(block)} feature rows for {len(rows)} items"
            )
        loss = {i: f.loss for i, f in zip(item_ids, order, strict=True)}
        finite = {i: f.finite for i, f in zip(item_ids, order, strict=True)}
        rows["loss"] = rows["item"].map(loss).astype(float)
        rows["finite"] = rows["item"].map(finite).astype(bool)
        store.write_shard(ckpt, shard.index, rows, block)
    return done


def storable(f):
    """``f`` itself, or ``f`` zeroed and marked non-finite when a feature is NaN or inf.

    Such an item is reported in ``job.json["nonfinite"]`` and never scored, like an item with a
    non-finite loss. Finite features of any magnitude are stored (the store scales each row).
    """
    if not f.finite:
        return f
    if np.isfinite(f.trajectory).all() and np.isfinite(f.steps).all():
        return f
    warnings.warn(f"item {f.id}: non-finite features; skipped as non-finite", stacklevel=2)
    return replace(
        f, trajectory=np.zeros_like(f.trajectory), steps=np.zeros_like(f.steps), finite=False
    )


def pool_digest(source, trajs: Sequence[Trajectory]) -> str:
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


def load_checkpoints(
    checkpoints: Sequence[Path],
    config: ExtractionConfig,
    *,
    lora: bool,
    device: str,
    trust_remote_code: bool,
    dtype: str = "fp32",
    chat_template: str | None = None,
) -> tuple[list[tuple], list[dict], dict]:
    """Models (with optimizer state) of every checkpoint, their manifest entries, and the
    fingerprint keys that identify the features (models, tokenizer, tracked modules, config;
    the chat template override by name, when given; its text is in the tokenizer's)."""
    resolve_dtype(dtype, device)  # before any loading: fp16 needs a GPU
    ckpt_info, models = [], []
    for c in checkpoints:
        model, tok = load_model(
            c,
            lora=lora,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            chat_template=chat_template,
        )
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
    if chat_template:
        fingerprint["chat_template"] = chat_template
    return models, ckpt_info, fingerprint
