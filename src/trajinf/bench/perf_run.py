"""``trajinf bench perf``: every speed / memory / size measurement in one run -> perf.json + perf.html.

Sizes are chosen for a 2-core CPU (the full run takes several minutes; ``quick`` well under a
minute, for tests). Whatever cannot be run at the asked size here is extrapolated and marked so.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trajinf.bench.perf import (
    ExtractSpec,
    Log,
    ScalingSpec,
    llama,
    machine_info,
    measure_extraction,
    scaling_curves,
    synthetic_pool,
)
from trajinf.bench.perf_scoring import fp16_rank_correlation, rss_curve, run_worker, store_bytes
from trajinf.errors import TrajinfError


@dataclass
class PerfConfig:
    """Sizes of every part of the perf run (``full()`` / ``quick()``)."""

    extraction: ExtractSpec
    scaling: ScalingSpec
    throughput: dict  # scoring_throughput kwargs
    rss_sizes: list[int]
    rss_dim: int
    bytes: dict  # store_bytes kwargs (without workdir)
    fp16: dict = field(default_factory=dict)  # hidden, layers, items, targets, tokens, proj_dim
    threads: int = 1

    @classmethod
    def full(cls) -> PerfConfig:
        """The documented run (about 10 minutes on the 2-core development VM)."""
        return cls(
            extraction=ExtractSpec(items=16, less_items=2, repeats=2),
            scaling=ScalingSpec(),
            throughput={"n_rows": 32768, "dim": 4096, "n_dirs": [16, 128, 1024],
                        "chunks": [4096, 16384]},
            rss_sizes=[10_000, 100_000, 1_000_000],
            rss_dim=256,
            bytes={"n_items": 100, "n_steps": 8, "dim": 8064, "n_ckpt": 4},
            fp16={"hidden": 128, "layers": 2, "items": 64, "targets": 8, "tokens": 128,
                  "proj_dim": 8192},
        )  # fmt: skip

    @classmethod
    def quick(cls) -> PerfConfig:
        """CI-sized: every part runs, on toy sizes (< 60 s on the development VM)."""
        return cls(
            extraction=ExtractSpec(hidden=64, layers=2, vocab=1000, items=4, tokens=128,
                                   steps=4, proj_dim=1024, less_items=1, less_proj_dim=1024,
                                   repeats=1),
            scaling=ScalingSpec(pool_items=[2, 4], pool_tokens=64, seq_lengths=[64, 128],
                                seq_tokens_total=256, widths=[32, 64], width_items=2,
                                width_tokens=64, hidden=32, layers=2, vocab=500, repeats=1),
            throughput={"n_rows": 4096, "dim": 256, "n_dirs": [16, 128], "chunks": [1024, 4096]},
            rss_sizes=[2_000, 10_000],
            rss_dim=64,
            bytes={"n_items": 20, "n_steps": 8, "dim": 1024, "n_ckpt": 4},
            fp16={"hidden": 32, "layers": 2, "items": 12, "targets": 4, "tokens": 64,
                  "proj_dim": 1024},
        )  # fmt: skip


def fp16_effect(
    hidden: int, layers: int, items: int, targets: int, tokens: int, proj_dim: int
) -> dict:
    """fp16-vs-fp32 score rank correlation on real factorized features of a model built from a
    config (random-token pool; the last ``targets`` items are the targets)."""
    from trajinf.gradients.config import ExtractionConfig
    from trajinf.gradients.extract import extract_features

    model = llama(hidden, layers, 2000, tokens)
    pool = synthetic_pool(items + targets, tokens, 4, 2000, seed=3)
    cfg = ExtractionConfig(proj_dim=proj_dim)
    feats = np.stack([f.trajectory for f in extract_features(model, pool, cfg)])
    out = fp16_rank_correlation(feats[:items], feats[items:])
    out["features"] = f"factorized, Llama h{hidden} x{layers} layers, {tokens} tokens/item"
    return out


def run_perf(out: Path, quick: bool = False, log: Log = print) -> dict:
    """Run every measurement, write ``out/perf.json`` and ``out/perf.html``; returns the dict."""
    from trajinf.bench.perf_report import write_perf_html

    cfg = PerfConfig.quick() if quick else PerfConfig.full()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrajinfError(f"--out {out}: cannot create directory ({e.strerror})") from e
    torch.set_num_threads(cfg.threads)  # 2 shared cores: one thread gives stable ratios
    t0 = time.perf_counter()
    res: dict = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine_info(),
    }
    log("perf: extraction (train fwd+bwd vs factorized vs LESS)")
    res["extraction"] = measure_extraction(cfg.extraction)
    res["scaling"] = scaling_curves(cfg.scaling, log=log)
    log("perf: scoring throughput vs GEMM rate (1 BLAS thread, subprocess)")
    res["scoring"] = run_worker("throughput", cfg.throughput)
    with tempfile.TemporaryDirectory(prefix="trajinf-perf-", dir=out) as tmp:
        log(f"perf: peak RSS of scoring at {cfg.rss_sizes} rows (fresh processes)")
        res["rss"] = rss_curve(Path(tmp), cfg.rss_sizes, cfg.rss_dim)
        log("perf: store bytes per item")
        res["store_bytes"] = store_bytes(Path(tmp), **cfg.bytes)
    log("perf: fp16 vs fp32 scores")
    res["fp16"] = fp16_effect(**cfg.fp16)
    res["seconds"] = time.perf_counter() - t0
    (out / "perf.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    write_perf_html(res, out / "perf.html")
    return res
