"""CLI verbs of the scoring pipeline: score, select, report."""

from __future__ import annotations

from pathlib import Path

import typer

from trajinf.cli.app import STEP_SPLIT_HELP, Method, Mode, app, console, progress_bars
from trajinf.errors import TrajinfError


@app.command()
def score(
    model: Path = typer.Option(..., help="HF save_pretrained directory (model + tokenizer)."),
    pool: Path = typer.Option(..., help="Pool trajectories: OpenAI chat or ShareGPT JSONL."),
    target: Path = typer.Option(..., help="Target trajectories showing the wanted skill."),
    out: Path = typer.Option(..., help="Output directory."),
    checkpoint: list[Path] = typer.Option(
        [], help="Warmup checkpoint dirs (repeat); scores are lr-weighted over them."
    ),
    mode: Mode = typer.Option(Mode.factorized, help="factorized (fast) or less (reference)."),
    proj_dim: int = typer.Option(8192, help="Total projected feature dimension."),
    lora: bool = typer.Option(False, help="Wrap a plain model in a fresh LoRA and track only it."),
    step_split: str = typer.Option("position", help=STEP_SPLIT_HELP),
    preconditioner: str = typer.Option(
        "auto",
        help="auto|none|adam|factored_adam (auto: adam in less mode, factored_adam in "
        "factorized mode when checkpoints carry optimizer state, else none).",
    ),
    metric: str = typer.Option("cosine", help="cosine|inner"),
    aggregate: str = typer.Option("max", help="Across target subtasks: max|mean."),
    remove_mean: bool = typer.Option(False, help="Remove the pool's mean gradient direction."),
    target_mode: str = typer.Option(
        "subtask", help="subtask|success_minus_failure|advantage (see docs)."
    ),
    subtask_field: str = typer.Option("task_id", help="Field naming a target's subtask."),
    max_length: int = typer.Option(2048, help="Max tokens; longer trajectories lose early steps."),
    seed: int = typer.Option(0, help="Projection and null seed."),
    trust_remote_code: bool = typer.Option(
        False, help="Allow model code from the model directory (off: no code runs from data)."
    ),
    update_mask_from: list[Path] = typer.Option(
        [],
        help="Two checkpoint dirs (repeat the flag): track only parameters that moved between "
        "them by more than --update-mask-threshold (where fine-tuning/RL updates land).",
    ),
    update_mask_threshold: float = typer.Option(1e-5, help="Sparse update mask threshold."),
    workers: int = typer.Option(
        1, help="Threads scoring blocks of pool rows in parallel (scores identical to 1)."
    ),
    scoring_preconditioner: str = typer.Option(
        "none",
        help="Preconditioner of the target directions: none|gram (damped inverse pool Gram)|"
        "kfac (per-layer K-FAC factors of the pool, factorized mode; saved in OUT/kfac/).",
    ),
    kfac_damping: float = typer.Option(
        0.1, help="K-FAC damping: lambda = kfac_damping * trace(factor) / k."
    ),
) -> None:
    """Score every pool trajectory and step against the target.

    Example:
      trajinf score --model warm/final --checkpoint warm/ckpt-1 --checkpoint warm/ckpt-2 \\
          --pool pool.jsonl --target target.jsonl --out scores/
    """
    from trajinf.job.config import build_job_config
    from trajinf.job.run import score_pool

    cfg = build_job_config(
        mode=mode.value,
        proj_dim=proj_dim,
        lora=lora,
        step_split=step_split,
        preconditioner=preconditioner,
        has_checkpoints=bool(checkpoint),
        metric=metric,
        aggregate=aggregate,
        remove_mean=remove_mean,
        target_mode=target_mode,
        subtask_field=subtask_field,
        max_length=max_length,
        seed=seed,
        scoring_preconditioner=scoring_preconditioner,
        kfac_damping=kfac_damping,
    )
    cfg.trust_remote_code = trust_remote_code
    cfg.scoring.workers = workers
    if update_mask_from:
        if len(update_mask_from) != 2:
            raise TrajinfError("--update-mask-from needs exactly two checkpoint dirs")
        cfg.update_mask_from = (str(update_mask_from[0]), str(update_mask_from[1]))
        cfg.extraction.update_mask_threshold = update_mask_threshold
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
    method: Method = typer.Option(Method.influence, help="Selector."),
    drop_harmful: bool = typer.Option(False, help="Drop trajectories flagged harmful."),
    step_weights: bool = typer.Option(False, help="Write weight 0 on negative-influence steps."),
    seed: int = typer.Option(0, help="Seed for random tie-breaks and the random baseline."),
    drop_zero_variance: bool = typer.Option(
        False, help="Drop rollout groups (same task_id) whose outcomes are all equal."
    ),
    dedup: float = typer.Option(
        None, help="Keep one trajectory per near-duplicate cluster (feature cosine >= this)."
    ),
    prior: str = typer.Option(
        None,
        help="Step prior for step weights and --method prior: branch, group_variance, "
        "expert_aligned, tool_call.",
    ),
    combine: str = typer.Option(
        None, help="Combine the prior with influence step scores: product or rank."
    ),
    env: str = typer.Option(None, help="Env for priors that replay trajectories (toolworld, twx)."),
    weight_mode: str = typer.Option("binary", help="Step weights: binary (0/1) or soft [0, 1]."),
    out: Path = typer.Option(..., help="Selected trajectories, written in the input format."),
) -> None:
    """Select a subset (and per-step weights) and write it back in the input format.

    Example:
      trajinf select --scores scores/ --pool pool.jsonl --fraction 0.05 --drop-harmful \\
          --step-weights --out selected.jsonl
      trajinf select --scores scores/ --pool pool.jsonl --method prior --prior expert_aligned \\
          --env toolworld --combine rank --step-weights --out selected.jsonl
    """
    from trajinf.selection.export import select_to_file

    sel = select_to_file(
        scores,
        pool,
        out,
        method=method.value,
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
    )
    if sel.info.get("filters"):
        console.print(f"filters: {sel.info['filters']}")
    console.print(f"selected {len(sel.ids)} trajectories with '{method.value}' -> {out}")


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
