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

from trajinf.envs import make_env
from trajinf.loop.steps import (
    DemoData,
    build_demo_data,
    evaluate_model,
    finetune,
    harmful_detection,
    paired_tests,
)
from trajinf.selection.select import select
from trajinf.store.atomic import write_json

METHODS = ("influence", "influence-drop-harmful", "random", "full", "success", "rds")


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
    warmup_fraction: float = 0.1
    warmup_checkpoints: int = 2
    base_epochs: int = 10
    finetune_steps: int = 100  # optimizer steps of every method's fine-tuning
    proj_dim: int = 2048
    with_tools: bool = False  # tool schemas in the prompt double the tokens; calls stay
    methods: tuple[str, ...] = METHODS
    threads: int = 1  # tiny models are op-overhead bound: 1 thread is as fast, and robust to load
    seed: int = 0
    model: dict = field(default_factory=dict)  # overrides of the tiny model config

    @classmethod
    def default(cls, **kw) -> DemoConfig:
        """The main job: TextWorld Express games, 3 seeds (about 10 minutes on 2 cores)."""
        base = dict(
            env="twx",
            seeds=3,
            n_train_tasks=48,
            n_test_tasks=30,
            n_base_tasks=40,
            self_per_task=1,
            finetune_steps=30,
        )
        return cls(**{**base, **kw})

    @classmethod
    def quick(cls, **kw) -> DemoConfig:
        """CI-sized preset on the built-in environment (a few minutes on 2 cores)."""
        base = dict(
            env="builtin",
            seeds=2,
            n_train_tasks=60,
            n_test_tasks=40,
            budget=0.2,
            n_base_tasks=30,
            base_epochs=8,
            finetune_steps=40,
        )
        return cls(**{**base, **kw})


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
    for sub in ("models", "scores"):  # a demo run rebuilds its models: old stores would not match
        shutil.rmtree(out / sub, ignore_errors=True)
    t_start = time.perf_counter()
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

    per_method: dict[str, list[float]] = {m: [] for m in config.methods}
    per_family: dict[str, list[dict]] = {m: [] for m in config.methods}
    agreement: dict[str, list[float]] = {m: [] for m in config.methods}
    sizes: dict[str, int] = {}
    t0 = time.perf_counter()
    tick = progress("retrain + eval", len(config.methods) * config.seeds) if progress else None
    for s in range(config.seeds):
        seed = config.seed + 1000 * (s + 1)
        for method in config.methods:
            name, drop = method.replace("-drop-harmful", ""), method.endswith("-drop-harmful")
            sel = select(
                name,
                data.pool,
                fraction=1.0 if name == "full" else config.budget,
                scores=scores,
                step_scores=steps,
                statistics=stats,
                drop_harmful=drop,
                seed=seed,
            )
            by_id = {t.id: t for t in data.pool}
            chosen = [by_id[i] for i in sel.ids]
            sizes[method] = len(chosen)
            model, tok = finetune(data, chosen, config, seed=seed)
            ev = evaluate_model(env, model, tok, data.target_families, config)
            per_method[method].append(ev["success_rate"])
            per_family[method].append(ev["per_family"])
            agreement[method].append(ev["step_agreement"])
            if tick:
                tick(1)
    timings["retrain_eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

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
        "paired_tests": paired_tests(per_method, against=("random", "full")),
        "paired_tests_step_agreement": paired_tests(agreement, against=("random", "full")),
        "harmful_detection": harm,
        "runtime_s": timings,
        "config": asdict(config),
    }
    write_json(results, out / "results.json")

    from trajinf.report import write_demo_report

    write_demo_report(results, scores, steps, data.pool, out / "report.html")
    return results
