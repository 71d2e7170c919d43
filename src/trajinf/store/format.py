"""On-disk format of a feature store: file names, atomic writes, row scales, item tables.

Format version 2::

    store/
      manifest.json                       fingerprint, dim, checkpoints, finished shards + sha256
      items/items-{shard:05d}.parquet     the shard's item rows (written once per shard)
      ckpt-{c}/features-{shard:05d}.npy   float16 [rows, D]: each row divided by its scale
      ckpt-{c}/rows-{shard:05d}.npy       structured [rows]: scale f4, loss f4, finite bool

A row is stored as ``float16(x / scale)`` with ``scale`` a power of two chosen so the row's
largest magnitude lands in ``(2**13, 2**14]``: dividing by a power of two is exact, so a row keeps
float16's relative precision (11 significant bits) at any magnitude, including gradients far
beyond float16's range (65504) and tiny ones that would otherwise be subnormal. Version 1 (one
``items.parquet`` for the whole store, unscaled float16, loss of checkpoint 0 only) is refused
with a message naming the version.

Everything here is a pure function of its inputs, so equal contents give byte-identical files
(the distributed merge and the kill tests rely on it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from trajinf.errors import StoreCorruptError, StoreMismatchError, TrajinfError

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ITEMS_DIR = "items"
# Columns every items table has; extra columns the caller passes (e.g. "reward", "family")
# are kept so scoring can group or weight by them. "loss" and "finite" are per checkpoint on
# disk (rows files); the merged table shows the loss of checkpoint 0 and finite at every one.
ITEM_COLUMNS = {
    "row": "int64",
    "id": "str",
    "task_id": "str",
    "step": "int32",
    "n_action_tokens": "int32",
    "source": "str",
    "success": "boolean",
    "item": "int64",
    "loss": "float32",
    "finite": "bool",
}
PER_CKPT = ("loss", "finite")
_ITEM_DEFAULTS: dict[str, Any] = {
    "task_id": None,
    "step": -1,
    "n_action_tokens": 0,
    "source": None,
    "success": pd.NA,
    "item": -1,
    "loss": float("nan"),
    "finite": True,
}
ROW_DTYPE = np.dtype([("scale", "<f4"), ("loss", "<f4"), ("finite", "?")])
# log2 of the largest stored magnitude of a row: 4x headroom below float16's max (65504)
_TOP_EXP = 14


def features_name(shard: int) -> str:
    """File name of a shard's feature array inside ``ckpt-{c}/``."""
    return f"features-{shard:05d}.npy"


def rows_name(shard: int) -> str:
    """File name of a shard's per-row scale/loss/finite array inside ``ckpt-{c}/``."""
    return f"rows-{shard:05d}.npy"


