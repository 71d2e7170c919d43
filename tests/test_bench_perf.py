"""``trajinf bench perf`` / ``bench peers``: the quick perf run through the CLI, the RSS worker,
the fp16-vs-fp32 rank correlation and the peers verb's missing-interpreter error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from trajinf.bench.perf_scoring import (
    fp16_rank_correlation,
    peak_rss_mb,
    rss_curve,
    store_bytes,
)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trajinf", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # ~30 s on an idle 2-core VM (the whole quick perf run in a subprocess)
def test_perf_quick_writes_json_and_html(tmp_path: Path) -> None:
    out = tmp_path / "perf"
    proc = _cli("bench", "perf", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((out / "perf.json").read_text())
    for key in ("machine", "extraction", "scaling", "scoring", "rss", "store_bytes", "fp16"):
        assert key in res, key
    ex = res["extraction"]
    assert ex["ratio_b_over_a"] > 0 and ex["ratio_c_over_a"] > 0
    assert ex["a_train_fwd_bwd"]["tokens_per_s"] > 0
    sc = res["scaling"]
    assert [p["tokens_per_item"] for p in sc["seq_length"]] == [64, 128]
    assert all(e["extrapolated"] for e in sc["pool_size_extrapolated"])
    assert res["scoring"]["gemm_flops"] > 1e8
    assert all(0 < r["raw_eff"] < 2 for r in res["scoring"]["rows"])
    assert [r["rows"] for r in res["rss"]] == [2_000, 10_000]
    assert res["fp16"]["spearman_mean"] > 0.99  # fp16 rounding barely moves ranks
    # LESS's bytes are computed from its layout, not measured: the result must say so
    assert "not measured" in res["store_bytes"]["less_layout"]
    assert res["store_bytes"]["trajinf_bytes_per_item"] > 0  # measured from the files written
    page = (out / "perf.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "GEMM" in page


def test_rss_curve_small_store(tmp_path: Path) -> None:
    rows = rss_curve(tmp_path, [500], dim=16, n_dirs=4)
    (r,) = rows
    assert r["rows"] == 500 and r["store_bytes"] > 500 * 16 * 2
    for mode in ("features", "top_k"):
        # a fresh interpreter with numpy/pandas imported: tens of MiB, far below this process
        assert 20 < r[f"{mode}_peak_rss_mb"] < 2000
        assert r[f"{mode}_peak_rss_mb"] >= r[f"{mode}_baseline_rss_mb"]
        assert 0 < r[f"{mode}_peak_anon_mb"] <= r[f"{mode}_peak_rss_mb"] + 1
    assert not any(tmp_path.iterdir())  # the store is removed afterwards
    assert peak_rss_mb() > 10


def test_fp16_rank_correlation_constructed() -> None:
    rng = np.random.default_rng(0)
    target = rng.standard_normal((3, 64)).astype(np.float32)
    # well-separated cosines: fp16 rounding cannot swap any pair -> exactly 1
    base = target[0] / np.linalg.norm(target[0])
    noise = rng.standard_normal((20, 64)).astype(np.float32)
    noise -= np.outer(noise @ base, base)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cosines = np.linspace(-0.9, 0.9, 20)
    pool = (cosines[:, None] * base + np.sqrt(1 - cosines[:, None] ** 2) * noise).astype(np.float32)
    r = fp16_rank_correlation(pool, target[:1])
    assert r["spearman_min"] == pytest.approx(1.0)
    assert r["max_abs_score_diff"] < 1e-3 and r["overflow_items"] == 0

    # near-ties: recompute the statistic by hand and compare
    pool2 = (base[None, :] + 1e-4 * rng.standard_normal((50, 64))).astype(np.float32)
    r2 = fp16_rank_correlation(pool2, target)

    def cos(p, t):
        p = p.astype(np.float64) / np.linalg.norm(p.astype(np.float64), axis=1, keepdims=True)
        t = t.astype(np.float64) / np.linalg.norm(t.astype(np.float64), axis=1, keepdims=True)
        return p @ t.T

    s32 = cos(pool2, target)
    s16 = cos(pool2.astype(np.float16), target.astype(np.float16))
    want = [spearmanr(s32[:, j], s16[:, j]).statistic for j in range(3)]
    assert r2["spearman_mean"] == pytest.approx(float(np.mean(want)))
    assert r2["spearman_min"] == pytest.approx(float(np.min(want)))
    assert r2["spearman_min"] < 0.999  # fp16 does reorder near-ties


def test_store_bytes_counts_step_rows(tmp_path: Path) -> None:
    r = store_bytes(tmp_path, n_items=10, n_steps=3, dim=32, n_ckpt=2)
    # 4 rows (trajectory + 3 steps) x 32 dims x 2 bytes x 2 checkpoints, plus .npy headers
    assert r["trajinf_feature_bytes_per_item"] >= 4 * 32 * 2 * 2
    assert r["trajinf_bytes_per_item"] > r["trajinf_feature_bytes_per_item"]
    assert r["less_as_written_fp16_bytes_per_item"] == 3 * 8192 * 2 * 2


def test_peers_missing_python_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    proc = _cli("bench", "peers", "--out", str(tmp_path / "p"), "--python", str(missing))
    assert proc.returncode == 2
    text = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert "peers interpreter" in text and "not found" in text
    assert "pip install" in text and "--no-deps" in text
    assert not (tmp_path / "p" / "lds").exists()  # failed before any training
