"""FeatureStore: round trip, atomic writes, resume, corruption, fingerprint mismatch, append."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import trajinf.store.feature_store as store_mod
from trajinf.errors import StoreCorruptError, StoreMismatchError, TrajinfError
from trajinf.store.feature_store import FeatureStore

D = 6
FP = {
    "model_fingerprint": "m1",
    "tokenizer_fingerprint": "t1",
    "modules": ["a", "b"],
    "extraction": {"proj_dim": 36, "seed": 0},
    "n_items": 3,  # callers may pin keys that collide with bookkeeping keys
}
CKPTS = [{"path": "c0", "lr": 1e-4}, {"path": "c1", "lr": 5e-5}]


def items(n_traj: int, first_item: int = 0) -> pd.DataFrame:
    rows = []
    for i in range(first_item, first_item + n_traj):
        rows.append({"id": f"t{i}", "task_id": f"g{i % 2}", "step": -1, "item": i, "reward": 1.0})
        rows += [{"id": f"t{i}", "task_id": f"g{i % 2}", "step": s, "item": i} for s in range(2)]
    return pd.DataFrame(rows)


def feats(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def make(tmp_path, n_shards=2) -> tuple[FeatureStore, list[np.ndarray]]:
    st = FeatureStore.create(tmp_path / "s", fingerprint=FP, dim=D, checkpoints=CKPTS)
    written = []
    for shard in range(n_shards):
        rows = items(2, first_item=2 * shard)
        for c in range(2):
            f = feats(len(rows), 10 * shard + c)
            st.write_shard(c, shard, rows, f)
            if c == 0:
                written.append(f)
    return st, written


def test_round_trip(tmp_path):
    st, written = make(tmp_path)
    st2 = FeatureStore.open(tmp_path / "s", expect=FP)
    assert st2.items["row"].tolist() == list(range(12))
    assert st2.items["reward"].notna().sum() == 4  # extra columns survive
    assert st2.manifest["n_items"] == 4 and st2.manifest["fingerprint"]["n_items"] == 3
    full = st2.features(0)
    assert full.dtype == np.float32
    np.testing.assert_allclose(full, np.concatenate(written), atol=2e-3)  # float16 storage
    rows = np.array([7, 0, 11, 3])
    np.testing.assert_array_equal(st2.features(0, rows), full[rows])
    chunks = list(st2.iter_chunks(0, rows=4))
    assert max(len(r) for r, _ in chunks) <= 4
    np.testing.assert_array_equal(np.concatenate([r for r, _ in chunks]), np.arange(12))
    np.testing.assert_array_equal(np.concatenate([b for _, b in chunks]), full)
    assert st2.learning_rates == [1e-4, 5e-5]
    arr = np.load(st2.shard_path(1, 0), allow_pickle=False)
    assert arr.dtype == np.float16 and arr.shape == (6, D)


def test_leftover_temp_file_is_ignored(tmp_path):
    st, _ = make(tmp_path, n_shards=1)
    # a crash mid-write leaves a temp file beside the real ones; readers must not care
    (tmp_path / "s" / ".manifest.json.abc.tmp").write_text("{garbage")
    (tmp_path / "s" / "ckpt-0" / ".features-00001.npy.x.tmp").write_bytes(b"\x93NUMPY partial")
    st2 = FeatureStore.open(tmp_path / "s", expect=FP)
    assert st2.has_shard(0, 0) and not st2.has_shard(0, 1)
    assert st2.verify() == []
    assert len(st2.features(0)) == 6


def test_crash_before_manifest_drops_unrecorded_items(tmp_path, monkeypatch):
    st, _ = make(tmp_path, n_shards=1)

    def boom() -> None:
        raise RuntimeError("crash")

    monkeypatch.setattr(st, "_write_manifest", boom)
    with pytest.raises(RuntimeError):
        st.write_shard(0, 1, items(2, first_item=2), feats(6, 3))
    st2 = FeatureStore.open(tmp_path / "s")
    assert not st2.has_shard(0, 1)
    assert len(st2.items) == 6  # the half-written shard's items are not visible


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    st, _ = make(tmp_path, n_shards=1)

    def bad_replace(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", bad_replace)  # every store write renames via os.replace
    with pytest.raises(OSError):
        st.write_shard(0, 1, items(2, first_item=2), feats(6, 3))
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "s").rglob("*"))
    assert not st.shard_path(0, 1).exists()


def test_resume_skips_finished_shards(tmp_path, monkeypatch):
    make(tmp_path, n_shards=1)
    writes = []
    real = store_mod.atomic_write
    monkeypatch.setattr(
        store_mod, "atomic_write", lambda p, w: (writes.append(p.name), real(p, w))[1]
    )
    st = FeatureStore.create(tmp_path / "s", fingerprint=FP, dim=D, checkpoints=CKPTS)
    for shard in range(3):
        for c in range(2):
            if not st.has_shard(c, shard):
                rows = items(2, first_item=2 * shard)
                st.write_shard(c, shard, rows, feats(len(rows), shard + c))
    assert sum(n.startswith("features-") for n in writes) == 4  # shards 1, 2 x 2 ckpts only
    assert len(FeatureStore.open(tmp_path / "s").items) == 18


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corruption_detected_and_named(tmp_path, damage):
    st, _ = make(tmp_path)
    p = st.shard_path(1, 1)
    data = bytearray(p.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    st2 = FeatureStore.open(tmp_path / "s")
    assert not st2.has_shard(1, 1) and st2.has_shard(0, 1)
    assert st2.verify() == [(1, 1)]
    with pytest.raises(StoreCorruptError, match="features-00001.npy"):
        st2.features(1)
    st2.features(0)  # the other checkpoint is fine
    # re-extracting just the bad shard repairs the store
    st2.write_shard(1, 1, items(2, first_item=2), feats(6, 11))
    assert FeatureStore.open(tmp_path / "s").verify() == []


def test_missing_shard_named(tmp_path):
    st, _ = make(tmp_path)
    os.unlink(st.shard_path(0, 0))
    with pytest.raises(StoreCorruptError, match="ckpt-0/features-00000.npy"):
        FeatureStore.open(tmp_path / "s").features(0)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"model_fingerprint": "m2"}, "model_fingerprint"),
        ({"tokenizer_fingerprint": "t2"}, "tokenizer_fingerprint"),
        ({"extraction": {"proj_dim": 36, "seed": 1}}, "extraction.seed"),
        ({"modules": ["a"]}, "modules"),
    ],
)
def test_mismatch_names_key(tmp_path, change, key):
    make(tmp_path, n_shards=1)
    with pytest.raises(StoreMismatchError, match=key.replace(".", r"\.")):
        FeatureStore.open(tmp_path / "s", expect={**FP, **change})
    with pytest.raises(StoreMismatchError, match=key.replace(".", r"\.")):
        FeatureStore.create(tmp_path / "s", fingerprint={**FP, **change}, dim=D, checkpoints=CKPTS)


def test_mismatch_dim_and_checkpoints(tmp_path):
    make(tmp_path, n_shards=1)
    with pytest.raises(StoreMismatchError, match="dim"):
        FeatureStore.create(tmp_path / "s", fingerprint=FP, dim=D + 1, checkpoints=CKPTS)
    with pytest.raises(StoreMismatchError, match="checkpoints"):
        FeatureStore.create(tmp_path / "s", fingerprint=FP, dim=D, checkpoints=CKPTS[:1])


def test_append_continues_rows(tmp_path):
    st, _ = make(tmp_path)
    new = items(1, first_item=4)
    shard = st.append(new, [feats(3, 40), feats(3, 41)])
    assert shard == 2
    st2 = FeatureStore.open(tmp_path / "s", expect=FP)
    assert st2.items["row"].tolist() == list(range(15))
    assert st2.items["id"].iloc[-1] == "t4" and st2.manifest["n_items"] == 5
    np.testing.assert_allclose(st2.features(1, np.array([12, 13, 14])), feats(3, 41), atol=2e-3)


def test_bad_inputs_raise(tmp_path):
    st = FeatureStore.create(tmp_path / "s", fingerprint=FP, dim=D, checkpoints=CKPTS)
    with pytest.raises(TrajinfError, match="shape"):
        st.write_shard(0, 0, items(1), feats(2, 0))
    bad = feats(3, 0)
    bad[1, 2] = np.nan
    with pytest.raises(TrajinfError, match=r"non-finite features \(ids \['t0'\]\)"):
        st.write_shard(0, 0, items(1), bad)
    with pytest.raises(TrajinfError, match="'id'"):
        st.write_shard(0, 0, pd.DataFrame({"step": [-1]}), feats(1, 0))
    st.write_shard(0, 0, items(1), feats(3, 0))
    (tmp_path / "s" / "items" / "items-00000.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(StoreCorruptError, match="items-00000.parquet"):
        FeatureStore.open(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{\n  bad")
    with pytest.raises(StoreCorruptError, match=r"manifest.json:2"):
        FeatureStore.open(tmp_path / "s")


def pickled_files(root) -> list[str]:
    """Files under ``root`` that hold (or may hold) pickled data: every file must be JSON,
    parquet, .npy or .npz and load with pickle refused (``allow_pickle=False`` for every array,
    no binary parquet value starting with a pickle protocol header); any other kind counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = []
    for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".npy":
                np.load(f, allow_pickle=False)
            elif f.suffix == ".npz":
                with np.load(f, allow_pickle=False) as z:
                    for k in z.files:
                        z[k]  # an object array raises here
            elif f.suffix == ".parquet":
                t = pq.read_table(f)
                for col in t.columns:
                    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                        if any(v is not None and v[:1] == b"\x80" for v in col.to_pylist()):
                            raise ValueError(f"pickled value in column {col}")
            else:
                raise ValueError("not JSON, parquet, .npy or .npz")
        except Exception as e:  # noqa: BLE001 - any failure to load without pickle counts
            bad.append(f"{f.relative_to(root)}: {e}")
    return bad