def items_path(root: Path, shard: int) -> Path:
    """Path of a shard's items table."""
    return Path(root) / ITEMS_DIR / f"items-{shard:05d}.parquet"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def link_into(src: Path, dst: Path) -> str:
    """Hard-link (copy if links are unsupported) ``src`` to ``dst`` via a temp name and a
    rename; returns the sha256 of its bytes. The caller fsyncs ``dst``'s directory."""
    digest = file_sha256(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.adopt")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return digest


def check_shard_files(features: Path, rows: Path, n: int, dim: int) -> None:
    """Raise StoreCorruptError unless ``features`` is float16 [n, dim] and ``rows`` a rows
    array [n] (headers only; the features are memory-mapped, not read)."""
    try:
        arr = np.load(features, mmap_mode="r", allow_pickle=False)
        info = np.load(rows, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StoreCorruptError(f"{features}: unreadable shard ({e})") from e
    shape, dtype = arr.shape, arr.dtype
    del arr
    if shape != (n, dim) or dtype != np.float16:
        raise StoreCorruptError(f"{features}: shape {shape} {dtype}, expected ({n}, {dim})")
    if info.dtype != ROW_DTYPE or info.shape != (n,):
        raise StoreCorruptError(f"{rows}: {info.dtype} {info.shape}, not a rows file")


def row_scales(x: np.ndarray) -> np.ndarray:
    """Power-of-two scale float32 [n] per row of finite ``x`` [n, D]: ``x / scale`` has its
    largest magnitude in ``(2**13, 2**14]`` (1 for an all-zero row)."""
    peak = np.abs(x).max(axis=1, initial=0.0).astype(np.float64)
    _, e = np.frexp(np.where(peak > 0, peak, 1.0))  # peak = m * 2**e, 0.5 <= m < 1
    # float32's normal exponent range bounds the scale; rows outside it lose precision only
    # where float32 itself would
    exp = np.clip(e - _TOP_EXP, -126, 127)
    return np.where(peak > 0, np.ldexp(1.0, exp), 1.0).astype(np.float32)


def encode_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 [n, D], scales float32 [n]) of finite float32 ``x`` [n, D]."""
    scale = row_scales(x)
    return (x / scale[:, None]).astype(np.float16), scale


def rows_record(scale: np.ndarray, loss: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """The structured rows array of a shard at one checkpoint."""
    rec = np.zeros(len(scale), ROW_DTYPE)
    rec["scale"], rec["loss"], rec["finite"] = scale, loss, finite
    return rec


def normalize_items(rows: pd.DataFrame, start: int) -> pd.DataFrame:
    """Fill default columns, assign row ids ``start..`` if absent, and fix dtypes."""
    df = rows.reset_index(drop=True).copy()
    if "id" not in df.columns:
        raise TrajinfError("items for write_shard: missing required column 'id'")
    if "row" not in df.columns:
        df["row"] = np.arange(start, start + len(df), dtype=np.int64)
    for col, default in _ITEM_DEFAULTS.items():
        if col not in df.columns:
            df[col] = default
        elif default is not None and default is not pd.NA and df[col].isna().any():
            df[col] = df[col].astype(object).where(df[col].notna(), default)
    for col, dtype in ITEM_COLUMNS.items():
        df[col] = df[col].astype(dtype)
    extra = [c for c in df.columns if c not in ITEM_COLUMNS]
    return df[list(ITEM_COLUMNS) + extra]


def canonical_items(items: pd.DataFrame) -> pd.DataFrame:
    """The items table as written: row order, fixed dtypes, and one dtype per extra column
    chosen from its values (not from how the frame was built: concatenation, a parquet round
    trip on resume, several ranks), so equal contents give byte-identical parquet files."""
    df = items.sort_values("row", kind="stable").reset_index(drop=True)
    for col in df.columns:
        if col in ITEM_COLUMNS:
            continue
        values = df[col]
        present = values[values.notna()]
        if present.empty:
            df[col] = pd.Series([None] * len(df), dtype=object)
        elif all(isinstance(v, (bool, np.bool_)) for v in present):
            df[col] = values.astype("boolean")
        elif all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            for v in present
        ):
            df[col] = values.astype("float64")
        else:
            df[col] = pd.Series([_text_or_none(v) for v in values], dtype="str")
    return df


def _text_or_none(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return None
    return str(v)


def read_item_table(source: Path | pa.BufferReader) -> pa.Table:
    """A shard's items table as stored (StoreCorruptError naming the file if unreadable)."""
    try:
        return pq.read_table(source)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise StoreCorruptError(f"{source}: unreadable items table ({e})") from e


def merge_item_tables(
    tables: list[pa.Table], loss: np.ndarray | None, finite: np.ndarray | None
) -> pd.DataFrame:
    """One items frame from the shards' tables (in row order) plus per-row ``loss`` and
    ``finite``; one concatenation and one dtype pass however many shards there are."""
    if not tables:
        return normalize_items(pd.DataFrame({"id": []}), 0)
    try:
        # a column that is all-null in one shard and typed in another is promoted
        df = pa.concat_tables(tables, promote_options="default").to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # one column typed differently across shards
        df = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    df["loss"], df["finite"] = loss, finite
    return canonical_items(normalize_items(df, 0))


def diff_keys(expect: Any, actual: Any, key: str) -> list[str]:
    """Names of (nested) keys whose values differ; lists and tuples compare equal."""
    if isinstance(expect, dict) and isinstance(actual, dict):
        out: list[str] = []
        for k in expect:
            out += diff_keys(expect[k], actual.get(k), f"{key}.{k}")
        return out
    norm = json.loads(json.dumps(expect, default=str))
    return [] if norm == actual else [key]


_RESERVED = {"format_version", "fingerprint", "dim", "checkpoints", "shards", "n_items", "n_rows"}


def new_manifest(fingerprint: dict, dim: int, checkpoints: list[dict]) -> dict:
    """The manifest of an empty store (see :meth:`trajinf.store.feature_store.FeatureStore.create`)."""
    fp = json.loads(json.dumps(fingerprint, default=str))
    return {
        "format_version": FORMAT_VERSION,
        # Contract keys (model_fingerprint, ...) at top level for people reading the file; the
        # full fingerprint also under "fingerprint", which `read_manifest(expect=)` checks
        # first, so a caller key that collides with a bookkeeping key (n_items) round-trips.
        **{k: v for k, v in fp.items() if k not in _RESERVED},
        "fingerprint": fp,
        "dim": int(dim),
        "checkpoints": [
            {**json.loads(json.dumps(c, default=str)), "lr": float(c["lr"])} for c in checkpoints
        ],
        "shards": [],
        "n_items": 0,
        "n_rows": 0,
    }


def read_manifest(mpath: Path, expect: dict | None = None) -> dict:
    """Read and check a manifest: format version, and with ``expect`` every key in it
    (StoreMismatchError naming the differing keys)."""
    if not mpath.exists():
        raise StoreCorruptError(f"{mpath}: no manifest; not a feature store")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise StoreCorruptError(f"{mpath}:{e.lineno}: invalid JSON ({e.msg})") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreMismatchError(
            f"{mpath}: field 'format_version' is {version!r}, this trajinf reads "
            f"{FORMAT_VERSION}; re-extract into a new path (or delete this store)"
        )
    if expect:
        fp = manifest.get("fingerprint", {})
        bad = [
            k
            for key in expect
            for k in diff_keys(expect[key], fp[key] if key in fp else manifest.get(key), key)
        ]
        if bad:
            raise StoreMismatchError(
                f"{mpath}: store was built with a different {', '.join(bad)}; "
                "use a new store path or re-extract"
            )
    return manifest
