"""Compare trajinf with established attribution libraries on one tiny causal LM.

Every method scores the SAME full-data model (benchmarks/lds.py) on the same train pool and
queries with the same loss (mean action-token loss). For each method we record the wall time of
its featurize/fit stage and of its scoring stage, their ratio to one training epoch of the same
model measured in this run, the LDS against the cached trained-subset ground truth, and the rank
agreement with the exact (unprojected) gradient dot over the same tracked block linears.
A failing method is recorded with its error message instead of scores.

Run under .venv-peers (see benchmarks/peers/README.md):
    python benchmarks/lds.py --out runs/lds                       # main venv, once
    python benchmarks/peers/run_peers.py --gt runs/lds --out runs/lds/peers.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import peer_dattri
import peer_kronfluence
import peer_logix
import peer_trajinf
import peer_trak
import torch
from peer_common import MethodResult, PeerSetup, lds

from trajinf.bench.metrics import lds_per_query

Runner = Callable[[PeerSetup, Path], list[tuple[str, MethodResult]]]


def _one(name: str, fn) -> Runner:
    return lambda setup, work: [(name, fn(setup, work))]


def _exact(setup: PeerSetup, work: Path, all_params: bool) -> MethodResult:
    """Exact grad-dot with the query gradients held [n_query, P] and the train gradients
    streamed one item at a time, so a ~20M-parameter model fits in memory."""
    model = setup.fresh_model()
    params = None if all_params else setup.weight_names
    t0 = time.perf_counter()
    g_query = lds.per_item_gradients(model, setup.query, params)  # float32 [n_query, P]
    t1 = time.perf_counter()
    rows = []
    for i in range(len(setup.train)):
        g = lds.per_item_gradients(model, setup.train.subset(np.array([i])), params)
        rows.append((g_query @ g[0]).double().numpy())  # float32 dots: fine for ranks
    scores = np.stack(rows)
    # fit = train gradients, score = query gradients + dots (the dots are interleaved here)
    return MethodResult(scores, time.perf_counter() - t1, t1 - t0, {"dim": int(g_query.shape[1])})


def registry(include_slow: bool) -> dict[str, Runner]:
    """Method groups by name; each runner returns one or more (row name, result)."""
    reg: dict[str, Runner] = {
        "exact": lambda s, w: [
            ("exact grad-dot (block linears) [reference]", _exact(s, w, False)),
            ("exact grad-dot (all params)", _exact(s, w, True)),
        ],
        "trajinf-factorized": functools.partial(peer_trajinf.run, mode="factorized"),
        "trajinf-less": functools.partial(peer_trajinf.run, mode="less"),
        # the projection dimension's effect (k = 24 per module instead of 12)
        "trajinf-factorized-d8192": functools.partial(
            peer_trajinf.run, mode="factorized", proj_dim=8192
        ),
        "kronfluence-ekfac": _one(
            "kronfluence EK-FAC", functools.partial(peer_kronfluence.run, strategy="ekfac")
        ),
        "kronfluence-identity": _one(
            "kronfluence identity (grad-dot)",
            functools.partial(peer_kronfluence.run, strategy="identity"),
        ),
        "trak": _one("traker TRAK", peer_trak.run),
        "logix": peer_logix.run,
    }
    dattri = ["grad-dot", "grad-cos", "trak", "datainf", "logra", "ekfac"]
    if include_slow:
        dattri += ["arnoldi", "cg", "lissa"]
    for m in dattri:
        reg[f"dattri-{m}"] = _one(f"dattri {m}", functools.partial(peer_dattri.run, method=m))
    return reg


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "kronfluence", "traker", "logix-ai", "dattri", "trajinf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def evaluate(
    name: str, res: MethodResult, gt, reference: np.ndarray | None, epoch_s: float
) -> dict:
    """Row of the table for one method result."""
    finite = bool(np.isfinite(res.scores).all())
    scores = np.nan_to_num(res.scores)
    per_query = lds_per_query(gt.subsets, gt.losses, scores)
    return {
        "method": name,
        "fit_seconds": res.fit_seconds,
        "score_seconds": res.score_seconds,
        "total_over_epoch": (res.fit_seconds + res.score_seconds) / epoch_s,
        "lds": float(per_query.mean()),
        # standard error over queries: how far apart two methods must be to differ
        "lds_se": float(per_query.std(ddof=1) / np.sqrt(len(per_query))),
        "rank_agreement": None if reference is None else lds.rank_agreement(scores, reference),
        "finite": finite,
        "info": res.info,
    }


def markdown(rows: list[dict], epoch_s: float) -> str:
    """The results table as markdown."""
    lines = [
        f"One training epoch of the same model (same run): {epoch_s:.3f} s",
        "",
        "| method | fit s | score s | (fit+score)/epoch | LDS (± s.e.) | rank agr. vs exact grad-dot |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | FAILED: {r['error'][:90]} | | | | |")
            continue
        ra = "-" if r["rank_agreement"] is None else f"{r['rank_agreement']:.3f}"
        lines.append(
            f"| {r['method']} | {r['fit_seconds']:.2f} | {r['score_seconds']:.2f} | "
            f"{r['total_over_epoch']:.1f}x | {r['lds']:.3f} ± {r['lds_se']:.3f} | {ra} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gt", type=Path, default=Path("runs/lds"), help="lds.py --out directory")
    ap.add_argument("--out", type=Path, default=Path("runs/lds/peers.json"))
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--methods", default="all", help="comma list of registry names, or all")
    ap.add_argument("--include-slow", action="store_true", help="dattri Arnoldi/CG/LiSSA too")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gt, train, query, model, cfgs = lds.load_setup(args.gt)
    setup = PeerSetup(model, train, query, lds_modules(model), proj_dim=args.proj_dim)
    epoch_s = lds.time_one_epoch(train, cfgs["model"], cfgs["train"])
    reg = registry(args.include_slow)
    chosen = list(reg) if args.methods == "all" else args.methods.split(",")
    if "exact" not in chosen:
        chosen.insert(0, "exact")  # the reference for rank agreement
    rows: list[dict] = []
    all_scores: dict[str, np.ndarray] = {}  # saved for re-analysis (npz, no pickle)
    reference = None
    for key in chosen:
        print(f"[run_peers] {key} ...", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix=f"peer-{key}-") as work:
                results = reg[key](setup, Path(work))
            for name, res in results:
                all_scores[name] = res.scores
                if key == "exact" and reference is None:
                    reference = res.scores
                rows.append(evaluate(name, res, gt, reference, epoch_s))
                print(f"  {name}: lds={rows[-1]['lds']:.3f}", flush=True)
        except Exception as exc:  # a peer failing is a result, not a crash
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            tb = traceback.format_exc().strip().splitlines()[-6:]
            rows.append({"method": key, "error": msg, "traceback_tail": tb})
            print(f"  FAILED {msg}", flush=True)
    oracle = _skill_oracle(train, query)
    rows.append(
        evaluate("skill oracle (planted labels, not a method)", MethodResult(oracle, 0, 0), gt,
                 reference, epoch_s)
    )  # fmt: skip
    report = {
        "epoch_seconds": epoch_s,
        "n_train": len(train),
        "n_query": len(query),
        "n_subset_models": int(gt.subsets.shape[0]),
        "proj_dim": args.proj_dim,
        "tracked_modules": setup.modules,
        "threads": args.threads,
        "versions": _versions(),
        "ground_truth_meta": {k: v for k, v in gt.meta.items() if k != "full_model_query_loss"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    np.savez(args.out.with_suffix(".scores.npz"), names=np.array(list(all_scores)),
             scores=np.stack(list(all_scores.values())))  # fmt: skip
    table = markdown(rows, epoch_s)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


def lds_modules(model: torch.nn.Module) -> list[str]:
    """Module names of the block Linear layers (what every method tracks)."""
    return [n[: -len(".weight")] for n in lds.block_linear_params(model)]


def _skill_oracle(train, query) -> np.ndarray:
    """+1 for a same-skill clean train item, -1 for a same-skill noisy one, 0 otherwise."""
    same = (train.skill[:, None] == query.skill[None, :]).astype(float)
    return same * np.where(train.noisy, -1.0, 1.0)[:, None]


if __name__ == "__main__":
    main()
