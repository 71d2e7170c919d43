"""CLI verbs of the environment loop: rollout, train, eval, demo (registered on ``cli.app``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from trajinf.cli.app import app, console, progress_bars
from trajinf.errors import TrajinfError

POLICIES = ("expert", "noisy", "planted", "random", "model")


def _policy(
    name: str,
    *,
    model: Path | None,
    noise: float,
    temperature: float,
    seed: int,
    chat_template: str | None = None,
):
    from trajinf.envs.policies import (
        ExpertPolicy,
        NoisyExpertPolicy,
        PlantedHarmfulPolicy,
        RandomPolicy,
    )

    if name == "expert":
        return ExpertPolicy()
    if name == "noisy":
        return NoisyExpertPolicy(noise)
    if name == "planted":
        return PlantedHarmfulPolicy()
    if name == "random":
        return RandomPolicy()
    if name == "model":
        if model is None:
            raise TrajinfError("--policy model needs --model DIR")
        from trajinf.envs.model_policy import ModelPolicy
        from trajinf.models.checkpoints import load_model

        m, tok = load_model(model, chat_template=chat_template)
        return ModelPolicy(m, tok, mode="rank", temperature=temperature, seed=seed)
    raise TrajinfError(f"--policy must be one of {', '.join(POLICIES)}, got '{name}'")


@app.command()
def rollout(
    out: Path = typer.Option(..., help="JSONL file to write (OpenAI chat with tool_calls)."),
    env: str = typer.Option("builtin", help="builtin | twx"),
    policy: str = typer.Option("expert", help="expert | noisy | planted | random | model"),
    model: Path = typer.Option(None, help="Model dir for --policy model."),
    split: str = typer.Option("train", help="Task split: train | test | dev."),
    n_tasks: int = typer.Option(50, help="Number of tasks."),
    per_task: int = typer.Option(1, help="Rollouts per task (a group, for GRPO-style data)."),
    noise: float = typer.Option(0.3, help="Random-action probability of --policy noisy."),
    temperature: float = typer.Option(1.0, help="Sampling temperature of --policy model."),
    seed: int = typer.Option(0),
    chat_template: str = typer.Option(
        None, help="--policy model: replace its chat template (chatml-tools, llama3-tools, file)."
    ),
) -> None:
    """Run a policy in an environment and write its trajectories.

    Example:  trajinf rollout --env builtin --policy noisy --noise 0.4 --n-tasks 100 --out noisy.jsonl
    """
    from trajinf.data.write import write_pool
    from trajinf.envs import make_env
    from trajinf.envs.rollout import rollout as run

    e = make_env(env)
    pol = _policy(
        policy,
        model=model,
        noise=noise,
        temperature=temperature,
        seed=seed,
        chat_template=chat_template,
    )
    trajs = run(
        e, e.tasks(split, n_tasks, seed), pol, source=policy, n_per_task=per_task, seed=seed
    )
    write_pool(trajs, out)
    ok = sum(bool(t.success) for t in trajs)
    console.print(f"{len(trajs)} trajectories ({ok} labelled success) -> {out}")


@app.command()
def train(
    data: Path = typer.Option(
        ..., help="Training trajectories (JSONL; per-step `weight` honored)."
    ),
    out: Path = typer.Option(..., help="Output model directory (save_pretrained)."),
    base: Path = typer.Option(
        None,
        help="Model to start from (save_pretrained dir, .gguf file, smollm2-135m, cached hub "
        "id); omit for a tiny model from scratch.",
    ),
    chat_template: str = typer.Option(
        None, help="Replace --base's chat template: chatml-tools, llama3-tools or a Jinja file."
    ),
    dtype: str = typer.Option("fp32", help="Weights' dtype of --base: fp32 | bf16 | fp16 (GPU)."),
    epochs: int = typer.Option(3),
    lr: float = typer.Option(None, help="Peak learning rate (default: the demo's)."),
    lora: bool = typer.Option(False, help="Train LoRA adapters (peft) instead of all weights."),
    checkpoints: int = typer.Option(0, help="Save N warmup checkpoints (lr + Adam moments)."),
    seed: int = typer.Option(0),
) -> None:
    """Supervised fine-tuning on action tokens; optional warmup checkpoints for LESS scoring.

    Example:  trajinf train --data selected.jsonl --base base/ --epochs 4 --out tuned/
    """
    from trajinf.data.trajectories import load_pool
    from trajinf.models.checkpoints import load_model
    from trajinf.models.tiny import tiny_model, train_tokenizer
    from trajinf.train.sft import DEMO_MODEL, DEMO_TRAIN, train_sft

    trajs = load_pool(data)
    if base is None:
        from trajinf.models.tiny import tokenizer_corpus

        tok = train_tokenizer(tokenizer_corpus(trajs), vocab_size=DEMO_MODEL["vocab_size"])
        model = tiny_model(
            tok, seed=seed, **{k: v for k, v in DEMO_MODEL.items() if k != "vocab_size"}
        )
    else:
        model, tok = load_model(base, lora=lora, dtype=dtype, chat_template=chat_template)
    cfg = replace(DEMO_TRAIN, epochs=epochs, seed=seed, lora=lora and base is None)
    if lr is not None:
        cfg = replace(cfg, lr=lr)
    with progress_bars() as bars:
        res = train_sft(
            model,
            tok,
            trajs,
            cfg,
            checkpoint_dir=out / "checkpoints" if checkpoints else None,
            n_checkpoints=checkpoints,
            progress=bars("train steps", None),
        )
    res.model.save_pretrained(out)  # a peft model when train_sft added the LoRA
    tok.save_pretrained(out)
    console.print(f"trained on {len(trajs)} trajectories -> {out}; checkpoints: {res.checkpoints}")


@app.command(name="eval")
def eval_(
    model: Path = typer.Option(..., help="Model dir."),
    env: str = typer.Option("builtin", help="builtin | twx"),
    split: str = typer.Option("test"),
    n_tasks: int = typer.Option(100),
    families: list[str] = typer.Option([], help="Only these subtask families (repeat)."),
    seed: int = typer.Option(0),
    chat_template: str = typer.Option(
        None, help="Replace the model's chat template (chatml-tools, llama3-tools or a file)."
    ),
) -> None:
    """Success rate of a model (rank mode over valid actions) on held-out tasks, per subtask.

    Example:  trajinf eval --model tuned/ --env builtin --n-tasks 200
    """
    from trajinf.envs import make_env
    from trajinf.envs.evaluate import evaluate_policy
    from trajinf.envs.model_policy import ModelPolicy
    from trajinf.models.checkpoints import load_model

    m, tok = load_model(model, chat_template=chat_template)
    res = evaluate_policy(
        make_env(env),
        ModelPolicy(m, tok, mode="rank"),
        split=split,
        n_tasks=n_tasks,
        seed=seed,
        families=families or None,
    )
    typer.echo(json.dumps(res.to_dict(), indent=2))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Output directory."),
    env: str = typer.Option(None, help="builtin | twx (default: twx)."),
    seeds: int = typer.Option(None, help="Training seeds per method."),
    quick: bool = typer.Option(
        False, help="Small TextWorld Express slice, 2 seeds (about 3 min on 2 cores)."
    ),
    budget: float = typer.Option(None, help="Selection budget as a fraction of the pool."),
    model: str = typer.Option(
        None,
        help="A pretrained agent (smollm2-135m, a .gguf file, a save_pretrained dir): the "
        "real-agent preset (LoRA, 2 CPU cores; see docs/benchmarks.md).",
    ),
    chat_template: str = typer.Option(
        None, help="With --model: its chat template (default chatml-tools, or a Jinja file)."
    ),
) -> None:
    """The whole loop: rollouts -> warmup -> influence -> selections -> retrain -> success.

    Ends with the result table (every method, including the task-matched baselines) and the
    result in one sentence; report.html has the same and the evidence behind it.

    Examples:  trajinf demo --quick --out demo-out
               trajinf demo --model smollm2-135m --out demo-real
    """
    from trajinf.loop.demo import DemoConfig, real_agent_config, run_demo

    if model is not None:
        cfg = real_agent_config(model)
        if chat_template is not None:
            cfg = replace(cfg, chat_template=chat_template)
    else:
        cfg = DemoConfig.quick() if quick else DemoConfig.default()
    over = {"env": env, "seeds": seeds, "budget": budget}
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    with progress_bars() as bars:
        res = run_demo(cfg, out, progress=bars, log=lambda s: console.print(f"[dim]{s}[/dim]"))
    from trajinf.report import DEMO_HEADER, demo_sentence, demo_table_rows

    table = Table(
        title=f"held-out success on the target tasks (budget {cfg.budget:.0%}, {cfg.seeds} seeds)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    # the report's table without its last column (expert-step agreement): 80 columns wide
    for col in DEMO_HEADER[:-1]:
        table.add_column(col, no_wrap=True)
    for row in demo_table_rows(res):
        table.add_row(*(str(x) for x in row[:-1]))
    console.print(
        f"base agent: success {res['base_success_rate']:.3f}, step agreement "
        f"{res['base_step_agreement']:.3f}"
    )
    console.print(
        f"runtime: {res['runtime_s']['total_s']:.0f} s wall, {res['runtime_s']['cpu_s']:.0f} s CPU"
        f" -> {out}/results.json, {out}/report.html"
    )
    out_console = Console()  # the table and the result go to stdout; logs and bars to stderr
    out_console.print(table)
    out_console.print(demo_sentence(res), soft_wrap=True)
