"""CLI verb ``extract``: gradient features of a pool (and target) into resumable stores, on one
process or many (``torchrun``). Registered on ``trajinf.cli.app.app``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from trajinf.cli.app import STEP_SPLIT_HELP, Mode, app, console, progress_bars


def _forwarded(params: dict) -> list[str]:
    """The options of this call as command-line arguments, for the torchrun workers."""
    args = ["extract"]
    for name, value in params.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        elif isinstance(value, list):
            for v in value:
                args += [flag, str(v)]
        elif value is not None:
            args += [flag, str(getattr(value, "value", value))]
    return args


@app.command()
def extract(
    model: Path = typer.Option(..., help="HF save_pretrained directory (model + tokenizer)."),
    pool: Path = typer.Option(..., help="Pool trajectories: OpenAI chat or ShareGPT JSONL."),
    out: Path = typer.Option(..., help="Job directory; stores go to OUT/store/{pool,target}."),
    target: Path = typer.Option(None, help="Target trajectories (extracted too if given)."),
    checkpoint: list[Path] = typer.Option([], help="Warmup checkpoint dirs (repeat)."),
    mode: Mode = typer.Option(Mode.factorized, help="factorized (fast) or less (reference)."),
    proj_dim: int = typer.Option(8192, help="Total projected feature dimension."),
    lora: bool = typer.Option(False, help="Wrap a plain model in a fresh LoRA and track only it."),
    step_split: str = typer.Option("position", help=STEP_SPLIT_HELP),
    preconditioner: str = typer.Option("auto", help="auto|none|adam|factored_adam."),
    subtask_field: str = typer.Option("task_id", help="Field naming a trajectory's subtask."),
    max_length: int = typer.Option(2048, help="Max tokens; longer trajectories lose early steps."),
    seed: int = typer.Option(0, help="Projection seed."),
    shard_items: int = typer.Option(256, help="Trajectories per store shard (unit of resume)."),
    batch_tokens: int = typer.Option(8192, help="Token budget per batch (memory knob)."),
    device: str = typer.Option("auto", help="auto|cpu|cuda (torchrun with nccl: cuda:LOCAL_RANK)."),
    trust_remote_code: bool = typer.Option(
        False, help="Allow model/tokenizer code from the model directory (off by default)."
    ),
    distributed: bool = typer.Option(
        False, help="Launch --nproc local processes with torchrun (single node)."
    ),
    nproc: int = typer.Option(2, help="Processes for --distributed."),
    backend: str = typer.Option(None, help="gloo|nccl (default: nccl with CUDA, else gloo)."),
) -> None:
    """Extract per-trajectory and per-step gradient features into resumable stores.

    A rerun resumes: finished shards are kept, damaged ones re-extracted. `trajinf score` with
    the same options (and --out) reuses the stores.

    Examples:
      trajinf extract --model warm/final --pool pool.jsonl --target target.jsonl --out job/
      trajinf extract --distributed --nproc 8 --model M --pool P --out job/
      torchrun --nproc-per-node 8 -m trajinf extract --model M --pool P --out job/
    """
    params = dict(locals())
    in_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not in_torchrun:
        from trajinf.job.ranks import launch

        fwd = {k: v for k, v in params.items() if k not in ("distributed", "nproc")}
        code = launch(_forwarded(fwd), nproc)
        if code != 0:
            console.print(f"[red]error:[/red] torchrun exited with code {code}")
            sys.exit(code)
        return

    from trajinf.job.config import build_job_config
    from trajinf.job.ranks import rank_context, shutdown
    from trajinf.job.run import extract_job

    cfg = build_job_config(
        mode=mode.value,
        proj_dim=proj_dim,
        lora=lora,
        preconditioner=preconditioner,
        has_checkpoints=bool(checkpoint),
        subtask_field=subtask_field,
        max_length=max_length,
        seed=seed,
        batch_tokens=batch_tokens,
        step_split=step_split,
    )
    cfg.shard_items = shard_items
    cfg.device = device
    cfg.trust_remote_code = trust_remote_code
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
