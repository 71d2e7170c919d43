"""CLI verb ``extract``: gradient features of a pool (and target) into resumable stores, on one
process or many (``torchrun``). Registered on ``trajinf.cli.app.app``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from trajinf.cli.app import app, console, job_config, progress_bars, with_job_options

# job options that only scoring reads: not options of `extract`
SCORING_ONLY = (
    "metric", "aggregate", "remove_mean", "target_mode", "scoring_preconditioner",
    "gram_damping", "kfac_damping", "chunk_rows", "workers",
    "harmful_alpha", "null_directions", "baselines", "kfac_max_items",
)  # fmt: skip


def _forwarded(params: dict) -> list[str]:
    """The options of this call as command-line arguments, for the torchrun workers."""
    args = ["extract"]
    for name, value in params.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag if value else "--no-" + flag[2:]]
        elif isinstance(value, list):
            for v in value:
                args += [flag, str(v)]
        elif value is not None:
            args += [flag, str(value)]
    return args


@app.command()
@with_job_options(exclude=SCORING_ONLY)
def extract(
    model: Path = typer.Option(
        ...,
        help="Model: a save_pretrained dir, a .gguf file, smollm2-135m or a hub id in the local HF cache.",
    ),
    pool: Path = typer.Option(..., help="Pool trajectories: OpenAI chat or ShareGPT JSONL."),
    out: Path = typer.Option(..., help="Job directory; stores go to OUT/store/{pool,target}."),
    target: Path = typer.Option(None, help="Target trajectories (extracted too if given)."),
    checkpoint: list[Path] = typer.Option([], help="Warmup checkpoint dirs (repeat)."),
    distributed: bool = typer.Option(
        False, help="Launch --nproc local processes with torchrun (single node)."
    ),
    nproc: int = typer.Option(2, help="Processes for --distributed."),
    backend: str = typer.Option(None, help="gloo|nccl (default: nccl with CUDA, else gloo)."),
    **options: Any,
) -> None:
    """Extract per-trajectory and per-step gradient features into resumable stores.

    A rerun resumes: finished shards are kept, damaged ones re-extracted. `trajinf score` with
    the same options (and --out) reuses the stores.

    Examples:

    \b
      trajinf extract --model warm/final --pool pool.jsonl --target target.jsonl \\
          --out job/
      trajinf extract --distributed --nproc 8 --model M --pool P --out job/
      torchrun --nproc-per-node 8 -m trajinf extract --model M --pool P --out job/
    """
    params = {"model": model, "pool": pool, "out": out, "target": target,
              "checkpoint": checkpoint, "backend": backend, **options}  # fmt: skip
    cfg = job_config(options, has_checkpoints=bool(checkpoint))  # bad options fail here, once
    in_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not in_torchrun:
        from trajinf.job.ranks import launch

        code = launch(_forwarded(params), nproc)
        if code != 0:
            console.print(f"[red]error:[/red] torchrun exited with code {code}")
            sys.exit(code)
        return

    from trajinf.job.ranks import rank_context, shutdown
    from trajinf.job.run import extract_job

    ctx = rank_context(backend)
    try:
        if ctx.is_main:
            with progress_bars() as bars:
                job = extract_job(model, pool, out, target=target, checkpoints=checkpoint,
                                  config=cfg, progress=bars, rank=ctx)  # fmt: skip
        else:
            job = extract_job(model, pool, out, target=target, checkpoints=checkpoint,
                              config=cfg, rank=ctx)  # fmt: skip
    finally:
        shutdown(ctx)
    if ctx.is_main:
        rows = {k: len(s.items) for k, s in job.stores.items()}
        console.print(
            f"extracted {len(job.pool)} pool trajectories ({rows['pool']} feature rows) on "
            f"{ctx.world} process(es) -> {out}/store"
        )
