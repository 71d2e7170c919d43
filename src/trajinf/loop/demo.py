"""The main job: the environment loop that tests whether influence-based selection pays off.

tasks -> target demos + pool (expert, noisy, planted-harmful, self rollouts) -> base agent ->
warmup checkpoints -> influence scores -> selections (influence and baselines) at one budget ->
fine-tune the base agent on each selection, over seeds -> success on held-out target tasks.

Nothing here is tuned to a result: every method gets the same base model, budget, epochs and
seeds, and the table reports what was measured.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trajinf.atomic import write_json
from trajinf.envs import make_env
from trajinf.loop.steps import (
    DemoData,
    build_demo_data,
    harmful_detection,
    paired_tests,
    run_cells,
    select_for_method,
    selection_composition,
)

METHODS = (
    "influence", "influence-drop-harmful", "random", "task-random", "success", "task-success",
    "full", "rds",
)  # fmt: skip

# the paired tests compare every method with these (when run)
BASELINES = ("random", "task-random", "task-success", "full")


@dataclass
class DemoConfig:
    """Sizes and knobs of the demo; ``quick()`` and ``default()`` are the two presets."""

    env: str = "builtin"
    seeds: int = 3
    budget: float = 0.1
    target_families: list[str] | None = None  # None: the first half of the env's families
    n_train_tasks: int = 120  # pool tasks
    n_target_per_family: int = 4
    n_test_tasks: int = 60
    noisy_levels: tuple[float, ...] = (0.3, 0.6)
    planted_fraction: float = 0.15  # of expert demos on target families, relabelled harmful
    self_per_task: int = 2
    n_base_tasks: int = 60  # expert demos (outside the pool) the base agent learns from
    base_families: list[str] | None = None  # families of those demos (None: all)
    warmup_fraction: float = 0.1
    warmup_checkpoints: int = 2
    base_epochs: int = 10
    finetune_steps: int = 100  # optimizer steps of every method's fine-tuning
    proj_dim: int = 2048
    with_tools: bool = False  # tool schemas in the prompt double the tokens; calls stay
    methods: tuple[str, ...] = METHODS
    threads: int = 1  # tiny models are op-overhead bound: 1 thread is as fast, and robust to load
    # processes for the (method, seed) fine-tune + evaluate cells; > 1 spawns them, so a script
    # that calls run_demo needs the usual `if __name__ == "__main__":` guard
    workers: int = 1
    seed: int = 0
    model: dict = field(default_factory=dict)  # overrides of the tiny model config
    # a pretrained agent instead of a tiny one (``real()``): --model spec, template, LoRA, policy
    pretrained: str | None = None  # save_pretrained dir, .gguf file, smollm2-135m, cached hub id
    chat_template: str | None = None  # replaces the pretrained model's template (chatml-tools)
    lora: bool = False  # warmup and fine-tunes train LoRA adapters (models.lora)
    lr: float | None = None  # peak learning rate (None: the tiny demo's DEMO_TRAIN lr)
    reuse_cache: bool = False  # model policy keeps each episode's KV cache across steps
    history_window: int | None = None  # model policy sees the last N steps (None: all)
    max_steps: int | None = None  # evaluation episodes stop after N steps (None: the env's)
    batch_tokens: int | None = None  # padded tokens per training / extraction batch (memory)

    @classmethod
    def default(cls, **kw) -> DemoConfig:
        """The main job: TextWorld Express games, 3 seeds, the fine-tune cells on 2 processes."""
        base = dict(
            env="twx",
            seeds=3,
            n_train_tasks=48,
            n_test_tasks=30,
            n_base_tasks=40,
            self_per_task=1,
            finetune_steps=30,
            workers=2,
        )
        return cls(**{**base, **kw})

    @classmethod
    def quick(cls, **kw) -> DemoConfig:
        """The first-ten-minutes preset: a small TextWorld Express slice, 2 seeds, the fine-tune
        cells on 2 processes (about 3 minutes on 2 idle cores). No planted-harmful demos (TWX
        has no re-planning expert), so ``influence-drop-harmful`` is left out: it would equal
        ``influence``."""
        base = dict(
            env="twx",
            seeds=2,
            n_train_tasks=32,
            n_test_tasks=20,
            n_base_tasks=32,
            self_per_task=1,
            finetune_steps=30,
            workers=2,
            methods=tuple(m for m in METHODS if m != "influence-drop-harmful"),
        )
        return cls(**{**base, **kw})


def real_agent_config(model: str = "smollm2-135m", **kw) -> DemoConfig:
    """The loop with a pretrained agent (SmolLM2-135M-Instruct by default), sized for 2 CPU
    cores: TextWorld Express, the pretrained model as the base agent (no base training, no
    self rollouts), ChatML with tool calls, LoRA warmup and fine-tunes, the policy's KV cache
    across steps, 6 held-out test episodes of at most 10 steps, 3 seeds, 4 methods.
    See docs/benchmarks.md ("Real model: SmolLM2-135M") for its measured time."""
    base = dict(
        env="twx",
        pretrained=model,
        chat_template="chatml-tools",
        lora=True,
        lr=1e-3,
        reuse_cache=True,
        seeds=3,
        budget=0.2,
        n_train_tasks=12,
        n_target_per_family=2,
        n_test_tasks=6,
        max_steps=10,
        n_base_tasks=0,
        base_epochs=0,
        self_per_task=0,
        noisy_levels=(0.5,),
        warmup_fraction=0.2,
        warmup_checkpoints=2,
        finetune_steps=3,
        batch_tokens=2048,  # 8192 (the tiny default) takes ~15 GB with a 135M model
        proj_dim=1024,
        workers=2,
        methods=("influence", "random", "success", "full"),
    )
    return DemoConfig(**{**base, **kw})


def _cpu_seconds() -> float:
    import resource

    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_demo(
    config: DemoConfig,
    out: str | Path,
    *,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the loop and write ``out/results.json`` and ``out/report.html``; return the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # a demo run rebuilds its models: old stores and selections would not match
    for sub in ("models", "scores", "selections"):
        shutil.rmtree(out / sub, ignore_errors=True)
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    timings: dict[str, float] = {}
    random.seed(config.seed)
    np.random.seed(config.seed)

    import torch

    torch.set_num_threads(config.threads)
    env = make_env(config.env)
    t0 = time.perf_counter()
    data: DemoData = build_demo_data(env, config, out, progress=progress, log=log)
    timings["data_and_warmup_s"] = time.perf_counter() - t0
    from trajinf.data.write import write_pool

    write_pool(data.pool, out / "pool.jsonl")  # the evidence: what was scored and selected
    write_pool(data.target, out / "target.jsonl")

    from trajinf.job.config import build_job_config
    from trajinf.job.run import score_pool

    t0 = time.perf_counter()
    job = build_job_config(
        proj_dim=config.proj_dim,
        has_checkpoints=True,
        subtask_field="family",
        seed=config.seed,
        max_length=None,
        **({"batch_tokens": config.batch_tokens} if config.batch_tokens else {}),
    )
    scored = score_pool(
        data.warm_dir,
        data.pool,
        data.target,
        out / "scores",
        checkpoints=data.checkpoints,
        config=job,
        progress=progress,
    )
    timings["score_s"] = time.perf_counter() - t0
    scores, steps = scored.trajectories, scored.steps
    import pandas as pd

    stats = pd.read_parquet(out / "scores" / "statistics.parquet")
    harm = harmful_detection(data.pool, scores)
    log(f"harmful detection: {json.dumps(harm)}")

    by_id = {t.id: t for t in data.pool}
    sizes: dict[str, int] = {}
    composition: dict[str, list[dict]] = {}
    jobs = []
    (out / "selections").mkdir()
    for s in range(config.seeds):
        seed = config.seed + 1000 * (s + 1)
        for method in config.methods:
            sel = select_for_method(
                method,
                data.pool,
                data.target_families,
                budget=config.budget,
                seed=seed,
                scores=scores,
                step_scores=steps,
                statistics=stats,
            )
            sizes[method] = len(sel.ids)
            composition.setdefault(method, []).append(selection_composition(sel.ids, by_id))
            path = out / "selections" / f"{method}-seed{s}.jsonl"
            write_pool([by_id[i] for i in sel.ids], path)
            jobs.append(
                {
                    "method": method,
                    "seed_index": s,
                    "seed": seed,
                    "selection": str(path),
                    "n_selected": len(sel.ids),
                    "base_dir": str(data.base_dir),
                    "env": config.env,
                    "families": list(data.target_families),
                    "config": asdict(config),
                }
            )
    t0 = time.perf_counter()
    tick = progress("retrain + eval", len(jobs)) if progress else None
    cells: dict[tuple[str, int], dict] = {}
    if config.workers > 1 and len(jobs) > 1 and hasattr(env, "close"):
        env.close()  # the workers make their own (a TWX env holds a JVM)
    for cell in run_cells(jobs, config.workers, env):
        cells[(cell["method"], cell["seed_index"])] = cell
        if tick:
            tick(1)
    ordered = {m: [cells[(m, s)] for s in range(config.seeds)] for m in config.methods}
    per_method = {m: [c["success_rate"] for c in v] for m, v in ordered.items()}
    per_family = {m: [c["per_family"] for c in v] for m, v in ordered.items()}
    agreement = {m: [c["step_agreement"] for c in v] for m, v in ordered.items()}
    seconds = {m: [c["seconds"] for c in v] for m, v in ordered.items()}
    timings["retrain_eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    # CPU of this process and its finished children (workers, JVMs): the run's size on any
    # machine, where wall time depends on what else runs
    timings["cpu_s"] = _cpu_seconds() - cpu_start

    methods = {
        m: {
            "success_rate_mean": float(np.mean(v)),
            "success_rate_std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "per_seed": v,
            "per_family": per_family[m],
            "step_agreement_mean": float(np.mean(agreement[m])),
            "step_agreement_std": float(np.std(agreement[m], ddof=1)) if len(v) > 1 else 0.0,
            "step_agreement_per_seed": agreement[m],
            "n_selected": sizes.get(m),
            "cell_seconds": seconds[m],  # fine-tune + evaluate wall time per seed
            "selected": composition[m],  # per seed: families, sources, labelled successes
        }
        for m, v in per_method.items()
    }
    results = {
        "env": config.env,
        "budget": config.budget,
        "seeds": config.seeds,
        "target_families": data.target_families,
        "pool": data.pool_summary,
        "base_success_rate": data.base_success["success_rate"],
        "base_step_agreement": data.base_success["step_agreement"],
        "methods": methods,
        "paired_tests": paired_tests(per_method, against=BASELINES),
        "paired_tests_step_agreement": paired_tests(agreement, against=BASELINES),
        "harmful_detection": harm,
        "runtime_s": timings,
        "config": asdict(config),
    }
    write_json(results, out / "results.json")

    from transformers import AutoTokenizer

    from trajinf.report import write_demo_report

    tokenizer = AutoTokenizer.from_pretrained(data.base_dir)
    write_demo_report(results, scores, steps, data.pool, out / "report.html", tokenizer=tokenizer)
    return results
