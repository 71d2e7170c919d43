"""Verified, memory-mapped reads of a feature store's shard files.

A :class:`ShardReader` checks each (checkpoint, shard) pair of files against the sha256 the
manifest records once per process and turns stored float16 rows back into float32 features
(times the row scale). It is thread-safe, so scoring can read shards from a thread pool.

Memory stays bounded by what one call reads, not by the store: each read maps the shard file,
copies the requested rows out and unmaps it (a map kept open would keep every page ever read
resident: 573 MiB of RSS after one pass over a 1M-row, D = 256 store), and only the row scales
of the most recently used shards are cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trajinf.errors import StoreCorruptError
from trajinf.store.format import (
    ROW_DTYPE,
    features_name,
    file_sha256,
    items_path,
    read_item_table,
    rows_name,
)

# Bytes of row-info arrays (9 per row) kept cached (at least the last one read): a constant
# however many shards the store has; a shard read again re-reads its small rows file, already
# verified, which costs little next to its features.
ROWINFO_CACHE_BYTES = 4 << 20


class ShardReader:
    """Reads the shard files of the store at ``path`` (feature dimension ``dim``)."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = Path(path)
        self.dim = dim
        self._verified: set[tuple[int, int]] = set()  # both files match the manifest
        self._rows_ok: set[tuple[int, int]] = set()  # the rows file matches the manifest
        self._headers: dict[tuple[int, int], int] = {}  # data offset of a checked .npy
        self._rowinfo: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # LRU
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
            self._rows_ok.discard(key)
            self._headers.pop(key, None)
            self._rowinfo.pop(key, None)
            if info is not None:
                self._verified.add(key)
                self._rows_ok.add(key)
                self._cache_rowinfo(key, info)

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
            self._rows_ok.add(key)

    def row_info(self, entry: dict) -> np.ndarray:
        """Structured [rows] array (scale f4, loss f4, finite bool) of a recorded shard."""
        key = (entry["ckpt"], entry["shard"])
        with self._lock:
            if key in self._rowinfo:
                self._rowinfo.move_to_end(key)
                return self._rowinfo[key]
            p = self.rows_path(*key)
            if key not in self._rows_ok:
                _check_file(p, entry["rows_sha256"])
            try:
                rec = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise StoreCorruptError(f"{p}: unreadable rows file ({e})") from e
            n = entry["rows"][1] - entry["rows"][0]
            if rec.dtype != ROW_DTYPE or rec.shape != (n,):
                raise StoreCorruptError(f"{p}: {rec.dtype} {rec.shape}, expected ({n},) rows")
            self._rows_ok.add(key)
            self._cache_rowinfo(key, rec)
            return rec

    def _cache_rowinfo(self, key: tuple[int, int], info: np.ndarray) -> None:
        self._rowinfo[key] = info
        self._rowinfo.move_to_end(key)
        while len(self._rowinfo) > 1 and (
            sum(a.nbytes for a in self._rowinfo.values()) > ROWINFO_CACHE_BYTES
        ):
            self._rowinfo.popitem(last=False)

    def load(self, entry: dict) -> tuple[np.ndarray, np.ndarray]:
        """(float16 memmap [rows, D], scale float32 [rows]) of a recorded shard. The map is
        the caller's: it is unmapped (its pages leave RSS) once the caller drops it."""
        key = (entry["ckpt"], entry["shard"])
        p = self.features_path(*key)
        n = entry["rows"][1] - entry["rows"][0]
        with self._lock:
            self.check(entry)
            offset = self._headers.get(key)
            if offset is None:
                offset = _npy_offset(p, (n, self.dim))
                self._headers[key] = offset
        try:
            arr = np.memmap(p, dtype=np.float16, mode="r", offset=offset, shape=(n, self.dim))
        except (OSError, ValueError) as e:
            raise StoreCorruptError(f"{p}: unreadable shard ({e})") from e
        return arr, self.row_info(entry)["scale"]

    def rows_of(self, entry: dict, local: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 [len(local), D] features of shard-local row indices ``local``, in order;
        written into ``out`` (float32 [len(local), D]) when given, and returned."""
        if not len(local):
            return np.zeros((0, self.dim), np.float32) if out is None else out
        arr, scale = self.load(entry)
        a, b = int(local.min()), int(local.max()) + 1
        into = out
        if b - a == len(local) and local[0] == a and (np.diff(local) == 1).all():
            # a contiguous run (a scan block): converted straight into its place, no gathered
            # copy and no temporary of a size that changes from block to block (the allocator
            # keeps such freed blocks, and RSS would creep up with the number of shards)
            out = np.empty((b - a, self.dim), np.float32) if out is None else out
            out[...] = arr[a:b]
            out *= scale[a:b, None]
            return out
        if b - a <= 4 * len(local):
            # dense request (e.g. every trajectory row): one sequential read beats a page
            # fault per row
            out = np.asarray(arr[a:b], dtype=np.float32)[local - a]
        else:
            out = np.empty((len(local), self.dim), np.float32)
            order = np.argsort(local, kind="stable")  # mmap reads in file order
            out[order] = arr[local[order]]
        del arr  # unmap now: the pages just read leave this process's RSS
        out *= scale[local, None]
        if into is not None:
            into[...] = out
            return into
        return out


def _npy_offset(p: Path, shape: tuple[int, int]) -> int:
    """Byte offset of the data of the float16 C-order .npy file ``p`` of ``shape``
    (StoreCorruptError naming the file if its header says otherwise)."""
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read is None:
                raise ValueError(f"npy format version {version}")
            got, fortran, dtype = read(f)
            offset = f.tell()
            size = f.seek(0, 2)
    except (OSError, ValueError) as e:
        raise StoreCorruptError(f"{p}: unreadable shard ({e})") from e
    if got != shape or dtype != np.float16 or (fortran and shape[0] > 1 and shape[1] > 1):
        raise StoreCorruptError(f"{p}: shape {got} {dtype}, expected {shape} float16")
    if size - offset < shape[0] * shape[1] * 2:
        raise StoreCorruptError(f"{p}: truncated shard ({size - offset} data bytes)")
    return offset


def _check_file(p: Path, sha: str) -> None:
    if not p.exists():
        raise StoreCorruptError(f"{p}: shard file listed in the manifest is missing")
    if file_sha256(p) != sha:
        raise StoreCorruptError(f"{p}: sha256 mismatch (truncated or corrupted shard)")


class ItemParts(MutableMapping):
    """shard -> its items table as on disk (static columns), read from the store at ``root``
    on first use and then kept: opening a store reads no items table, so a scan that needs
    only a few columns of each shard (``FeatureStore.shard_items``) never holds them all."""

    def __init__(
        self, root: Path, shards: Sequence[int], tables: Mapping[int, pa.Table] | None = None
    ) -> None:
        self._root = Path(root)
        self._lazy = set(shards)
        self._tables: dict[int, pa.Table] = dict(tables or {})
        self._lock = threading.Lock()

    def __getitem__(self, shard: int) -> pa.Table:
        with self._lock:
            if shard not in self._tables:
                if shard not in self._lazy:
                    raise KeyError(shard)
                self._tables[shard] = read_item_table(items_path(self._root, shard))
                self._lazy.discard(shard)
            return self._tables[shard]

    def __setitem__(self, shard: int, table: pa.Table) -> None:
        with self._lock:
            self._lazy.discard(shard)
            self._tables[shard] = table

    def __delitem__(self, shard: int) -> None:
        with self._lock:
            if shard not in self._lazy and shard not in self._tables:
                raise KeyError(shard)
            self._lazy.discard(shard)
            self._tables.pop(shard, None)

    def __contains__(self, shard: object) -> bool:
        return shard in self._lazy or shard in self._tables

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._lazy | set(self._tables)))

    def __len__(self) -> int:
        return len(self._lazy | set(self._tables))

    def loaded(self, shard: int) -> pa.Table | None:
        """The table if it is in memory already, else None (nothing is read)."""
        return self._tables.get(shard)


def check_item_table(p: Path) -> None:
    """StoreCorruptError naming ``p`` if it is missing or its parquet footer is unreadable
    (reads the footer only; the table itself is read when first used)."""
    try:
        pq.read_metadata(p)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise StoreCorruptError(f"{p}: unreadable items table ({e})") from e


def read_item_columns(p: Path, columns: Sequence[str]) -> pa.Table:
    """Only ``columns`` of the items table at ``p`` (StoreCorruptError naming it if damaged)."""
    try:
        return pq.read_table(p, columns=list(columns))
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise StoreCorruptError(f"{p}: unreadable items table ({e})") from e