def test_no_pickle_in_files(tmp_path, make_tiny_job):
    """Every file a scoring job writes (stores with features + rows files, K-FAC factors,
    tables, JSON) loads with pickle refused; planted pickles are caught."""
    from trajinf.job.config import build_job_config
    from trajinf.job.run import score_pool

    d = make_tiny_job(tmp_path, n_tasks=3)
    cfg = build_job_config(proj_dim=36, scoring_preconditioner="kfac")
    cfg.device, cfg.shard_items, cfg.null_directions = "cpu", 2, 4
    out = tmp_path / "job"
    score_pool(d / "model", d / "pool.jsonl", d / "target.jsonl", out, config=cfg)
    kinds = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert {".json", ".parquet", ".npy", ".npz"} <= kinds
    assert list(out.glob("store/pool/ckpt-0/rows-*.npy")) and list(out.glob("kfac/*.npz"))
    assert pickled_files(out) == []
    # the check can fail: a pickled array, a pickled npz member, a raw pickle, a parquet cell
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    np.save(out / "store" / "pool" / "ckpt-0" / "rows-09999.npy",
            np.array([{"a": 1}], dtype=object), allow_pickle=True)  # fmt: skip
    np.savez(out / "kfac" / "ckpt-9.npz", x=np.array([None, 1], dtype=object))
    (out / "extra.pkl").write_bytes(pickle.dumps({"a": 1}))
    pq.write_table(pa.table({"v": [pickle.dumps(1)]}), out / "pickled.parquet")
    bad = pickled_files(out)
    assert [b.split(":")[0] for b in bad] == [
        "extra.pkl",
        "kfac/ckpt-9.npz",
        "pickled.parquet",
        "store/pool/ckpt-0/rows-09999.npy",
    ]


