"""What a rerun of the scoring job reuses besides its feature stores (``OUT/cache/``).

A killed job keeps every finished store shard; these caches keep the rest of its finished
work, so a resume costs about what was left:

- ``tokens-{pool,target}.npz``: the tokenized inputs;
- ``embeddings/KEY/shard-SSSSS.npy``: RDS+ embeddings of the pool, one file per store shard;
- ``statistics.json``: the key and sha256 of ``OUT/statistics.parquet`` when it was written.

Each entry is keyed by a sha256 of everything it depends on (inputs, tokenizer, max length,
model weights, ...) and written atomically; a file whose key differs is recomputed, never
used. Files hold numbers, fixed-width strings or JSON only (no pickle).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.atomic import atomic_write, write_json
from trajinf.data.schema import Trajectory
from trajinf.data.tokenize import TokenizedTrajectory, tokenize_pool
from trajinf.store.format import file_sha256

CACHE_DIR = "cache"
_KEY = "__key__"


def cache_key(parts: dict) -> str:
    """sha256 hex of a JSON-able dict (the inputs a cached result depends on)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def trajectories_digest(source, trajs: Sequence[Trajectory]) -> str:
    """sha256 of what tokenization reads: the file's bytes when ``source`` is a file, else
    every trajectory's id, messages (with step weights) and tools."""
    if isinstance(source, (str, Path)) and Path(source).is_file():
        return file_sha256(Path(source))
    h = hashlib.sha256()
    for t in trajs:
        h.update(json.dumps([t.id, t.messages, t.tools], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _concat(arrays: list[np.ndarray], empty: type) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, empty)


def save_tokens(path: Path, tokens: Sequence[TokenizedTrajectory], key: str) -> None:
    """Write tokenized trajectories atomically as one ``.npz`` of concatenated arrays (each
    in its own dtype) with offsets, stamped with ``key`` (no pickle)."""
    weights = [t.weights for t in tokens if t.weights is not None]
    arrays = {
        _KEY: np.asarray(key),
        "ids": np.asarray([t.id for t in tokens], dtype=str),
        "offsets": np.cumsum([0] + [len(t.input_ids) for t in tokens], dtype=np.int64),
        "input_ids": _concat([t.input_ids for t in tokens], np.int64),
        "action_mask": _concat([t.action_mask for t in tokens], bool),
        "step_ids": _concat([t.step_ids for t in tokens], np.int32),
        "n_steps": np.array([t.n_steps for t in tokens], dtype=np.int64),
        "dropped_steps": np.array([t.dropped_steps for t in tokens], dtype=np.int64),
        "has_weights": np.array([t.weights is not None for t in tokens], dtype=bool),
        "weights": _concat(weights, np.float32),
        "weight_offsets": np.cumsum([0] + [len(w) for w in weights], dtype=np.int64),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def load_tokens(path: Path, key: str) -> list[TokenizedTrajectory] | None:
    """The tokens :func:`save_tokens` wrote, or None when the file is missing, unreadable or
    stamped with another key."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z[_KEY]) != key:
                return None
            a = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing, truncated or not ours: tokenize again
    off, woff = a["offsets"], a["weight_offsets"]
    out, w = [], 0
    for i, id_ in enumerate(a["ids"]):
        s = slice(off[i], off[i + 1])
        weights = None
        if a["has_weights"][i]:
            weights = a["weights"][woff[w] : woff[w + 1]].copy()
            w += 1
        out.append(
            TokenizedTrajectory(
                id=str(id_),
                input_ids=a["input_ids"][s].copy(),
                action_mask=a["action_mask"][s].copy(),
                step_ids=a["step_ids"][s].copy(),
                n_steps=int(a["n_steps"][i]),
                dropped_steps=int(a["dropped_steps"][i]),
                weights=weights,
            )
        )
    return out


def cached_tokens(
    path: Path | None,
    source,
    trajs: Sequence[Trajectory],
    tokenizer,
    *,
    max_length: int | None,
    tokenizer_key: str,
) -> list[TokenizedTrajectory]:
    """``tokenize_pool(trajs)``, from ``path`` when it holds the tokens of the same input,
    tokenizer (``tokenizer_key``: its fingerprint) and ``max_length``; else tokenized and
    saved there. ``path`` None: no cache."""
    if path is None:
        return tokenize_pool(trajs, tokenizer, max_length=max_length)
    key = cache_key(
        {
            "input": trajectories_digest(source, trajs),
            "tokenizer": tokenizer_key,
            "max_length": max_length,
        }
    )
    found = load_tokens(path, key)
    if found is not None and [t.id for t in found] == [t.id for t in trajs]:
        return found
    tokens = tokenize_pool(trajs, tokenizer, max_length=max_length)
    save_tokens(path, tokens, key)
    return tokens


def cached_shard_arrays(
    directory: Path,
    key: str,
    bounds: Sequence[tuple[int, int]],
    compute: Callable[[int, int], np.ndarray],
) -> np.ndarray:
    """``concatenate([compute(a, b) for a, b in bounds])`` with each block cached as
    ``directory/{key[:16]}/shard-SSSSS.npy`` (float32 [b - a, H]); blocks under another key
    are removed."""
    root = Path(directory)
    here = root / key[:16]
    if root.exists():
        for old in root.iterdir():
            if old.is_dir() and old.name != key[:16]:
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()
    here.mkdir(parents=True, exist_ok=True)
    blocks = []
    for s, (a, b) in enumerate(bounds):
        p = here / f"shard-{s:05d}.npy"
        block = None
        if p.exists():
            try:
                block = np.load(p, allow_pickle=False)
            except (OSError, ValueError, EOFError):
                block = None
            if block is not None and len(block) != b - a:
                block = None
        if block is None:
            block = np.ascontiguousarray(compute(a, b), dtype=np.float32)
            buf = io.BytesIO()
            np.save(buf, block, allow_pickle=False)
            atomic_write(p, lambda f, bb=buf: f.write(bb.getvalue()))
        blocks.append(block)
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)


def cached_table(
    path: Path,
    stamp: Path,
    key: str,
    compute: Callable[[], pd.DataFrame],
    write: Callable[[pd.DataFrame, Path], None],
) -> pd.DataFrame:
    """The table at ``path`` when ``stamp`` (JSON) records ``key`` and the file's sha256;
    else ``compute()``, written to ``path`` and stamped."""
    if path.exists() and stamp.exists():
        try:
            rec = json.loads(stamp.read_text())
        except (OSError, json.JSONDecodeError):
            rec = {}
        if rec.get("key") == key and rec.get("sha256") == file_sha256(path):
            return pd.read_parquet(path)
    table = compute()
    write(table, path)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    write_json({"key": key, "sha256": file_sha256(path)}, stamp)
    return table
