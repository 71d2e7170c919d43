"""Atomic file writes: temp file in the same directory, fsync, rename, fsync the directory.

Readers see the old file or the new one, never half of one; every file trajinf writes goes
through here (store shards, manifests, tables, JSON results, K-FAC factors)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd


def atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` via ``write(fileobj)`` into a same-directory temp file, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a table atomically (temp file, fsync, rename): readers see old or new, never half."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def write_json(obj: dict, path: Path) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    text = json.dumps(obj, indent=2, default=str).encode()
    atomic_write(Path(path), lambda f: f.write(text))
