"""Verified, memory-mapped reads of a feature store's shard files.

A :class:`ShardReader` checks each (checkpoint, shard) pair of files against the sha256 the
manifest records once per process, keeps their memory maps open, and turns stored float16 rows
back into float32 features (times the row scale). It is thread-safe, so scoring can read shards
from a thread pool.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from trajinf.errors import StoreCorruptError
from trajinf.store_format import ROW_DTYPE, features_name, file_sha256, rows_name


class ShardReader:
    """Reads the shard files of the store at ``path`` (feature dimension ``dim``)."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = Path(path)
        self.dim = dim
        self._verified: set[tuple[int, int]] = set()
        self._maps: dict[tuple[int, int], np.ndarray] = {}
        self._rowinfo: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.RLock()

    def features_path(self, ckpt: int, shard: int) -> Path:
        """Path of the float16 array of ``shard`` at checkpoint ``ckpt``."""
        return self.path / f"ckpt-{ckpt}" / features_name(shard)

    def rows_path(self, ckpt: int, shard: int) -> Path:
        """Path of the rows file (scale, loss, finite) of ``shard`` at checkpoint ``ckpt``."""
        return self.path / f"ckpt-{ckpt}" / rows_name(shard)

    def forget(self, ckpt: int, shard: int, info: np.ndarray | None = None) -> None:
        """Drop what is cached of a shard (it is being rewritten); ``info`` is its new rows
        array when the caller just wrote it (and so trusts it)."""
        key = (ckpt, shard)
        with self._lock:
            self._verified.discard(key)
            self._maps.pop(key, None)
            self._rowinfo.pop(key, None)
            if info is not None:
                self._verified.add(key)
                self._rowinfo[key] = info

    def check(self, entry: dict) -> None:
        """Raise StoreCorruptError naming the file if a shard's files are missing or differ
        from their recorded sha256 (verified once, then remembered)."""
        key = (entry["ckpt"], entry["shard"])
        with self._lock:
            if key in self._verified:
                return
            _check_file(self.features_path(*key), entry["sha256"])
            _check_file(self.rows_path(*key), entry["rows_sha256"])
            self._verified.add(key)

    def row_info(self, entry: dict) -> np.ndarray:
        """Structured [rows] array (scale f4, loss f4, finite bool) of a recorded shard."""
        key = (entry["ckpt"], entry["shard"])
        with self._lock:
            if key not in self._rowinfo:
                p = self.rows_path(*key)
                _check_file(p, entry["rows_sha256"])
                try:
                    rec = np.load(p, allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise StoreCorruptError(f"{p}: unreadable rows file ({e})") from e
                n = entry["rows"][1] - entry["rows"][0]
                if rec.dtype != ROW_DTYPE or rec.shape != (n,):
                    raise StoreCorruptError(f"{p}: {rec.dtype} {rec.shape}, expected ({n},) rows")
                self._rowinfo[key] = rec
            return self._rowinfo[key]

    def load(self, entry: dict) -> tuple[np.ndarray, np.ndarray]:
        """(float16 memmap [rows, D], scale float32 [rows]) of a recorded shard."""
        key = (entry["ckpt"], entry["shard"])
        with self._lock:
            if key not in self._maps:
                self.check(entry)
                p = self.features_path(*key)
                try:
                    arr = np.load(p, mmap_mode="r", allow_pickle=False)
                except ValueError as e:
                    raise StoreCorruptError(f"{p}: unreadable shard ({e})") from e
                n = entry["rows"][1] - entry["rows"][0]
                if arr.shape != (n, self.dim) or arr.dtype != np.float16:
                    raise StoreCorruptError(
                        f"{p}: shape {arr.shape} {arr.dtype}, expected ({n}, {self.dim})"
                    )
                self._maps[key] = arr
            return self._maps[key], self.row_info(entry)["scale"]

    def rows_of(self, entry: dict, local: np.ndarray) -> np.ndarray:
        """float32 [len(local), D] features of shard-local row indices ``local``, in order."""
        arr, scale = self.load(entry)
        if not len(local):
            return np.zeros((0, self.dim), np.float32)
        a, b = int(local.min()), int(local.max()) + 1
        if b - a <= 4 * len(local):
            # dense request (e.g. every trajectory row): one sequential read beats a page
            # fault per row
            out = np.asarray(arr[a:b], dtype=np.float32)[local - a]
        else:
            out = np.empty((len(local), self.dim), np.float32)
            order = np.argsort(local, kind="stable")  # mmap reads in file order
            out[order] = arr[local[order]]
        out *= scale[local, None]
        return out


def _check_file(p: Path, sha: str) -> None:
    if not p.exists():
        raise StoreCorruptError(f"{p}: shard file listed in the manifest is missing")
    if file_sha256(p) != sha:
        raise StoreCorruptError(f"{p}: sha256 mismatch (truncated or corrupted shard)")
