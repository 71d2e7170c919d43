"""``trajinf bench perf`` and ``trajinf bench peers`` (registered on the bench group)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from trajinf.cli.app import console
from trajinf.cli.bench import bench_app


def _log(line: str) -> None:
    console.print(escape(line))  # harness lines start with "[run_peers]": not rich markup


@bench_app.command("perf")
def perf(
    out: Path = typer.Option(Path("bench-perf"), help="Output directory (perf.json, perf.html)."),
    quick: bool = typer.Option(False, help="Toy sizes, under a minute (for tests)."),
) -> None:
    """Speed, scaling, scoring throughput, memory and store size in one run.

    Extraction vs a training step vs LESS mode; scaling over pool size, sequence length and
    width; scoring vs the measured GEMM rate; peak RSS of scoring at growing pool sizes; store
    bytes per item vs LESS; fp16 vs fp32 score ranks.

    Example:  trajinf bench perf --quick --out /tmp/perf
    """
    from trajinf.bench.perf_run import run_perf

    res = run_perf(out, quick=quick, log=_log)
    ex = res["extraction"]
    console.print(
        f"perf: factorized/train {ex['ratio_b_over_a']:.2f}x, LESS/train "
        f"{ex['ratio_c_over_a'] or float('nan'):.2f}x, {res['seconds']:.0f} s -> "
        f"{out}/perf.json, {out}/perf.html"
    )


@bench_app.command("peers")
def peers(
    out: Path = typer.Option(Path("bench-peers"), help="Output directory (peers.json, .html)."),
    python: Path = typer.Option(
        Path(".venv-peers/bin/python"), help="Python of the peers virtualenv."
    ),
    models: int = typer.Option(128, help="Subset models of the LDS ground truth."),
    methods: str = typer.Option("all", help="Comma list of harness methods, or all."),
    hidden: int | None = typer.Option(None, help="Hidden size of the LDS model (default 32)."),
    layers: int | None = typer.Option(None, help="Layers of the LDS model (default 2)."),
    queries_per_skill: int | None = typer.Option(
        None, help="Queries per skill (default 16; 4 skills)."
    ),
    rebuild: bool = typer.Option(False, help="Retrain the ground truth even if cached."),
) -> None:
    """trajinf vs kronfluence, TRAK, LogIX and dattri: time and LDS on the same model and data.

    Example:  trajinf bench peers --out /tmp/peers --python .venv-peers/bin/python
    """
    from trajinf.bench.peers import run_peers_bench

    res = run_peers_bench(
        out, python=python, models=models, methods=methods, hidden=hidden, layers=layers,
        queries_per_skill=queries_per_skill, rebuild=rebuild, log=_log,
    )  # fmt: skip
    n_ok = sum("error" not in r for r in res["peers"]["rows"])
    console.print(f"peers: {n_ok} rows -> {out}/peers.json, {out}/peers.html")
