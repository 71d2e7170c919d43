"""``trajinf bench``: the environment benchmark (default) and its ``perf`` / ``peers`` verbs."""

from __future__ import annotations

from pathlib import Path

import typer

from trajinf.cli.app import app, console, progress_bars

bench_app = typer.Typer(
    add_completion=False,
    help="Benchmarks: env (default: selection methods retrained and evaluated), perf, peers.",
    invoke_without_command=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def bench(
    ctx: typer.Context,
    env: str = typer.Option("all", help="builtin | twx | all (both environments)."),
    seeds: int = typer.Option(None, help="Training seeds per cell (default: the preset's)."),
    quick: bool = typer.Option(False, help="CI-sized run (a few minutes)."),
    harm: bool = typer.Option(
        False, "--harm", help="Harm detection and repair preset (issue 13; mixed scenario only)."
    ),
    scenarios: str = typer.Option(
        "mixed,flood,outcome,early",
        help="Comma list of scenarios: mixed, flood, outcome, early (early-experience data).",
    ),
    budgets: str = typer.Option("", help="Comma list of budgets (default 0.05,0.1,0.25)."),
    workers: int = typer.Option(None, help="Processes for retraining cells (default: preset)."),
    rounds: int = typer.Option(
        None, help="Flood: rollout -> select -> fine-tune rounds per method (default: preset's)."
    ),
    out: Path = typer.Option(Path("bench-out"), help="Output directory (bench.json, bench.html)."),
) -> None:
    """Which trajectories does influence find, and does selecting them win?

    Retrains the same base agent on each method's selection over seeds and budgets and measures
    held-out env success, harmful / bad-step detection AUROC, LDS and cost.

    Example:  trajinf bench --quick --out /tmp/bench
    """
    if ctx.invoked_subcommand is not None:
        return
    from trajinf.bench.env_bench import BenchConfig
    from trajinf.bench.runner import run_bench

    names = [s.strip() for s in scenarios.split(",") if s.strip()]
    if harm:
        names = ["mixed"]
    if "flood" in names:  # the flood has its own rounds driver (bench/rounds.py)
        _flood(env=env, seeds=seeds, rounds=rounds, quick=quick, out=out / "flood")
        names.remove("flood")
        if not names:
            return
    cfg = BenchConfig.harm() if harm else BenchConfig.quick() if quick else BenchConfig.full()
    cfg = cfg.with_options(
        env=env, seeds=seeds, scenarios=",".join(names), budgets=budgets, workers=workers
    )
    with progress_bars() as bars:
        res = run_bench(cfg, out, progress=bars, log=console.print)
    console.print(f"bench: {len(res['cells'])} cells -> {out}/bench.json, {out}/bench.html")
    _print_result(res)


def _print_result(res: dict) -> None:
    """The headline table and one sentence per scenario, on stdout (as bench.html opens)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from trajinf.bench.env_report import HEADLINE_HEADER, headline_rows, scenario_sentences

    table = Table(
        title=f"held-out success at budget {res['config'].get('headline', 0.1):g}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in HEADLINE_HEADER:  # seeds wrap, the rest stays whole
        table.add_column(col, no_wrap=col != "per seed")
    for row in headline_rows(res):
        table.add_row(*row)
    out = Console()
    out.print(table)
    for sentence in scenario_sentences(res):
        out.print(sentence, soft_wrap=True)


def _flood(*, env: str, seeds: int | None, rounds: int | None, quick: bool, out: Path) -> None:
    from dataclasses import replace

    from trajinf.bench.flood import flood_preset
    from trajinf.bench.rounds import run_flood_bench
    from trajinf.errors import TrajinfError

    envs = ["builtin"] if quick else (["builtin", "twx"] if env == "all" else [env])
    configs = [flood_preset(e, quick=quick) for e in envs]
    if seeds is not None or rounds is not None:
        if (seeds is not None and seeds < 1) or (rounds is not None and rounds < 1):
            raise TrajinfError("bench: --seeds and --rounds must be >= 1")
        configs = [replace(c, seeds=seeds or c.seeds, rounds=rounds or c.rounds) for c in configs]
    with progress_bars() as bars:
        res = run_flood_bench(configs, out, progress=bars, log=console.print)
    n = sum(len(r["rows"]) for r in res["envs"].values())
    console.print(f"bench flood: {n} rows -> {out}/flood.json, {out}/flood.md, {out}/flood.html")