def test_huge_and_tiny_rows_keep_float16_relative_precision(tmp_path):
    """TWX self rollouts reach |x| ~ 8e4 > float16's 65504: a per-row power-of-two scale keeps
    them (and rows far below float16's normal range) to float16 relative precision."""
    st = FeatureStore.create(tmp_path / "s", fingerprint=FP, dim=D, checkpoints=CKPTS[:1])
    x = feats(6, 3)
    x[0] *= 8e4 / np.abs(x[0]).max()
    x[1] *= 1e9
    x[2] *= 1e-9  # all subnormal or zero in plain float16
    x[3] = 0.0
    st.write_shard(0, 0, items(2), x)
    got = FeatureStore.open(tmp_path / "s").features(0)
    assert np.isfinite(got).all() and not got[3].any()
    np.testing.assert_allclose(got, x, rtol=2.0**-11, atol=0)
    scale = st.row_info(0, 0)["scale"]
    assert scale[3] == 1.0 and scale[0] == 8.0 and (np.log2(scale) % 1 == 0).all()
    stored = np.load(st.shard_path(0, 0), allow_pickle=False).astype(np.float32)
    assert np.abs(stored).max() <= 2.0**14


def test_loss_and_finite_are_kept_per_checkpoint(tmp_path):
    st = FeatureStore.create(tmp_path / "s", fingerprint=FP, dim=D, checkpoints=CKPTS)
    rows = items(2)
    st.write_shard(0, 0, rows.assign(loss=1.5, finite=True), feats(6, 0))
    assert st.items["finite"].all()
    bad = rows.assign(loss=2.5, finite=[True, True, True, False, False, False])
    st.write_shard(1, 0, bad, feats(6, 1))
    for s in (st, FeatureStore.open(tmp_path / "s")):
        # non-finite at any checkpoint: the item is non-finite; `loss` is checkpoint 0's
        assert s.items["finite"].tolist() == [True] * 3 + [False] * 3
        assert (s.items["loss"] == 1.5).all()
        np.testing.assert_array_equal(s.row_info(1, 0)["loss"], np.full(6, 2.5, np.float32))


