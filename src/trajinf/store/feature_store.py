"""On-disk feature store: a JSON manifest, per-shard item tables and float16 feature arrays.

Layout and encoding: :mod:`trajinf.store.format` (format version 2). The manifest is the source
of truth: a shard is finished only once the manifest lists it, and every file is written to a
temp file in the same directory, fsynced and ``os.replace``d, so a crash leaves either the old
or the new version, never half a file. Rows of a shard are the same for every checkpoint; its
items table is written once, when the shard is first written, so extraction writes O(rows)
bytes of tables in total, and :attr:`FeatureStore.items` merges the shards' tables on demand.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from trajinf.atomic import atomic_write, fsync_dir
from trajinf.errors import StoreCorruptError, TrajinfError
from trajinf.store.format import (
    MANIFEST,
    PER_CKPT,
    canonical_items,
    check_shard_files,
    encode_rows,
    items_path,
    link_into,
    merge_item_tables,
    new_manifest,
    normalize_items,
    read_item_table,
    read_manifest,
    rows_record,
)
from trajinf.store.reader import ItemParts, ShardReader, check_item_table, read_item_columns

log = logging.getLogger(__name__)


class FeatureStore:
    """A feature store directory. Use :meth:`create` to write and :meth:`open` to read."""

    def __init__(self, path: Path, manifest: dict, parts: dict[int, pa.Table]) -> None:
        self.path = path
        self.manifest = manifest
        # shard -> its items table as on disk (static columns), loaded on first use
        self._parts = parts if isinstance(parts, ItemParts) else ItemParts(path, [], parts)
        self._items: pd.DataFrame | None = None  # merged table, built on first use
        self._custom_items = False  # `items` was replaced (a view): shard tables do not apply
        self._reader = ShardReader(path, int(manifest["dim"]))

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
        manifest = new_manifest(fingerprint, dim, checkpoints)
        store = cls(path, manifest, {})
        store._write_manifest()
        return store

    @classmethod
    def open(cls, path: str | Path, *, expect: dict | None = None) -> FeatureStore:
        """Open a store; with ``expect``, any differing manifest key raises StoreMismatchError.

        Only shards the manifest lists are visible: files of a shard whose manifest write never
        happened (a crash) are ignored, so the shard is re-extracted on resume.
        """
        path = Path(path)
        manifest = read_manifest(path / MANIFEST, expect)
        shards = sorted({int(e["shard"]) for e in manifest["shards"]})
        for s in shards:  # a damaged or missing items table fails here, not mid-scan
            check_item_table(items_path(path, s))
        return cls(path, manifest, ItemParts(path, shards))

    # ------------------------------------------------------------------ items
    @property
    def items(self) -> pd.DataFrame:
        """One row per feature row (trajectory ``step == -1`` or step), in row order: the
        shards' item tables, with ``loss`` of checkpoint 0 and ``finite`` False when the
        item's loss or gradient was not finite at any recorded checkpoint."""
        if self._items is None:
            self._items = self._merged_items()
        return self._items

    @items.setter
    def items(self, table: pd.DataFrame) -> None:
        self._items = table
        self._custom_items = True

    @property
    def is_view(self) -> bool:
        """True when :attr:`items` was replaced (:meth:`view`): readers must take the items
        from it, not from the shards' tables (:meth:`shard_items`)."""
        return self._custom_items

    def shard_items(self, shard: int, columns: Sequence[str] | None = None) -> pa.Table:
        """The static items columns (``id``, ``step``, ...; not ``loss``/``finite``) of one
        recorded shard, in row order, as stored; only ``columns`` are read from disk, so a
        scan holds one shard's few columns at a time."""
        if shard not in self._parts:
            raise StoreCorruptError(f"{self.path}: shard {shard} is not recorded")
        table = self._parts.loaded(shard)
        if table is None and columns is not None:
            return read_item_columns(items_path(self.path, shard), columns)
        table = self._parts[shard] if table is None else table
        return table if columns is None else table.select(list(columns))

    def _merged_items(self) -> pd.DataFrame:
        order = sorted(self._parts)
        n = {s: self._parts[s].num_rows for s in order}
        loss = {s: np.full(n[s], np.nan, np.float32) for s in order}
        finite = {s: np.ones(n[s], bool) for s in order}
        for e in self.manifest["shards"]:
            info = self.row_info(e["ckpt"], e["shard"])
            finite[e["shard"]] &= info["finite"]
            if e["ckpt"] == 0:
                loss[e["shard"]] = info["loss"]
        cat = lambda d: np.concatenate([d[s] for s in order]) if order else None  # noqa: E731
        return merge_item_tables([self._parts[s] for s in order], cat(loss), cat(finite))

    def row_info(self, ckpt: int, shard: int) -> np.ndarray:
        """Per-row ``scale`` (float32), ``loss`` (float32) and ``finite`` (bool) of a recorded
        shard at checkpoint ``ckpt`` (structured array [rows]; checksum verified)."""
        entry = self._entry(ckpt, shard)
        if entry is None:
            raise StoreCorruptError(f"{self.path}: shard {shard} of ckpt {ckpt} is not recorded")
        return self._reader.row_info(entry)

    # ------------------------------------------------------------------ shards
    def shard_path(self, ckpt: int, shard: int) -> Path:
        """Path of the float16 array of ``shard`` at checkpoint ``ckpt``."""
        return self._reader.features_path(ckpt, shard)

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
        """Manifest entries ``{"ckpt","shard","rows":[start,stop],"sha256","rows_sha256"}`` of
        ``ckpt``, by row."""
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
        self._reader.check(entry)

    def verify(self) -> list[tuple[int, int]]:
        """(ckpt, shard) of every recorded shard that is missing or fails its checksum."""
        bad = []
        for e in self.manifest["shards"]:
            self._reader.forget(e["ckpt"], e["shard"])
            try:
                self._check(e)
            except StoreCorruptError:
                bad.append((e["ckpt"], e["shard"]))
        return bad

    # ------------------------------------------------------------------ writing
    def write_shard(self, ckpt: int, shard: int, rows: pd.DataFrame, features: np.ndarray) -> None:
        """Write ``features`` float32 [len(rows), D] as ``shard`` of ``ckpt``, atomically.

        ``rows`` is the items table of the shard (``id`` required; ``row`` optional: if absent,
        row ids are those of the same shard at another checkpoint, else continue after the last
        recorded shard; ``loss`` and ``finite`` are this checkpoint's). Rows are stored as float16
        with a power-of-two scale per row, so finite features of any magnitude are kept to
        float16 relative precision. Non-finite features raise: zero them and pass
        ``finite=False``. Rewriting a recorded shard replaces it.
        """
        features = np.asarray(features)
        if features.ndim != 2 or features.shape != (len(rows), self.dim):
            raise TrajinfError(
                f"{self.path}: shard {shard} features have shape {features.shape}, "
                f"expected ({len(rows)}, {self.dim})"
            )
        f32 = features.astype(np.float32, copy=False)
        if not np.isfinite(f32).all():
            bad = np.asarray(rows["id"])[~np.isfinite(f32).all(axis=1)][:3].tolist()
            raise TrajinfError(
                f"{self.path}: shard {shard} has non-finite features (ids {bad}); zero the "
                "features of non-finite items and mark them finite=False"
            )
        items, lo, hi, existing = self._shard_rows(ckpt, shard, rows)
        f16, scale = encode_rows(f32)
        info = rows_record(scale, items["loss"].to_numpy(np.float32), items["finite"].to_numpy())
        digests = self._write_arrays(ckpt, shard, f16, info)
        if existing is None:
            self._write_part(shard, items)
        self._record(ckpt, shard, lo, hi, *digests)
        self._reader.forget(ckpt, shard, info)
        self._write_manifest()

    def _write_arrays(
        self, ckpt: int, shard: int, f16: np.ndarray, info: np.ndarray
    ) -> tuple[str, str]:
        """Write a shard's feature and rows files; returns their sha256."""
        self._reader.forget(ckpt, shard)
        digests = []
        # the manifest records both checksums only after both files are in place, so a crash
        # between the two writes leaves a pair the manifest does not vouch for (re-extracted)
        for p, arr in ((self._reader.features_path(ckpt, shard), f16),
                       (self._reader.rows_path(ckpt, shard), info)):  # fmt: skip
            p.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            digests.append(hashlib.sha256(buf.getbuffer()).hexdigest())
            atomic_write(p, lambda f, b=buf: f.write(b.getbuffer()))
        return digests[0], digests[1]

    def _write_part(self, shard: int, items: pd.DataFrame) -> None:
        """Write a shard's items table (static columns) and keep it in memory."""
        part = items.drop(columns=list(PER_CKPT))
        p = items_path(self.path, shard)
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        canonical_items(part).to_parquet(buf, index=False)
        atomic_write(p, lambda f: f.write(buf.getvalue()))
        # what is on disk, so a reopened store merges exactly the same tables
        self._parts[shard] = read_item_table(pa.BufferReader(buf.getvalue()))

    def adopt_shards(self, shards: Sequence[tuple[int, int, pd.DataFrame, Path]]) -> None:
        """Take already written shard files ``(ckpt, shard, rows, source)`` into this store
        (e.g. the partial stores of several ranks, on the same filesystem), then write the
        manifest once.

        ``rows`` is a shard's items table with its final ``row`` ids; ``source`` its features
        file, with the rows file (``rows-SHARD.npy``) beside it. Both are checked and
        hard-linked (copied if links are unsupported) into place; the recorded sha256 are
        those of their bytes, so the result is the same as if :meth:`write_shard` had written
        the shards. A crash before the manifest is written leaves the sources intact and the
        new files unrecorded (ignored on open).
        """
        for ckpt, shard, rows, source in shards:
            source = Path(source)
            info_src = source.with_name(self._reader.rows_path(ckpt, shard).name)
            check_shard_files(source, info_src, len(rows), self.dim)
            items, lo, hi, existing = self._shard_rows(ckpt, shard, rows)
            self._reader.forget(ckpt, shard)
            digests = (
                link_into(source, self.shard_path(ckpt, shard)),
                link_into(info_src, self._reader.rows_path(ckpt, shard)),
            )
            if existing is None:
                self._write_part(shard, items)
            self._record(ckpt, shard, lo, hi, *digests)
        if not shards:
            return
        for d in {self.shard_path(c, s).parent for c, s, _, _ in shards}:
            fsync_dir(d)
        self._write_manifest()

    def _shard_rows(
        self, ckpt: int, shard: int, rows: pd.DataFrame
    ) -> tuple[pd.DataFrame, int, int, tuple[int, int] | None]:
        """Validate a shard's rows; returns (items, first row, end row, existing range)."""
        if not 0 <= ckpt < self.n_checkpoints:
            raise TrajinfError(f"{self.path}: ckpt {ckpt} out of range 0..{self.n_checkpoints - 1}")
        existing = self._range(shard)
        start = existing[0] if existing else int(self.manifest["n_rows"])
        items = normalize_items(rows, start)
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
        if existing and self._parts[shard].column("id").to_pylist() != items["id"].tolist():
            raise TrajinfError(
                f"{self.path}: shard {shard} ids differ from the same shard at another checkpoint"
            )
        return items, lo, hi, existing

    def _record(self, ckpt: int, shard: int, lo: int, hi: int, sha: str, rows_sha: str) -> None:
        """Put a written shard into the in-memory manifest (the caller writes it)."""
        self.manifest["shards"] = [
            e for e in self.manifest["shards"] if not (e["ckpt"] == ckpt and e["shard"] == shard)
        ] + [
            {"ckpt": ckpt, "shard": shard, "rows": [lo, hi], "sha256": sha, "rows_sha256": rows_sha}
        ]
        self.manifest["n_rows"] = max(int(self.manifest["n_rows"]), hi)
        self.manifest["n_items"] = sum(
            int(pc.sum(pc.equal(p.column("step"), -1)).as_py() or 0) for p in self._parts.values()
        )
        self._items = None
        self._custom_items = False

    def append(self, rows: pd.DataFrame, features: list[np.ndarray]) -> int:
        """Append one new shard (one float32 [len(rows), D] array per checkpoint) after the
        existing ones; row ids continue. ``rows`` may carry ``loss_{c}`` / ``finite_{c}``
        columns with checkpoint c's values (else ``loss`` / ``finite`` for all). Returns the
        new shard index."""
        if len(features) != self.n_checkpoints:
            raise TrajinfError(
                f"{self.path}: append got {len(features)} arrays for {self.n_checkpoints} checkpoints"
            )
        shard = self.next_shard()
        rows = rows.drop(columns=["row"], errors="ignore")
        per = [f"{k}_{c}" for k in PER_CKPT for c in range(self.n_checkpoints)]
        for c, feats in enumerate(features):
            at = rows.drop(columns=[k for k in per if k in rows.columns])
            for k in PER_CKPT:
                if f"{k}_{c}" in rows.columns:
                    at[k] = rows[f"{k}_{c}"].to_numpy()
            self.write_shard(c, shard, at, feats)
        return shard

    def _write_manifest(self) -> None:
        # Shards in (ckpt, shard) order, whatever order they were written in (resume, repair,
        # several ranks), so equal stores have byte-identical manifests.
        self.manifest["shards"] = sorted(
            self.manifest["shards"], key=lambda e: (e["ckpt"], e["shard"])
        )
        text = json.dumps(self.manifest, indent=1).encode()
        atomic_write(self.path / MANIFEST, lambda f: f.write(text))

    def view(self, keep: np.ndarray) -> FeatureStore:
        """The same store showing only the items rows where ``keep`` (bool [len(items)]), for
        scoring a subset; read-only."""
        v = copy.copy(self)
        v.items = self.items[keep].reset_index(drop=True)
        return v

    # ------------------------------------------------------------------ reading
    def iter_chunks(self, ckpt: int, rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_ids int64 [n], features float32 [n, D])`` blocks of at most ``rows``
        rows, in row order. Memory is bounded by one block."""
        for e in self.shards(ckpt):
            lo, hi = e["rows"]
            for a in range(0, hi - lo, rows):
                local = np.arange(a, min(a + rows, hi - lo), dtype=np.int64)
                yield lo + local, self._reader.rows_of(e, local)

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
            if len(sel) and sel[-1] - sel[0] + 1 == len(sel):
                # contiguous positions (a scan block): read straight into place
                self._reader.rows_of(e, rows[sel] - lo, out=out[sel[0] : sel[-1] + 1])
                done[sel] = True
            elif len(sel):
                out[sel] = self._reader.rows_of(e, rows[sel] - lo)
                done[sel] = True
        if not done.all():
            missing = rows[~done][:5].tolist()
            raise StoreCorruptError(f"{self.path}: rows {missing} are in no shard of ckpt {ckpt}")
        return out
