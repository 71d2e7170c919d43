"""CLI verbs of the scoring pipeline: score, select, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import typer

from trajinf.cli.app import app, console, job_config, progress_bars, with_job_options
from trajinf.selection.priors import PRIORS
from trajinf.selection.priors.combine import COMBINES, WEIGHT_MODES
from trajinf.selection.select import METHODS


@app.command()
@with_job_options()
def score(
    model: Path = typer.Option(
        ...,
        help="Model: a save_pretrained dir, a .gguf file, smollm2-135m or a hub id in the local HF cache.",
    ),
    pool: Path = typer.Option(..., help="Pool trajectories: OpenAI chat or ShareGPT JSONL."),
    target: Path = typer.Option(..., help="Target trajectories showing the wanted skill."),
    out: Path = typer.Option(..., help="Output directory."),
    checkpoint: list[Path] = typer.Option(
        [], help="Warmup checkpoint dirs (repeat); scores are lr-weighted over them."
    ),
    **options: Any,
) -> None:
    """Score every pool trajectory and step against the target.

    Example:

    \b
      trajinf score --model warm/final --checkpoint warm/ckpt-1 \\
          --checkpoint warm/ckpt-2 --pool pool.jsonl --target target.jsonl \\
          --out scores/
    """
    from trajinf.job.run import score_pool

    cfg = job_config(options, has_checkpoints=bool(checkpoint))
    with progress_bars() as bars:
        res = score_pool(
            model, pool, target, out, checkpoints=checkpoint, config=cfg, progress=bars
        )
    n_harm = int(res.trajectories["harmful"].fillna(False).sum())
    console.print(
        f"scored {len(res.trajectories)} trajectories, {len(res.steps)} steps; "
        f"{n_harm} flagged harmful -> {out}/scores.parquet"
    )


@app.command()
def select(
    scores: Path = typer.Option(..., help="Output directory of `trajinf score`."),
    pool: Path = typer.Option(..., help="The pool JSONL that was scored."),
    fraction: float = typer.Option(0.05, help="Budget as a fraction of the pool."),
    method: Literal[METHODS] = typer.Option("influence", help="Selector."),  # type: ignore[valid-type]
    drop_harmful: bool = typer.Option(
        None,
        "--drop-harmful/--keep-harmful",
        help="Drop trajectories the harm flag marks. Default: drop them when selecting by "
        "influence from scores that carry the flag; keep them for the other methods.",
        show_default=False,
    ),
    step_weights: bool = typer.Option(False, help="Write weight 0 on negative-influence steps."),
    seed: int = typer.Option(0, help="Seed for random tie-breaks and the random baseline."),
    drop_zero_variance: bool = typer.Option(
        False, help="Drop rollout groups (same task_id) whose outcomes are all equal."
    ),
    dedup: float = typer.Option(
        None, help="Keep one trajectory per near-duplicate cluster (feature cosine >= this)."
    ),
    prior: Literal[tuple(PRIORS)] = typer.Option(  # type: ignore[valid-type]
        None, help="Step prior for step weights and --method prior."
    ),
    combine: Literal[COMBINES] = typer.Option(  # type: ignore[valid-type]
        None, help="Combine the prior with influence step scores."
    ),
    env: str = typer.Option(None, help="Env for priors that replay trajectories (toolworld, twx)."),
    weight_mode: Literal[WEIGHT_MODES] = typer.Option(  # type: ignore[valid-type]
        "binary", help="Step weights: binary (0/1) or soft (rescaled to [0, 1])."
    ),
    repair: bool = typer.Option(
        False,
        help="Keep, repair (bad steps weight 0) or drop each trajectory by the calibrated harm "
        "flag; choices in OUT's .repair.jsonl.",
    ),
    out: Path = typer.Option(..., help="Selected trajectories, written in the input format."),
) -> None:
    """Select a subset (and per-step weights) and write it back in the input format.

    Examples:

    \b
      trajinf select --scores scores/ --pool pool.jsonl --fraction 0.05 \\
          --drop-harmful --step-weights --out selected.jsonl
      trajinf select --scores scores/ --pool pool.jsonl --method prior \\
          --prior expert_aligned --env toolworld --combine rank --step-weights \\
          --out selected.jsonl
      trajinf select --scores scores/ --pool pool.jsonl --fraction 0.1 --repair \\
          --out selected.jsonl
    """
    from trajinf.selection.export import select_to_file

    sel = select_to_file(
        scores,
        pool,
        out,
        method=method,
        fraction=fraction,
        drop_harmful=drop_harmful,
        step_weights=step_weights,
        seed=seed,
        drop_zero_variance=drop_zero_variance,
        dedup=dedup,
        prior=prior,
        combine=combine,
        env=env,
        weight_mode=weight_mode,
        repair=repair,
    )
    if repair:
        h = sel.info["harm"]
        console.print(
            f"harm: pool {h['pool']}, selected {h['selected']} (kept / repaired / dropped)"
        )
    dh = sel.info.get("drop_harmful")
    if dh and dh["applied"]:
        how = "by default; --keep-harmful keeps them" if dh["default"] else "--drop-harmful"
        console.print(f"harm flag: dropped {dh['dropped']} flagged trajectories ({how})")
    if sel.info.get("filters"):
        console.print(f"filters: {sel.info['filters']}")
    console.print(f"selected {len(sel.ids)} trajectories with '{method}' -> {out}")


@app.command()
def report(
    scores: Path = typer.Option(..., help="Output directory of `trajinf score`."),
    pool: Path = typer.Option(..., help="The pool JSONL that was scored."),
    out: Path = typer.Option(Path("report.html"), help="HTML file to write."),
    top: int = typer.Option(10, help="How many top and bottom trajectories to show."),
) -> None:
    """Write an HTML report: score histograms, per-step heatmaps, top/bottom trajectories."""
    from trajinf.report import write_score_report

    write_score_report(scores, pool, out, top=top)
    console.print(f"report -> {out}")
