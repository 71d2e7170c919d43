"""Scoring throughput, peak memory, store size and fp16 effect behind ``trajinf bench perf``.

The throughput and memory measurements run in fresh subprocesses (``python -m
trajinf.bench.perf_scoring MODE JSON``) with one BLAS thread: each gets its own peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the GEMM-rate reference and the scoring
GEMMs use the same BLAS under the same thread count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

# LESS (princeton-nlp/LESS, less/data_selection/collect_grad_reps.py @ 1e4afda): projected
# gradients of dim 8192 per training example and checkpoint, in the model dtype (fp16/bf16:
# 2 bytes; fp32 when the model is fp32), saved as torch tensors: grads-{count}.pt chunks, then
# merged into all_orig.pt (normalized) and all_unormalized.pt. Trajectory-level only.
LESS_DIM = 8192
LESS_FILES_AS_WRITTEN = 3  # chunks + all_orig.pt + all_unormalized.pt

_ONE_THREAD = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def run_worker(mode: str, args: dict, timeout: float = 600.0) -> dict:
    """Run ``mode`` of this module in a fresh one-thread Python process; returns its JSON."""
    env = {**os.environ, **_ONE_THREAD}
    proc = subprocess.run(
        [sys.executable, "-m", "trajinf.bench.perf_scoring", mode, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"perf worker {mode} failed: {proc.stderr.strip()[-600:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB.

    ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, except that on Linux a process started by
    fork + exec inherits its parent's peak in ru_maxrss (the kernel keeps the larger of the old
    and new address spaces' high-water marks), so there the own address space's ``VmHWM`` from
    /proc/self/status is used; :func:`ru_maxrss_mb` gives the raw value.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return ru_maxrss_mb()


def ru_maxrss_mb() -> float:
    """``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in MiB (KiB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


class AnonPeak:
    """Samples ``RssAnon`` / ``RssFile`` from /proc/self/status in a thread (Linux): the peak of
    anonymous memory (heap: what scoring allocates) apart from file-backed pages (memory-mapped
    shards, which are page cache: shared and reclaimable, yet counted in ru_maxrss)."""

    def __init__(self, interval: float = 0.002) -> None:
        import threading

        self.interval = interval
        self.anon_mb = self.file_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssFile:")):
                        mb = int(line.split()[1]) / 1024.0
                        if line.startswith("RssAnon"):
                            self.anon_mb = max(self.anon_mb, mb)
                        else:
                            self.file_mb = max(self.file_mb, mb)
        except OSError:  # not Linux: leave the peaks at 0
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def gemm_rate(n: int = 1024, repeats: int = 3) -> float:
    """Measured fp32 GEMM rate (FLOP/s) of numpy's BLAS on square [n, n] @ [n, n], best of N."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def scoring_throughput(n_rows: int, dim: int, n_dirs: list[int], chunks: list[int]) -> dict:
    """Pool x directions scoring in projected space vs the measured GEMM rate.

    For each number of directions V: (1) one raw BLAS GEMM [N, D] @ [D, V] in memory, (2)
    trajinf's chunked scorer (``score_directions`` over an in-memory fp32 pool, cosine) per
    ``chunk_rows``, (3) the streaming path from an fp16 store (``top_k``: one block in memory).
    Efficiency = 2 N D V / seconds / GEMM rate.
    """
    import tempfile

    from trajinf.scoring.directions import Directions
    from trajinf.scoring.scores import score_directions, top_k
    from trajinf.scoring.source import PoolSource, ScoreConfig

    peak = gemm_rate()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_rows, dim), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="trajinf-perf-") as tmp:
        store = _synthetic_store(Path(tmp) / "store", n_rows, dim, shard_rows=65536, seed=0)
        for v in n_dirs:
            dirs = rng.standard_normal((v, dim), dtype=np.float32)
            d = Directions([f"s{i}" for i in range(v)], [dirs], [1.0])
            flops = 2.0 * n_rows * dim * v
            x @ dirs.T  # warm-up
            raw = min(_timed(lambda: x @ dirs.T) for _ in range(2))  # noqa: B023
            row = {
                "directions": v,
                "flops": flops,
                "raw_gemm_s": raw,
                "raw_eff": flops / raw / peak,
            }
            pool = PoolSource.from_arrays(x)
            for c in chunks:
                cfg = ScoreConfig(metric="cosine", chunk_rows=c)
                t = min(_timed(lambda: score_directions(pool, d, cfg)) for _ in range(2))  # noqa: B023
                row[f"chunked_{c}_s"] = t
                row[f"chunked_{c}_eff"] = flops / t / peak
            cfg = ScoreConfig(metric="cosine", chunk_rows=max(chunks))
            t = min(_timed(lambda: top_k(store, d, cfg, 100)) for _ in range(2))  # noqa: B023
            row["streaming_store_s"] = t
            row["streaming_store_eff"] = flops / t / peak
            rows.append(row)
    return {"gemm_flops": peak, "n_rows": n_rows, "dim": dim, "chunks": chunks, "rows": rows}


def _synthetic_store(path: Path, n_rows: int, dim: int, shard_rows: int, seed: int):
    """A one-checkpoint FeatureStore of ``n_rows`` random trajectory rows (fp16 shards)."""
    import pandas as pd

    from trajinf.store.feature_store import FeatureStore

    store = FeatureStore.create(
        path,
        fingerprint={"model_fingerprint": "synthetic", "extraction": {"seed": seed}},
        dim=dim,
        checkpoints=[{"path": "synthetic", "lr": 1.0}],
        overwrite=True,
    )
    rng = np.random.default_rng(seed)
    for a in range(0, n_rows, shard_rows):
        n = min(shard_rows, n_rows - a)
        rows = pd.DataFrame({"id": [f"t{i:07d}" for i in range(a, a + n)], "step": -1})
        store.append(rows, [rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)])
    return store


def build_store(path: str, n_rows: int, dim: int, shard_rows: int = 100_000) -> dict:
    """Worker: write a synthetic store; returns its size on disk."""
    t0 = time.perf_counter()
    _synthetic_store(Path(path), n_rows, dim, shard_rows, seed=1)
    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return {"seconds": time.perf_counter() - t0, "bytes": size}


def score_store_rss(path: str, n_dirs: int, mode: str, chunk_rows: int = 65536) -> dict:
    """Worker: score every row of a store against ``n_dirs`` random directions and report peak
    RSS. ``mode`` "top_k": trajinf's streaming ``top_k`` (row numbers, one shard's step column
    and one block in memory; ids of the winners only); "features": the features alone, block
    by block (``iter_chunks``), running max per direction.
    """
    from trajinf.scoring.scores import top_k  # noqa: F401  (imports counted in the baseline)
    from trajinf.store.feature_store import FeatureStore

    base = peak_rss_mb()  # after imports: the interpreter + numpy/pandas/pyarrow
    t0 = time.perf_counter()
    with AnonPeak() as mem:
        _score_store(FeatureStore.open(path), n_dirs, mode, chunk_rows)
    return {
        "seconds": time.perf_counter() - t0,
        "baseline_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
        "ru_maxrss_mb": ru_maxrss_mb(),
        "peak_anon_mb": mem.anon_mb,
        "peak_file_mb": mem.file_mb,
    }


def _score_store(store, n_dirs: int, mode: str, chunk_rows: int) -> None:
    from trajinf.scoring.directions import Directions
    from trajinf.scoring.scores import top_k
    from trajinf.scoring.source import ScoreConfig

    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((n_dirs, store.dim), dtype=np.float32)
    if mode == "top_k":
        d = Directions([f"s{i}" for i in range(n_dirs)], [dirs], [1.0])
        top_k(store, d, ScoreConfig(metric="cosine", chunk_rows=chunk_rows), 100)
    else:
        best = np.full(n_dirs, -np.inf, np.float32)
        for _, block in store.iter_chunks(0, rows=chunk_rows):
            s = block @ dirs.T / np.linalg.norm(block, axis=1, keepdims=True)
            best = np.maximum(best, s.max(0))


def rss_curve(workdir: Path, sizes: list[int], dim: int, n_dirs: int = 16) -> list[dict]:
    """Peak RSS of scoring as the pool grows: each size is built and scored in fresh processes
    (the store is deleted afterwards)."""
    import shutil

    out = []
    for n in sizes:
        path = workdir / f"rss-store-{n}"
        built = run_worker("build", {"path": str(path), "n_rows": n, "dim": dim})
        row = {"rows": n, "dim": dim, "store_bytes": built["bytes"], "build_s": built["seconds"]}
        for mode in ("features", "top_k"):
            r = run_worker("rss", {"path": str(path), "n_dirs": n_dirs, "mode": mode})
            row[f"{mode}_peak_rss_mb"] = r["peak_rss_mb"]
            row[f"{mode}_baseline_rss_mb"] = r["baseline_rss_mb"]
            row[f"{mode}_peak_anon_mb"] = r["peak_anon_mb"]
            row[f"{mode}_peak_file_mb"] = r["peak_file_mb"]
            row[f"{mode}_s"] = r["seconds"]
        shutil.rmtree(path, ignore_errors=True)
        out.append(row)
    return out


def store_bytes(workdir: Path, n_items: int, n_steps: int, dim: int, n_ckpt: int) -> dict:
    """Bytes per item of a real trajinf store (trajectory + per-step rows, fp16, items table,
    manifest) vs LESS's layout computed from its code (see ``LESS_DIM``)."""
    import shutil

    import pandas as pd

    from trajinf.store.feature_store import FeatureStore

    path = workdir / "bytes-store"
    store = FeatureStore.create(
        path, fingerprint={"model_fingerprint": "synthetic"}, dim=dim,
        checkpoints=[{"path": f"c{c}", "lr": 1.0} for c in range(n_ckpt)], overwrite=True,
    )  # fmt: skip
    ids = [f"t{i:06d}" for i in range(n_items)]
    rows = pd.DataFrame(
        {
            "id": np.repeat(ids, 1 + n_steps),
            "step": np.tile(np.arange(-1, n_steps), n_items),
            "n_action_tokens": 20,
            "task_id": np.repeat([f"task-{i % 50}" for i in range(n_items)], 1 + n_steps),
        }
    )
    rng = np.random.default_rng(0)
    feats = [
        rng.standard_normal((len(rows), dim), dtype=np.float32).astype(np.float16)
        for _ in range(n_ckpt)
    ]
    store.append(rows, feats)
    files = [p for p in path.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    feat = sum(p.stat().st_size for p in files if p.suffix == ".npy")
    shutil.rmtree(path, ignore_errors=True)
    per_item = total / n_items
    less_fp16 = LESS_DIM * 2 * n_ckpt
    return {
        "items": n_items,
        "steps_per_item": n_steps,
        "dim": dim,
        "checkpoints": n_ckpt,
        "trajinf_bytes_per_item": per_item,
        "trajinf_feature_bytes_per_item": feat / n_items,
        "trajinf_trajectory_only_bytes_per_item": dim * 2 * n_ckpt,
        "less_layout": "computed from princeton-nlp/LESS collect_grad_reps.py (not measured)",
        "less_one_file_fp16_bytes_per_item": less_fp16,
        "less_one_file_fp32_bytes_per_item": 2 * less_fp16,
        "less_as_written_fp16_bytes_per_item": LESS_FILES_AS_WRITTEN * less_fp16,
        "ratio_trajinf_over_less_one_file_fp16": per_item / less_fp16,
    }


def fp16_rank_correlation(pool: np.ndarray, target: np.ndarray) -> dict:
    """Effect of fp16 feature storage on cosine scores: ``pool`` [N, D] and ``target`` [M, D]
    fp32 features are scored as stored (fp16-rounded, both sides) and in fp32; returns the
    Spearman correlation per target column (mean, min) and the max |score difference|."""

    def cos(p: np.ndarray, t: np.ndarray) -> np.ndarray:
        p, t = p.astype(np.float64), t.astype(np.float64)
        p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-30)
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-30)
        return p @ t.T

    s32 = cos(pool, target)
    s16 = cos(pool.astype(np.float16), target.astype(np.float16))
    rho = np.array([spearmanr(s32[:, j], s16[:, j]).statistic for j in range(s32.shape[1])])
    return {
        "n_pool": int(pool.shape[0]),
        "n_target": int(target.shape[0]),
        "dim": int(pool.shape[1]),
        "spearman_mean": float(rho.mean()),
        "spearman_min": float(rho.min()),
        "max_abs_score_diff": float(np.abs(s32 - s16).max()),
        "overflow_items": int((~np.isfinite(pool.astype(np.float16))).any(1).sum()),
    }


def _main(argv: list[str]) -> None:
    mode, args = argv[0], json.loads(argv[1])
    if mode == "build":
        out = build_store(**args)
    elif mode == "rss":
        out = score_store_rss(**args)
    elif mode == "throughput":
        out = scoring_throughput(**args)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    _main(sys.argv[1:])
