"""The pieces of the demo loop: build the data and base agent, fine-tune, evaluate, compare."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from trajinf.data.schema import Trajectory
from trajinf.envs.evaluate import auroc, evaluate_policy, expert_step_agreement
from trajinf.envs.model_policy import ModelPolicy
from trajinf.envs.policies import ExpertPolicy, NoisyExpertPolicy, PlantedHarmfulPolicy
from trajinf.envs.rollout import rollout
from trajinf.errors import TrajinfError
from trajinf.models.checkpoints import load_model
from trajinf.models.tiny import tiny_model, tokenizer_corpus, train_tokenizer
from trajinf.train.sft import DEMO_MODEL, DEMO_TRAIN, train_sft

Log = Callable[[str], None]


@dataclass
class DemoData:
    """What the demo builds before scoring: the pool, the target and the models on disk."""

    pool: list[Trajectory]
    target: list[Trajectory]
    target_families: list[str]
    base_dir: Path  # the agent before selection (tokenizer included)
    warm_dir: Path  # last warmup checkpoint
    checkpoints: list[Path]  # warmup checkpoints (lr + optimizer moments)
    base_success: dict  # evaluate_model() of the base agent
    pool_summary: dict


def _is_planted(t: Trajectory) -> bool:
    return bool(t.meta.get("planted"))


def summarize_pool(pool: Sequence[Trajectory]) -> dict:
    """Counts and success rates by source (planted counted apart, by their hidden label)."""
    out: dict[str, dict] = {}
    for t in pool:
        key = "planted" if _is_planted(t) else (t.source or "?")
        d = out.setdefault(key, {"n": 0, "labelled_success": 0})
        d["n"] += 1
        d["labelled_success"] += int(bool(t.success))
    return out


def demo_families(env, config) -> tuple[list[str], list[str], set[str]]:
    """(the env's families, the target families: ``config.target_families`` or the first half,
    the base agent's families: ``config.base_families`` or all)."""
    families = list(getattr(env, "families", None) or env.games)
    target_families = list(config.target_families or families[: max(1, len(families) // 2)])
    base_families = set(getattr(config, "base_families", None) or families)
    if not base_families <= set(families):
        raise TrajinfError(
            f"demo field 'base_families': {sorted(base_families - set(families))} not in {families}"
        )
    return families, target_families, base_families


def n_tasks_drawn(env, config) -> int:
    """How many train tasks :func:`demo_tasks` draws (seeded by ``config.seed``): the pool, 4x
    the target, and enough for ``n_base_tasks`` of the base families (tasks are drawn
    round-robin over the env's families)."""
    families, target_families, base_families = demo_families(env, config)
    n_target = config.n_target_per_family * len(target_families)
    n_base = config.n_base_tasks * len(families) // len(base_families)
    return config.n_train_tasks + 4 * n_target + n_base + len(families) - len(base_families)


def demo_tasks(env, config) -> tuple[list[str], list, list, list]:
    """(target families, target tasks, pool tasks, base-agent tasks) of a demo config, disjoint:
    ``n_target_per_family`` target tasks per target family, ``n_train_tasks`` pool tasks over
    all families, and ``n_base_tasks`` tasks of ``config.base_families`` (all when None) for the
    base agent's demos."""
    _, target_families, base_families = demo_families(env, config)
    tasks = env.tasks("train", n_tasks_drawn(env, config), config.seed)
    target_tasks: list = []
    for fam in target_families:
        target_tasks += [t for t in tasks if t.family == fam][: config.n_target_per_family]
    held = {t.id for t in target_tasks}
    rest = [t for t in tasks if t.id not in held]
    pool_tasks = rest[: config.n_train_tasks]
    base_tasks = [t for t in rest[config.n_train_tasks :] if t.family in base_families]
    base_tasks = base_tasks[: config.n_base_tasks]
    return target_families, target_tasks, pool_tasks, base_tasks


def build_demo_data(env, config, out: Path, *, progress=None, log: Log = print) -> DemoData:
    """Tasks -> target demos, pool (expert, noisy, planted, self) -> base agent -> warmup."""
    rng = random.Random(config.seed)
    target_families, target_tasks, pool_tasks, base_tasks = demo_tasks(env, config)

    log(f"env {env.name}: {len(pool_tasks)} pool tasks, target families {target_families}")

    def roll(tasks_, policy, source, *, seed=config.seed, **kw):
        return rollout(
            env, tasks_, policy, source=source, seed=seed, with_tools=config.with_tools, **kw
        )

    target = roll(target_tasks, ExpertPolicy(), "target")
    expert = roll(pool_tasks, ExpertPolicy(), "expert")
    noisy: list[Trajectory] = []
    for k, level in enumerate(config.noisy_levels):
        noisy += roll(
            pool_tasks,
            NoisyExpertPolicy(level),
            "noisy",
            seed=config.seed + 1 + k,
            id_prefix=f"noisy{level:g}",
        )
    fam_tasks = [t for t in pool_tasks if t.family in target_families]
    n_planted = max(1, round(config.planted_fraction * len(fam_tasks)))
    planted: list[Trajectory] = []
    if hasattr(env, "next_action"):  # planting a wrong rule needs a re-planning expert
        # disguised as expert demos: only meta["planted"] knows
        planted = roll(
            rng.sample(fam_tasks, n_planted), PlantedHarmfulPolicy(), "expert", id_prefix="demo"
        )
    else:
        log(f"env {env.name} has no re-planning expert: no planted-harmful trajectories")
    base_demos = roll(base_tasks, ExpertPolicy(), "base")

    model, tokenizer = base_agent(target + expert + noisy + planted + base_demos, config)
    seed_set = base_demos
    if seed_set and config.base_epochs > 0:
        log(f"base agent: training on {len(seed_set)} expert demos of tasks outside the pool")
        train_sft(model, tokenizer, seed_set, train_config(config, config.base_epochs, config.seed))
    base_dir = out / "models" / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base_success = evaluate_model(env, model, tokenizer, target_families, config)
    log(
        f"base agent on held-out target tasks: success {base_success['success_rate']:.3f}, "
        f"expert-step agreement {base_success['step_agreement']:.3f}"
    )

    self_policy = ModelPolicy(
        model, tokenizer, mode="rank", temperature=1.0, seed=config.seed, **policy_options(config)
    )
    selfr = (
        roll(pool_tasks, self_policy, "self", n_per_task=config.self_per_task)
        if config.self_per_task > 0
        else []
    )
    pool = expert + noisy + planted + selfr

    warm_set = rng.sample(pool, max(2, round(config.warmup_fraction * len(pool))))
    log(
        f"warmup: {len(warm_set)} random pool trajectories, {config.warmup_checkpoints} checkpoints"
    )
    warm_model, _ = load_model(base_dir)
    res = train_sft(
        warm_model,
        tokenizer,
        warm_set,
        train_config(config, config.warmup_checkpoints, config.seed),
        checkpoint_dir=out / "models" / "warmup",
        n_checkpoints=config.warmup_checkpoints,
    )
    ckpts = [Path(c["path"]) for c in res.checkpoints]
    return DemoData(
        pool=pool,
        target=target,
        target_families=target_families,
        base_dir=base_dir,
        warm_dir=ckpts[-1],
        checkpoints=ckpts,
        base_success=base_success,
        pool_summary=summarize_pool(pool),
    )


TASK_MATCHED = {"task-random": "random", "task-success": "success"}


def select_for_method(
    method: str,
    pool: Sequence[Trajectory],
    target_families: Sequence[str],
    *,
    budget: float,
    seed: int,
    **select_kw,
):
    """The demo's selection for ``method`` at ``ceil(budget * len(pool))`` trajectories.

    ``influence-drop-harmful`` drops flagged trajectories first. The task-matched baselines
    (``task-random``, ``task-success``) draw from the pool trajectories of the target families
    only, so they know what metadata alone tells: which games are the target. A method that
    does not beat them has learned nothing the task labels did not already say. The budget is
    the same count as every other method's (``task-success`` may fall short; ``info`` says so).
    """
    from trajinf.selection.select import select

    k = math.ceil(budget * len(pool))
    if method in TASK_MATCHED:
        fams = set(target_families)
        sub = [t for t in pool if t.meta.get("family") in fams]
        if not sub:
            raise TrajinfError(
                f"{method}: no pool trajectory of the target families {sorted(fams)}"
            )
        sel = select(
            TASK_MATCHED[method], sub, fraction=min(1.0, k / len(sub)), seed=seed, **select_kw
        )
        sel.ids = sel.ids[:k]  # k / n * n can round up past k
        sel.info.update(matched_pool=len(sub), n_selected=len(sel.ids))
        return sel
    name, drop = method.replace("-drop-harmful", ""), method.endswith("-drop-harmful")
    return select(
        name,
        pool,
        fraction=1.0 if name == "full" else budget,
        drop_harmful=drop,
        seed=seed,
        **select_kw,
    )


def base_agent(texts: Sequence[Trajectory], config):
    """(model, tokenizer) before any training: the pretrained ``config.pretrained`` (with its
    ``chat_template`` override), or a tiny model on a tokenizer trained on ``texts``."""
    pretrained = getattr(config, "pretrained", None)
    if pretrained:
        return load_model(pretrained, chat_template=getattr(config, "chat_template", None))
    tokenizer = train_tokenizer(tokenizer_corpus(texts), vocab_size=DEMO_MODEL["vocab_size"])
    model_kw = {k: v for k, v in {**DEMO_MODEL, **config.model}.items() if k != "vocab_size"}
    return tiny_model(tokenizer, seed=config.seed, **model_kw), tokenizer


def train_config(config, epochs: int, seed: int):
    """The demo's TrainConfig with ``epochs``, ``seed`` and the config's LoRA / lr choices."""
    out = replace(DEMO_TRAIN, epochs=epochs, seed=seed, lora=bool(getattr(config, "lora", False)))
    if getattr(config, "batch_tokens", None):
        out = replace(out, batch_tokens=config.batch_tokens)
    lr = getattr(config, "lr", None)
    return replace(out, lr=lr) if lr else out


def policy_options(config) -> dict:
    """ModelPolicy keywords of a demo config (KV cache across steps, history window)."""
    return {
        "reuse_cache": bool(getattr(config, "reuse_cache", False)),
        "history_window": getattr(config, "history_window", None),
    }


def selection_composition(ids: Sequence[str], by_id: dict[str, Trajectory]) -> dict:
    """What a selection holds: counts by family and by source (planted apart), and how many
    are labelled successful; ``by_id`` maps pool ids to trajectories."""
    fam: dict[str, int] = {}
    src: dict[str, int] = {}
    for i in ids:
        t = by_id[i]
        f = str(t.meta.get("family", "?"))
        s = "planted" if _is_planted(t) else str(t.source)
        fam[f] = fam.get(f, 0) + 1
        src[s] = src.get(s, 0) + 1
    ok = sum(bool(by_id[i].success) for i in ids)
    return {"families": fam, "sources": src, "labelled_success": ok, "n": len(ids)}


def finetune(data: DemoData, chosen: Sequence[Trajectory], config, *, seed: int):
    """The base agent fine-tuned on ``chosen``.

    Every method gets about the same number of optimizer steps (``config.finetune_steps``), so a
    small selection is seen for more epochs and the full pool for fewer: the compute budget is
    equal, the data differs.
    """
    model, tokenizer = load_model(data.base_dir)
    epochs = max(1, math.ceil(config.finetune_steps * DEMO_TRAIN.batch_size / max(1, len(chosen))))
    train_sft(model, tokenizer, list(chosen), train_config(config, epochs, seed))
    return model, tokenizer


_CELL_ENVS: dict = {}  # one env per worker process (a TWX env holds a JVM)


def retrain_cell(job: dict, env=None) -> dict:
    """Fine-tune the base agent on one selection and evaluate it: one (method, seed) cell.

    ``job``: method, seed, selection (JSONL path), base_dir, env, families, config (a
    ``DemoConfig`` as a dict). Runs in the caller's process (with its ``env``, when given) or
    a spawned worker (1 thread; one env per worker process).
    Returns the job's method and seed with success_rate, per_family, step_agreement, seconds.
    """
    import time
    from types import SimpleNamespace

    import torch

    from trajinf.data.trajectories import load_pool
    from trajinf.envs import make_env

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = SimpleNamespace(**job["config"])
    if env is None:
        env = _CELL_ENVS.get(job["env"]) or _CELL_ENVS.setdefault(job["env"], make_env(job["env"]))
    chosen = load_pool(job["selection"]) if job["n_selected"] else []
    base = SimpleNamespace(base_dir=Path(job["base_dir"]))  # finetune() reads only base_dir
    model, tok = finetune(base, chosen, cfg, seed=job["seed"])
    ev = evaluate_model(env, model, tok, job["families"], cfg)
    return {
        "method": job["method"],
        "seed_index": job["seed_index"],
        "success_rate": ev["success_rate"],
        "per_family": ev["per_family"],
        "step_agreement": ev["step_agreement"],
        "seconds": time.perf_counter() - t0,
    }


def run_cells(jobs: Sequence[dict], workers: int, env=None):
    """Yield ``retrain_cell`` results as they finish: in this process with ``env`` when
    ``workers`` <= 1, else in spawned processes (each one thread and, for TWX, one JVM)."""
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            yield retrain_cell(j, env)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
        for f in as_completed([ex.submit(retrain_cell, j) for j in jobs]):
            yield f.result()


def evaluate_model(env, model, tokenizer, families: Sequence[str], config) -> dict:
    """Greedy rank-mode success on the fixed held-out test tasks of ``families``."""
    policy = ModelPolicy(model, tokenizer, mode="rank", temperature=0.0, **policy_options(config))
    tasks = dict(split="test", n_tasks=config.n_test_tasks, seed=config.seed, families=families)
    if getattr(config, "max_steps", None):
        tasks["max_steps"] = config.max_steps
    out = evaluate_policy(env, policy, with_tools=config.with_tools, **tasks).to_dict()
    out["step_agreement"] = expert_step_agreement(
        env, policy, with_tools=config.with_tools, **tasks
    )
    return out


def harmful_detection(pool: Sequence[Trajectory], scores) -> dict:
    """How well scores and flags find the planted-harmful trajectories (labels from meta only)."""
    by_id = scores.set_index("id")
    labels = np.array([_is_planted(t) for t in pool])
    out: dict = {"n_planted": int(labels.sum()), "n_pool": len(pool)}
    if labels.sum() == 0 or labels.all():
        return out
    ids = [t.id for t in pool]
    score = by_id.loc[ids, "score"].to_numpy(dtype=float)
    out["auroc_low_score"] = auroc(-score, labels)
    if "min_step_score" in by_id:
        out["auroc_min_step"] = auroc(-by_id.loc[ids, "min_step_score"].to_numpy(float), labels)
    if "harmful" in by_id:
        flag = by_id.loc[ids, "harmful"].fillna(False).to_numpy(bool)
        out["flagged"] = int(flag.sum())
        out["flag_recall"] = float((flag & labels).sum() / labels.sum())
        out["flag_precision"] = float((flag & labels).sum() / max(1, flag.sum()))
    return out


def paired_tests(per_method: dict[str, list[float]], *, against: Sequence[str]) -> dict:
    """Paired t-tests of each method's per-seed success against the ``against`` baselines."""
    from scipy import stats

    out: dict = {}
    for base in against:
        if base not in per_method:
            continue
        for m, v in per_method.items():
            if m == base or len(v) < 2:
                continue
            a, b = np.asarray(v), np.asarray(per_method[base])
            diff = a - b
            if np.allclose(diff, diff[0]):
                p = None  # no spread across seeds: a t-test is undefined, not significant
            else:
                p = float(stats.ttest_rel(a, b).pvalue)
            out[f"{m} vs {base}"] = {
                "mean_diff": float(diff.mean()),
                "p_value": p,
                "n": len(v),
                "n_ahead": int((diff > 0).sum()),  # seeds where the method beat the baseline
            }
    return out
