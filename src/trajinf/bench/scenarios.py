"""The benchmark's pools and targets: one base agent per environment, three scenarios over it.

- ``mixed``: expert demos + noisy experts + one-bad-step demos + planted-harmful demos + the base
  agent's own rollouts (planted: ToolWorld's wrong rule, built with the demo; TextWorld Express's
  wrong object/direction at the gold path's last step, added here, see ``PlantedHarmfulPolicy``); target = a few expert demos per target family.
- ``flood``: a small expert set plus >= 90 % the base agent's own rollouts (sampled, several per
  task: the early-experience setting); same target.
- ``outcome``: the mixed pool, but the target is only success/failure-labelled rollouts of the
  target tasks (noisy experts and the base agent): a non-differentiable target, scored by
  success-minus-failure or advantage-weighted directions.
- ``early``: the mixed pool plus early-experience examples (arXiv 2510.08558: world-model and
  self-reflection examples from K alternative actions tried at expert states, no reward), built
  lazily the first time the scenario is asked for.

All scenarios share the base agent and the warmup checkpoints of ``build_demo_data`` (trained on
a random sample of the mixed pool), so that differences between scenarios come from the pool and
the target, not from a different starting model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from trajinf.data.schema import Trajectory
from trajinf.data.trajectories import load_pool
from trajinf.data.write import write_pool
from trajinf.envs.model_policy import ModelPolicy
from trajinf.envs.policies import NoisyExpertPolicy, PlantedHarmfulPolicy, expert_action
from trajinf.envs.rollout import rollout
from trajinf.loop.steps import DemoData, build_demo_data, summarize_pool
from trajinf.models.checkpoints import load_model

SCENARIOS = ("mixed", "flood", "outcome", "early")
EE_SOURCES = ("world_model", "reflection")


class OneBadStepPolicy:
    """The expert, except at one uniformly drawn step of its path where it takes a random
    non-expert action; the step is recorded in ``meta["bad_step"]`` (evaluation only)."""

    name = "one-bad-step"

    def act(self, episodes: list) -> list[str]:
        """One action per episode."""
        return [self._act_one(ep) for ep in episodes]

    def _act_one(self, ep) -> str:
        if "bad" not in ep.notes:
            horizon = max(1, len(ep.env.expert(ep.task)))
            ep.notes["bad"] = ep.rng.randrange(horizon)
        if ep.step != ep.notes["bad"] or "bad_step" in ep.meta:
            return expert_action(ep)
        planned = expert_action(ep, advance=False)
        others = [a for a in (ep.valid_actions or []) if a != planned]
        if not others:
            return expert_action(ep)
        ep.meta["bad_step"] = ep.step
        return ep.rng.choice(others)


@dataclass
class Scenario:
    """One pool + target pair to select from."""

    name: str
    pool: list[Trajectory]
    target: list[Trajectory]
    target_mode: str  # "subtask" | "success_minus_failure" (advantage is a scoring variant)
    summary: dict
    priors: dict = field(default_factory=dict)  # step prior name -> values (bench cache)


@dataclass
class BenchData:
    """Everything built once per environment."""

    demo: DemoData
    scenarios: dict[str, Scenario]


def build_bench_data(env, config, out: Path, *, names=SCENARIOS, progress=None, log=print):
    """The base agent, warmup checkpoints and the scenarios' pools and targets, under ``out``.

    Reuses ``out/data`` when a previous run of the same configuration finished building it
    (``out/data/done`` holds the config it was built with)."""
    import json

    data_dir = out / "data"
    stamp = json.dumps(config.demo_config_dict(), sort_keys=True, default=str)
    done = data_dir / "done"
    if done.exists() and done.read_text() == stamp:
        log(f"{env.name}: reusing built data in {data_dir}")
        return _load(env, config, data_dir, names)
    demo = build_demo_data(env, config.demo_config(), data_dir, progress=progress, log=log)
    rng = random.Random(config.seed)
    families = demo.target_families
    pool_tasks, target_tasks = _tasks_of(env, config, demo)
    roll = _roller(env, config)

    bad = roll(pool_tasks, OneBadStepPolicy(), "noisy", id_prefix="onebad", seed=config.seed + 7)
    mixed_pool = demo.pool + bad + _gold_path_planted(env, config, pool_tasks, families, roll)
    # flood: the base agent's own sampled rollouts, several per task, plus a few expert demos
    base, tok = load_model(demo.base_dir)
    agent = ModelPolicy(base, tok, mode="rank", temperature=1.0, seed=config.seed + 11)
    flood_self = roll(
        pool_tasks, agent, "self", n_per_task=config.flood_per_task, id_prefix="flood"
    )
    experts = [t for t in demo.pool if t.source == "expert" and not t.meta.get("planted")]
    flood_pool = rng.sample(experts, min(len(experts), config.flood_experts)) + flood_self
    # outcome: labelled rollouts of the target tasks only (no demos of the wanted behaviour)
    outcome_target = []
    for k, level in enumerate((0.3, 0.6)):
        outcome_target += roll(
            target_tasks,
            NoisyExpertPolicy(level),
            "target",
            id_prefix=f"outcome-noisy{level:g}",
            seed=config.seed + 21 + k,
        )
    outcome_target += roll(target_tasks, agent, "target", id_prefix="outcome-self", n_per_task=2)
    write_pool(mixed_pool, data_dir / "pool_mixed.jsonl")
    write_pool(flood_pool, data_dir / "pool_flood.jsonl")
    write_pool(demo.target, data_dir / "target_demos.jsonl")
    write_pool(outcome_target, data_dir / "target_outcome.jsonl")
    (data_dir / "demo.json").write_text(
        json.dumps(
            {
                "target_families": families,
                "checkpoints": [str(c) for c in demo.checkpoints],
                "base_success": demo.base_success,
            },
            default=str,
        )
    )
    done.write_text(stamp)
    return _load(env, config, data_dir, names)


def _gold_path_planted(env, config, pool_tasks, families, roll) -> list[Trajectory]:
    """Planted-harmful demos for envs without a planner (build_demo_data plants only with one):
    ``planted_fraction`` of the plantable target-family pool tasks, disguised as expert demos."""
    if hasattr(env, "next_action"):
        return []
    fam = [t for t in pool_tasks if t.family in families]
    planted = [
        t
        for t in roll(fam, PlantedHarmfulPolicy(), "expert", id_prefix="demo", seed=config.seed + 5)
        if t.meta.get("planted")
    ]
    n = round(config.demo_config().planted_fraction * len(fam))
    return random.Random(config.seed + 5).sample(planted, min(n, len(planted)))


def _roller(env, config):
    def roll(tasks, policy, source, *, seed=config.seed, **kw):
        return rollout(env, tasks, policy, source=source, seed=seed, with_tools=False, **kw)

    return roll


def _tasks_of(env, config, demo: DemoData) -> tuple[list, list]:
    """The Task objects behind the demo's pool and target (drawn once, as build_demo_data
    drew them)."""
    tasks = env.tasks("train", config.n_tasks_drawn(env), config.seed)
    pool_ids, target_ids = {t.task_id for t in demo.pool}, {t.task_id for t in demo.target}
    return [t for t in tasks if t.id in pool_ids], [t for t in tasks if t.id in target_ids]


def _load(env, config, data_dir: Path, names) -> BenchData:
    import json

    info = json.loads((data_dir / "demo.json").read_text())
    mixed = load_pool(data_dir / "pool_mixed.jsonl")
    demos = load_pool(data_dir / "target_demos.jsonl")
    demo = DemoData(
        pool=[t for t in mixed if not t.id.startswith("onebad")],
        target=demos,
        target_families=info["target_families"],
        base_dir=data_dir / "models" / "base",
        warm_dir=Path(info["checkpoints"][-1]),
        checkpoints=[Path(c) for c in info["checkpoints"]],
        base_success=info["base_success"],
        pool_summary=summarize_pool(mixed),
    )
    out: dict[str, Scenario] = {}
    if "mixed" in names:
        out["mixed"] = Scenario("mixed", mixed, demos, "subtask", summarize_pool(mixed))
    if "flood" in names:
        flood = load_pool(data_dir / "pool_flood.jsonl")
        out["flood"] = Scenario("flood", flood, demos, "subtask", summarize_pool(flood))
    if "outcome" in names:
        target = load_pool(data_dir / "target_outcome.jsonl")
        summary = summarize_pool(mixed)
        summary["target_success"] = sum(bool(t.success) for t in target) / max(1, len(target))
        out["outcome"] = Scenario("outcome", mixed, target, "success_minus_failure", summary)
    if "early" in names:
        path = data_dir / "pool_early.jsonl"
        if not path.exists():
            write_pool(mixed + _early_examples(env, config, mixed), path)
        early = load_pool(path)
        out["early"] = Scenario("early", early, demos, "subtask", summarize_pool(early))
    return BenchData(demo, out)


def _early_examples(env, config, mixed: list[Trajectory]) -> list[Trajectory]:
    """Early-experience examples from a sample of the pool's expert demos, capped at half the
    mixed pool's size so that they neither swamp the pool nor the scoring cost."""
    from trajinf.envs.early_experience import early_experience

    rng = random.Random(config.seed + 31)
    experts = [t for t in mixed if t.source == "expert" and not t.meta.get("planted")]
    experts = rng.sample(experts, min(len(experts), config.early_experts))
    ee = early_experience(env, experts, k=config.early_k, seed=config.seed)
    cap = max(1, len(mixed) // 2)
    return rng.sample(ee, cap) if len(ee) > cap else ee
