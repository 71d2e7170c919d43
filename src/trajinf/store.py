"""On-disk feature store: a JSON manifest, an items table and sharded float16 feature arrays.

Layout (docs/contracts.md)::

    store/
      manifest.json                       fingerprint, dim, checkpoints, finished shards + sha256
      items.parquet                       one row per feature row (trajectory or step)
      ckpt-{c}/features-{shard:05d}.npy   float16 [rows, D]

The manifest is the source of truth: a shard is finished only once the manifest lists it, and
every file is written to a temp file in the same directory, fsynced and ``os.replace``d, so a
crash leaves either the old or the new version, never half a file. Rows of a shard are the same
for every checkpoint; ``items.parquet`` holds them once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trajinf.errors import StoreCorruptError, StoreMismatchError, TrajinfError

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEMS = "items.parquet"
# Columns every items table has; extra columns the caller passes (e.g. "reward", "family")
# are kept so scoring can group or weight by them.
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
_RESERVED = {"format_version", "fingerprint", "dim", "checkpoints", "shards", "n_items", "n_rows"}


def _atomic_write(path: Path, write: Any) -> None:
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
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _diff(expect: Any, actual: Any, key: str) -> list[str]:
    """Names of (nested) keys whose values differ; lists and tuples compare equal."""
    if isinstance(expect, dict) and isinstance(actual, dict):
        out: list[str] = []
        for k in expect:
            out += _diff(expect[k], actual.get(k), f"{key}.{k}")
        return out
    norm = json.loads(json.dumps(expect, default=str))
    return [] if norm == actual else [key]


def _normalize_items(rows: pd.DataFrame, start: int) -> pd.DataFrame:
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


def _canonical_items(items: pd.DataFrame) -> pd.DataFrame:
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


class FeatureStore:
    """A feature store directory. Use :meth:`create` to write and :meth:`open` to read."""

    def __init__(self, path: Path, manifest: dict, items: pd.DataFrame) -> None:
        self.path = path
        self.manifest = manifest
        self.items = items
        self._verified: set[tuple[int, int]] = set()
        self._maps: dict[tuple[int, int], np.ndarray] = {}  # open memmaps of verified shards

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        fingerprint: dict,
        dim: int,
        checkpoints: list[dict],
        overwrite: bool = False,
    ) -> FeatureStore:
        """Create a store, or reopen an existing one with the same fingerprint (resume).

        ``fingerprint`` holds the manifest keys that identify the features (model_fingerprint,
        tokenizer_fingerprint, modules, extraction, input_sha256, ...); ``checkpoints`` is
        ``[{"path": str, "lr": float}, ...]``. An existing store with a different fingerprint
        raises StoreMismatchError unless ``overwrite`` (which discards its shards).
        """
        path = Path(path)
        expect = {**fingerprint, "dim": int(dim), "checkpoints": checkpoints}
        if (path / MANIFEST).exists() and not overwrite:
            return cls.open(path, expect=expect)
        path.mkdir(parents=True, exist_ok=True)
        fp = json.loads(json.dumps(fingerprint, default=str))
        manifest = {
            "format_version": FORMAT_VERSION,
            # Contract keys (model_fingerprint, ...) at top level for people reading the file;
            # the full fingerprint also under "fingerprint", which `open(expect=)` checks first,
            # so a caller key that collides with a bookkeeping key (n_items) still round-trips.
            **{k: v for k, v in fp.items() if k not in _RESERVED},
            "fingerprint": fp,
            "dim": int(dim),
            "checkpoints": [
                {**json.loads(json.dumps(c, default=str)), "lr": float(c["lr"])}
                for c in checkpoints
            ],
            "shards": [],
            "n_items": 0,
            "n_rows": 0,
        }
        store = cls(path, manifest, _normalize_items(pd.DataFrame({"id": []}), 0))
        store._write_items()
        store._write_manifest()
        return store

    @classmethod
    def open(cls, path: str | Path, *, expect: dict | None = None) -> FeatureStore:
        """Open a store; with ``expect``, any differing manifest key raises StoreMismatchError.

        Items whose shard never made it into the manifest (a crash between the items and the
        manifest write) are dropped, so they are re-extracted on resume.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.exists():
            raise StoreCorruptError(f"{mpath}: no manifest; not a feature store")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise StoreCorruptError(f"{mpath}:{e.lineno}: invalid JSON ({e.msg})") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreMismatchError(
                f"{mpath}: field 'format_version' is {manifest.get('format_version')!r}, "
                f"this trajinf reads {FORMAT_VERSION}"
            )
        if expect:
            fp = manifest.get("fingerprint", {})
            bad = [
                k
                for key in expect
                for k in _diff(expect[key], fp[key] if key in fp else manifest.get(key), key)
            ]
            if bad:
                raise StoreMismatchError(
                    f"{mpath}: store was built with a different {', '.join(bad)}; "
                    "use a new store path or re-extract"
                )
        ipath = path / ITEMS
        try:
            items = pd.read_parquet(ipath) if ipath.exists() else pd.DataFrame({"id": []})
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise StoreCorruptError(f"{ipath}: unreadable items table ({e})") from e
        items = _normalize_items(items, 0)
        store = cls(path, manifest, items)
        store.items = store._recorded(items)
        return store

    # ------------------------------------------------------------------ shards
    def shard_path(self, ckpt: int, shard: int) -> Path:
        """Path of the float16 array of ``shard`` at checkpoint ``ckpt``."""
        return self.path / f"ckpt-{ckpt}" / f"features-{shard:05d}.npy"

    def _entry(self, ckpt: int, shard: int) -> dict | None:
        for e in self.manifest["shards"]:
            if e["ckpt"] == ckpt and e["shard"] == shard:
                return e
        return None

    def _range(self, shard: int) -> tuple[int, int] | None:
        for e in self.manifest["shards"]:
            if e["shard"] == shard:
                return int(e["rows"][0]), int(e["rows"][1])
        return None

    def _recorded(self, items: pd.DataFrame) -> pd.DataFrame:
        keep = np.zeros(len(items), dtype=bool)
        rows = items["row"].to_numpy()
        for e in self.manifest["shards"]:
            keep |= (rows >= e["rows"][0]) & (rows < e["rows"][1])
        return items[keep].sort_values("row").reset_index(drop=True)

    @property
    def n_checkpoints(self) -> int:
        """Number of checkpoints features are stored for."""
        return len(self.manifest["checkpoints"])

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.manifest["dim"])

    @property
    def learning_rates(self) -> list[float]:
        """Learning rate of each checkpoint (the LESS checkpoint weights)."""
        return [float(c["lr"]) for c in self.manifest["checkpoints"]]

    def shards(self, ckpt: int) -> list[dict]:
        """Manifest entries ``{"ckpt","shard","rows":[start,stop],"sha256"}`` of ``ckpt``, by row."""
        es = [e for e in self.manifest["shards"] if e["ckpt"] == ckpt]
        return sorted(es, key=lambda e: e["rows"][0])

    def next_shard(self) -> int:
        """Index of the first shard after every recorded one (for appending)."""
        return 1 + max((e["shard"] for e in self.manifest["shards"]), default=-1)

    def has_shard(self, ckpt: int, shard: int) -> bool:
        """True if the shard is recorded, present and matches its sha256 (resume skips it)."""
        entry = self._entry(ckpt, shard)
        if entry is None:
            return False
        try:
            self._check(entry)
        except StoreCorruptError as e:
            log.warning("%s; it will be re-extracted", e)
            return False
        return True

    def _check(self, entry: dict) -> None:
        key = (entry["ckpt"], entry["shard"])
        if key in self._verified:
            return
        p = self.shard_path(*key)
        if not p.exists():
            raise StoreCorruptError(f"{p}: shard listed in the manifest is missing")
        if file_sha256(p) != entry["sha256"]:
            raise StoreCorruptError(f"{p}: sha256 mismatch (truncated or corrupted shard)")
        self._verified.add(key)

    def verify(self) -> list[tuple[int, int]]:
        """(ckpt, shard) of every recorded shard that is missing or fails its checksum."""
        bad = []
        for e in self.manifest["shards"]:
            self._verified.discard((e["ckpt"], e["shard"]))
            self._maps.pop((e["ckpt"], e["shard"]), None)
            try:
                self._check(e)
            except StoreCorruptError:
                bad.append((e["ckpt"], e["shard"]))
        return bad

    def write_shard(self, ckpt: int, shard: int, rows: pd.DataFrame, features: np.ndarray) -> None:
        """Write ``features`` float16 [len(rows), D] as ``shard`` of ``ckpt``, atomically.

        ``rows`` is the items table of the shard (``id`` required; ``row`` optional: if absent,
        row ids are those of the same shard at another checkpoint, else continue after the last
        recorded shard). Rewriting a recorded shard replaces it.
        """
        features = np.asarray(features)
        if features.ndim != 2 or features.shape != (len(rows), self.dim):
            raise TrajinfError(
                f"{self.path}: shard {shard} features have shape {features.shape}, "
                f"expected ({len(rows)}, {self.dim})"
            )
        f32 = features.astype(np.float32, copy=False)
        if not np.isfinite(f32).all() or np.abs(f32).max(initial=0.0) > np.finfo(np.float16).max:
            raise TrajinfError(
                f"{self.path}: shard {shard} has non-finite or float16-overflowing features; "
                "zero the features of non-finite items and mark them finite=False"
            )
        items, lo, hi, existing = self._shard_rows(ckpt, shard, rows)
        path = self.shard_path(ckpt, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, f32.astype(np.float16), allow_pickle=False)
        digest = hashlib.sha256(buf.getbuffer()).hexdigest()
        self._maps.pop((ckpt, shard), None)
        _atomic_write(path, lambda f: f.write(buf.getbuffer()))
        if existing is None:
            old = self.items
            keep = (old["row"] < lo) | (old["row"] >= hi)
            self.items = pd.concat([old[keep], items], ignore_index=True).sort_values("row")
            self.items = self.items.reset_index(drop=True)
            self._write_items()
        self._record(ckpt, shard, lo, hi, digest)
        self.manifest["n_items"] = int((self.items["step"] == -1).sum())
        self._write_manifest()

    def adopt_shards(self, shards: Sequence[tuple[int, int, pd.DataFrame, Path]]) -> None:
        """Take already written shard files ``(ckpt, shard, rows, source)`` into this store
        (e.g. the partial stores of several ranks, on the same filesystem), then write the
        items table and the manifest once.

        ``rows`` is a shard's items table with its final ``row`` ids. Each file is checked
        (float16 [len(rows), D]) and hard-linked (copied if links are unsupported) into place;
        the recorded sha256 is that of its bytes, so the result is the same as if
        :meth:`write_shard` had written the shards. A crash before the manifest is written
        leaves the sources intact and the new files unrecorded (ignored on open).
        """
        pending: dict[int, pd.DataFrame] = {}
        for ckpt, shard, rows, source in shards:
            source = Path(source)
            try:
                arr = np.load(source, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise StoreCorruptError(f"{source}: unreadable shard ({e})") from e
            shape, dtype = arr.shape, arr.dtype
            del arr
            if shape != (len(rows), self.dim) or dtype != np.float16:
                raise StoreCorruptError(
                    f"{source}: shape {shape} {dtype}, expected ({len(rows)}, {self.dim})"
                )
            items, lo, hi, existing = self._shard_rows(ckpt, shard, rows, pending)
            digest = file_sha256(source)
            path = self.shard_path(ckpt, shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.adopt")
            tmp.unlink(missing_ok=True)
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
            self._maps.pop((ckpt, shard), None)
            os.replace(tmp, path)
            if existing is None:
                pending[shard] = items
            self._record(ckpt, shard, lo, hi, digest)
        if not shards:
            return
        for d in {self.shard_path(c, s).parent for c, s, _, _ in shards}:
            _fsync_dir(d)
        if pending:
            new = pd.concat(list(pending.values()), ignore_index=True)
            old = self.items[~self.items["row"].isin(new["row"])]
            self.items = pd.concat([old, new], ignore_index=True).sort_values("row")
            self.items = self.items.reset_index(drop=True)
            self._write_items()
        self.manifest["n_items"] = int((self.items["step"] == -1).sum())
        self._write_manifest()

    def _shard_rows(
        self,
        ckpt: int,
        shard: int,
        rows: pd.DataFrame,
        pending: dict[int, pd.DataFrame] | None = None,
    ) -> tuple[pd.DataFrame, int, int, tuple[int, int] | None]:
        """Validate a shard's rows; returns (items, first row, end row, existing range).
        ``pending`` holds items of shards recorded but not yet in ``self.items``."""
        if not 0 <= ckpt < self.n_checkpoints:
            raise TrajinfError(f"{self.path}: ckpt {ckpt} out of range 0..{self.n_checkpoints - 1}")
        existing = self._range(shard)
        start = existing[0] if existing else int(self.manifest["n_rows"])
        items = _normalize_items(rows, start)
        r = items["row"].to_numpy()
        lo, hi = (int(r[0]), int(r[-1]) + 1) if len(r) else (start, start)
        if not np.array_equal(r, np.arange(lo, hi)):
            raise TrajinfError(f"{self.path}: shard {shard} rows must be contiguous and ascending")
        if existing and existing != (lo, hi):
            raise TrajinfError(
                f"{self.path}: shard {shard} has rows {existing} at another checkpoint, got {(lo, hi)}"
            )
        for e in self.manifest["shards"]:
            if e["shard"] != shard and e["rows"][0] < hi and lo < e["rows"][1]:
                raise TrajinfError(f"{self.path}: shard {shard} rows overlap shard {e['shard']}")

        if existing:
            if pending and shard in pending:
                known = pending[shard]["id"]
            else:
                known = self.items.loc[(self.items["row"] >= lo) & (self.items["row"] < hi), "id"]
            if known.tolist() != items["id"].tolist():
                raise TrajinfError(
                    f"{self.path}: shard {shard} ids differ from the same shard at another checkpoint"
                )
        return items, lo, hi, existing

    def _record(self, ckpt: int, shard: int, lo: int, hi: int, digest: str) -> None:
        """Put a written shard into the in-memory manifest (the caller writes it)."""
        self.manifest["shards"] = [
            e for e in self.manifest["shards"] if not (e["ckpt"] == ckpt and e["shard"] == shard)
        ] + [{"ckpt": ckpt, "shard": shard, "rows": [lo, hi], "sha256": digest}]
        self.manifest["n_rows"] = max(int(self.manifest["n_rows"]), hi)
        self._verified.add((ckpt, shard))

    def append(self, rows: pd.DataFrame, features: list[np.ndarray]) -> int:
        """Append one new shard (one float16 [len(rows), D] array per checkpoint) after the
        existing ones; row ids continue. Returns the new shard index."""
        if len(features) != self.n_checkpoints:
            raise TrajinfError(
                f"{self.path}: append got {len(features)} arrays for {self.n_checkpoints} checkpoints"
            )
        shard = self.next_shard()
        rows = rows.drop(columns=["row"], errors="ignore")
        for c, feats in enumerate(features):
            self.write_shard(c, shard, rows, feats)
        return shard

    def _write_items(self) -> None:
        buf = io.BytesIO()
        _canonical_items(self.items).to_parquet(buf, index=False)
        _atomic_write(self.path / ITEMS, lambda f: f.write(buf.getvalue()))

    def _write_manifest(self) -> None:
        # Shards in (ckpt, shard) order, whatever order they were written in (resume, repair,
        # several ranks), so equal stores have byte-identical manifests.
        self.manifest["shards"] = sorted(
            self.manifest["shards"], key=lambda e: (e["ckpt"], e["shard"])
        )
        text = json.dumps(self.manifest, indent=1).encode()
        _atomic_write(self.path / MANIFEST, lambda f: f.write(text))

    # ------------------------------------------------------------------ reading
    def _load(self, entry: dict) -> np.ndarray:
        """Memory-map a shard (checksum verified once per process, map kept open)."""
        key = (entry["ckpt"], entry["shard"])
        if key in self._maps:
            return self._maps[key]
        self._check(entry)
        p = self.shard_path(*key)
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
        return arr

    def iter_chunks(self, ckpt: int, rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_ids int64 [n], features float32 [n, D])`` blocks of at most ``rows``
        rows, in row order. Memory is bounded by one block."""
        for e in self.shards(ckpt):
            arr = self._load(e)
            lo = e["rows"][0]
            for a in range(0, arr.shape[0], rows):
                block = np.asarray(arr[a : a + rows], dtype=np.float32)
                yield np.arange(lo + a, lo + a + block.shape[0], dtype=np.int64), block

    def features(self, ckpt: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Features float32 [len(rows), D] of the given row ids (all rows if None), in order."""
        if rows is None:
            blocks = [b for _, b in self.iter_chunks(ckpt)]
            return np.concatenate(blocks) if blocks else np.zeros((0, self.dim), np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        done = np.zeros(len(rows), dtype=bool)
        for e in self.shards(ckpt):
            lo, hi = e["rows"]
            sel = np.nonzero((rows >= lo) & (rows < hi))[0]
            if len(sel):
                local = rows[sel] - lo
                a, b = int(local.min()), int(local.max()) + 1
                arr = self._load(e)
                if b - a <= 4 * len(sel):
                    # dense request (e.g. every trajectory row): one sequential read beats
                    # a page fault per row
                    out[sel] = np.asarray(arr[a:b])[local - a]
                else:
                    order = np.argsort(local, kind="stable")  # mmap reads in file order
                    out[sel[order]] = arr[local[order]]
                done[sel] = True
        if not done.all():
            missing = rows[~done][:5].tolist()
            raise StoreCorruptError(f"{self.path}: rows {missing} are in no shard of ckpt {ckpt}")
        return out