def test_items_tables_are_written_once_per_shard(tmp_path, monkeypatch):
    writes = []
    real = store_mod.atomic_write
    monkeypatch.setattr(
        store_mod, "atomic_write", lambda p, w: (writes.append(p.name), real(p, w))[1]
    )
    st, _ = make(tmp_path, n_shards=5)
    items_writes = [n for n in writes if n.endswith(".parquet")]
    assert sorted(items_writes) == [f"items-{s:05d}.parquet" for s in range(5)]
    assert len(FeatureStore.open(tmp_path / "s").items) == 30 == len(st.items)


def test_old_format_version_is_refused_by_name(tmp_path):
    make(tmp_path, n_shards=1)
    m = tmp_path / "s" / "manifest.json"
    m.write_text(m.read_text().replace('"format_version": 2', '"format_version": 1'))
    with pytest.raises(StoreMismatchError, match="'format_version' is 1, this trajinf reads 2"):
        FeatureStore.open(tmp_path / "s")


def test_damaged_rows_file_is_named(tmp_path):
    st, _ = make(tmp_path)
    p = tmp_path / "s" / "ckpt-1" / "rows-00000.npy"
    p.write_bytes(p.read_bytes()[:-4])
    st2 = FeatureStore.open(tmp_path / "s")
    assert st2.verify() == [(1, 0)] and not st2.has_shard(1, 0)
    with pytest.raises(StoreCorruptError, match="rows-00000.npy"):
        st2.features(1)


def test_append_takes_per_checkpoint_loss_and_finite(tmp_path):
    st, _ = make(tmp_path, n_shards=1)
    new = items(1, first_item=2).assign(loss_0=0.5, finite_0=True, loss_1=0.7,
                                        finite_1=[False, False, False])  # fmt: skip
    shard = st.append(new, [feats(3, 40), feats(3, 41)])
    st2 = FeatureStore.open(tmp_path / "s")
    new_rows = st2.items[st2.items["id"] == "t2"]
    assert not new_rows["finite"].any() and (new_rows["loss"] == 0.5).all()
    assert "loss_1" not in st2.items.columns
    np.testing.assert_allclose(st2.row_info(1, shard)["loss"], 0.7)
