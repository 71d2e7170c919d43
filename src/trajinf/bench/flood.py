"""The flood: an agent's own sampled rollouts, k per task, and what to keep of them.

The pool of one round is ``k`` rollouts (rank-mode sampling at ``temperature`` > 0) of the
current agent on each training task of the target families, outcomes recorded, plus at most a
few expert demos (``n_experts``, kept under 10 % of the pool). A method picks a budget-sized
part of that pool (the practitioner's baselines and the influence variants of
:data:`FLOOD_METHODS`), the agent is fine-tuned on it for the same optimizer steps whatever the
method, and evaluated greedily on held-out test tasks of the target families.

Influence here needs no demos of the wanted behaviour: the pool's own outcomes give the target.
``inf-smf`` scores each rollout's gradient by cosine to (mean success gradient - mean failure
gradient) per family; ``inf-adv`` to the group-advantage direction ``sum_i A_i g_i`` (A: the
outcome normalized within the task's rollout group, i.e. the GRPO policy-gradient direction);
``inf-less`` to a few expert demos of the target families (LESS-style). Both outcome targets are
read from the pool's own feature store, so one extraction serves every variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from trajinf.bench.agents import BUILTIN_TARGETS, AgentConfig
from trajinf.data.schema import Trajectory
from trajinf.errors import TrajinfError

# method -> what it keeps (the budget is ceil(budget * |pool|) unless said otherwise)
FLOOD_METHODS: dict[str, str] = {
    "base": "no fine-tuning: the agent as it is",
    "rs": "rejection sampling: every successful rollout (RFT / STaR / expert iteration)",
    "rs-budget": "a random budget-sized subset of the successes",
    "rs+ee": "rs-budget plus as many early-experience examples (world model + reflection, 1 "
    "alternative per state) from the states of those successes (arXiv 2510.08558)",
    "rs-short": "rejection sampling keeping only each task's shortest successes (fewest steps): "
    "drops the successes with detours, e.g. repeated actions",
    "rs-rare": "successes drawn with weight 1 / pass rate of their task (rarely solved first)",
    "rs-inf": "rejection sampling minus the quarter of the successes with the lowest inf-adv "
    "score (influence as a filter on rs, not a budget pick)",
    "rs-harm": "rejection sampling minus the successes the contrast harm flag marks (tuned on "
    "the target demos; trajinf.job.contrast)",
    "rs*inf": "rejection sampling with per-step loss weights: 0 on the steps whose inf-adv step "
    "score is negative (the step's gradient opposes the group-advantage direction)",
    "rs*branch": "rejection sampling with per-step loss weights: 1 only on the steps with positive "
    "Tree-GRPO branch credit (a choice that led to more successes than its siblings)",
    "rs+inf": "rejection sampling with the per-task influence pick (inf-adv|succ/task's budget) "
    "counted twice: loss weight 2 on its steps, 1 on the other successes",
    "rs-oracle": "rejection sampling minus the planted (wrong-reason) successes, by their hidden "
    "label: what a perfect filter is worth (benchmark only)",
    "dapo": "DAPO group filter (drop all-success / all-fail tasks), then a random budget",
    "random": "a random budget-sized subset",
    "full": "the whole pool",
    "rds": "RDS+: highest hidden-state cosine to the target demos",
    "loss": "highest loss",
    "inf-less": "influence, target: a few expert demos of the target families (LESS-style)",
    "inf-smf": "influence, target: success minus failure of the pool's own rollouts",
    "inf-adv": "influence, target: group advantage of the pool's own rollouts",
    "inf-adv|succ": "inf-adv ranking among the successes only",
    "inf-adv|succ*rare": "successes ranked by inf-adv rank + pass-rate rank (rare, aligned first)",
    "inf-adv|succ/task": "successes, best inf-adv of every task first, then second best, ...",
    "inf-adv*gv": "inf-adv ranking with DRO group-variance step weights",
    "inf-adv*branch": "inf-adv ranking with Tree-GRPO branch-credit step weights",
}
NEEDS_SCORES = {
    m
    for m in FLOOD_METHODS
    if m.startswith("inf") or m in ("rds", "loss", "rs-inf", "rs*inf", "rs+inf", "rs-harm")
}
DEFAULT_METHODS = (
    "base", "rs", "rs-budget", "rs+ee", "rs-rare", "dapo", "random", "full", "rds", "loss",
    "inf-less", "inf-smf", "inf-adv", "inf-adv|succ", "inf-adv|succ*rare", "inf-adv|succ/task",
    "inf-adv*branch",
)  # fmt: skip


@dataclass
class FloodConfig:
    """One environment's flood benchmark."""

    env: str = "builtin"
    agent: AgentConfig = field(default_factory=AgentConfig)
    n_train_tasks: int = 24  # tasks drawn (target families kept) the flood is sampled on
    k: int = 8  # rollouts per task
    temperature: float = 1.0
    n_experts: int = 0  # expert demos in the pool (kept < 10 % of it)
    # successes for the wrong reason: planted-harmful rollouts (the family's wrong rule at its
    # decision point) added to each round's flood, labelled successful like a buggy verifier
    # would, source "self"; the truth stays in meta["planted"]
    planted: int = 0
    # reward of a self rollout = its outcome - length_penalty * its steps (success stays the
    # outcome): groups whose rollouts all succeed then rank their successes by length, so the
    # outcome targets (advantage, branch credit) see detours; 0 = the outcome alone
    length_penalty: float = 0.0
    # replay against forgetting: every fine-tune also sees replay x len(pick) of the expert demos
    # the base agent was built from (its own SFT data, drawn per round), as practitioners mix
    # SFT data into RFT rounds; 0 = the pick alone
    replay: float = 0.0
    n_target_demos: int = 2  # expert demos per target family (inf-less / RDS+ target)
    n_test_tasks: int = 40  # test tasks drawn (target families kept)
    budget: float = 0.1
    finetune_steps: int = 20
    finetune_lr: float = 5e-3
    rounds: int = 3
    seeds: int = 3
    proj_dim: int = 512
    methods: tuple[str, ...] = DEFAULT_METHODS
    # methods that go on past round 1 (None: all); the others are measured after round 1 only
    later_methods: tuple[str, ...] | None = None
    seed: int = 0

    @property
    def needs_harm(self) -> bool:
        """Whether the scoring runs the job's harm step: only ``rs-harm`` reads its flag."""
        return "rs-harm" in self.methods

    def rounds_of(self, method: str) -> int:
        keep = self.later_methods is None or method in self.later_methods
        return self.rounds if keep else 1

    def __post_init__(self) -> None:
        bad = [m for m in (*self.methods, *(self.later_methods or ())) if m not in FLOOD_METHODS]
        if bad:
            raise TrajinfError(f"flood: unknown method(s) {bad}; known: {sorted(FLOOD_METHODS)}")
        if self.k < 2:
            raise TrajinfError(f"flood field 'k': groups need >= 2 rollouts per task, got {self.k}")
        if self.temperature <= 0:
            raise TrajinfError(f"flood field 'temperature': must be > 0, got {self.temperature}")
        if self.replay < 0:
            raise TrajinfError(f"flood field 'replay': must be >= 0, got {self.replay}")
        if self.rounds < 1 or self.seeds < 1:
            raise TrajinfError("flood fields 'rounds' and 'seeds' must be >= 1")


def flood_tasks(env, config: FloodConfig, families: Sequence[str]) -> tuple[list, list, list]:
    """(train tasks the flood is sampled on, test tasks, tasks of the target demos): target
    families only, drawn with seeds apart from the agent's own demo tasks."""
    fams = set(families)
    train = [
        t for t in env.tasks("train", config.n_train_tasks, 31 + config.seed) if t.family in fams
    ]
    demo_pool = [t for t in env.tasks("train", 64, 977 + config.seed) if t.family in fams]
    demos: list = []
    for f in sorted(fams):
        demos += [t for t in demo_pool if t.family == f][: config.n_target_demos]
    test = [t for t in env.tasks("test", config.n_test_tasks, config.seed) if t.family in fams]
    if not train or not test:
        raise TrajinfError(f"flood: no train or test task of the target families {sorted(fams)}")
    return train, test, demos


def roll_flood(
    env, model, tok, tasks, *, k: int, temperature: float, seed: int, prefix: str,
    length_penalty: float = 0.0,
) -> list[Trajectory]:  # fmt: skip
    """``k`` sampled rollouts of the model on each task (ids ``{prefix}-{task}-{i}``); with a
    ``length_penalty`` each one's reward is its success (0/1) minus the penalty per step."""
    from trajinf.envs.model_policy import ModelPolicy
    from trajinf.envs.rollout import rollout

    policy = ModelPolicy(model, tok, mode="rank", temperature=temperature, seed=seed)
    out = rollout(
        env, tasks, policy, source="self", n_per_task=k, seed=seed, id_prefix=prefix,
        with_tools=False,
    )  # fmt: skip
    if length_penalty:
        for t in out:
            t.meta["env_reward"] = t.reward
            t.reward = float(bool(t.success)) - length_penalty * len(t.steps())
    return out


def evaluate_tasks(env, model, tok, tasks) -> dict[str, bool]:
    """Greedy rank-mode success of the model on each task: {task id: success}."""
    from trajinf.envs.model_policy import ModelPolicy
    from trajinf.envs.rollout import rollout

    policy = ModelPolicy(model, tok, mode="rank", temperature=0.0)
    trajs = rollout(env, tasks, policy, source="eval", seed=0, with_tools=False)
    return {str(t.task_id): bool(t.success) for t in trajs}


def pass_rates(pool: Sequence[Trajectory]) -> dict[str, float]:
    """Share of successful rollouts per task id (self rollouts only)."""
    n: dict[str, int] = {}
    w: dict[str, int] = {}
    for t in pool:
        if t.source != "self":
            continue
        key = str(t.task_id)
        n[key] = n.get(key, 0) + 1
        w[key] = w.get(key, 0) + bool(t.success)
    return {key: w[key] / n[key] for key in n}


def flood_summary(pool: Sequence[Trajectory]) -> dict:
    """Size, self share, success rate and group structure of a flood pool."""
    rates = pass_rates(pool)
    n_self = sum(t.source == "self" for t in pool)
    return {
        "n": len(pool),
        "self_share": n_self / max(1, len(pool)),
        "success_rate": sum(bool(t.success) for t in pool if t.source == "self") / max(1, n_self),
        "tasks": len(rates),
        "tasks_mixed": sum(0 < r < 1 for r in rates.values()),
        "tasks_all_fail": sum(r == 0 for r in rates.values()),
        "tasks_all_success": sum(r == 1 for r in rates.values()),
    }


@dataclass
class FloodScores:
    """Score tables of one flood pool: influence per target mode, baseline statistics."""

    scores: dict[str, pd.DataFrame]  # "less" | "smf" | "adv" -> id, score
    steps: dict[str, pd.DataFrame]  # same keys -> id, step, score
    statistics: pd.DataFrame | None
    seconds: float


def score_flood(
    model_dir: Path, pool: Sequence[Trajectory], demos: Sequence[Trajectory], out: Path, *,
    proj_dim: int, seed: int, modes: Sequence[str] = ("less", "smf", "adv"), harm: bool = True,
) -> FloodScores:  # fmt: skip
    """One extraction of the pool (and the demos) with the agent at ``model_dir``; influence
    against the demos (``less``) and against the pool's own outcomes (``smf``, ``adv``, read
    back from the pool store), plus RDS+ / loss statistics. ``harm``: run the job's harm step
    (the contrast flag, a few short tunings: most of the scoring's cost), which only
    ``rs-harm`` reads; without it the ``less`` table's harm columns are empty (no flag)."""
    import time

    from trajinf.job.config import build_job_config
    from trajinf.job.run import score_pool
    from trajinf.scoring.scores import score_stores
    from trajinf.selection.export import read_scores
    from trajinf.store.feature_store import FeatureStore

    t0 = time.perf_counter()
    cfg = build_job_config(
        proj_dim=proj_dim, has_checkpoints=False, subtask_field="family", seed=seed,
        max_length=None, harm_signal="contrast" if harm else "none",
    )  # fmt: skip
    score_pool(model_dir, list(pool), list(demos), out, config=cfg)
    s, st, stats = read_scores(out)
    scores, steps = {"less": s}, {"less": st}
    store = FeatureStore.open(out / "store" / "pool")
    from dataclasses import replace

    for mode, target_mode in (("smf", "success_minus_failure"), ("adv", "advantage")):
        if mode not in modes:
            continue
        sc = replace(cfg.scoring, target_mode=target_mode, subtask_column="subtask")
        try:
            res = score_stores(store, store, sc)
        except TrajinfError:  # no family with both outcomes: no direction, no ranking
            res = None
        if res is None:
            scores[mode] = s.assign(score=np.nan)[["id", "score"]]
            steps[mode] = st.assign(score=np.nan)
        else:
            scores[mode], steps[mode] = res.trajectories, res.steps
    return FloodScores(scores, steps, stats, time.perf_counter() - t0)


def _rank01(values: pd.Series) -> pd.Series:
    """Percentile rank in (0, 1], NaN lowest."""
    return values.fillna(-np.inf).rank(method="average", pct=True)


def select_flood(
    method: str,
    pool: Sequence[Trajectory],
    *,
    budget: float,
    seed: int,
    scored: FloodScores | None = None,
    env=None,
) -> tuple[list[str], dict[str, list[float]] | None, dict]:
    """(chosen ids, per-step weights or None, info) for one flood method."""
    from trajinf.selection.priors import combine_steps, step_prior
    from trajinf.selection.select import select

    rng = np.random.default_rng(seed)
    n = len(pool)
    k = max(1, math.ceil(budget * n))
    ids = np.array([t.id for t in pool], dtype=object)
    succ = np.array([bool(t.success) for t in pool])
    info: dict = {"k": k}
    if method == "base":
        return [], None, info
    if method == "full":
        return list(ids), None, info
    if method == "random":
        return list(ids[rng.permutation(n)[:k]]), None, info
    if method == "rs":
        return list(ids[succ]), None, info
    if method == "rs-oracle":
        return [t.id for t in pool if t.success and not t.meta.get("planted")], None, info
    if method == "rs-short":
        won = [t for t in pool if t.success]
        shortest: dict[str, int] = {}
        for t in won:
            shortest[str(t.task_id)] = min(shortest.get(str(t.task_id), 10**9), len(t.steps()))
        return [t.id for t in won if len(t.steps()) == shortest[str(t.task_id)]], None, info
    if method in ("rs-budget", "rs+ee"):  # rs+ee: the rounds driver adds the examples
        s = ids[succ]
        return list(s[rng.permutation(len(s))[:k]]), None, info
    if method == "rs*branch":
        return _weighted_successes(pool, step_prior("branch", list(pool), env=env), info)
    rates = pass_rates(pool)
    if method == "rs-rare":
        s = [t for t in pool if t.success]
        if not s:
            return [], None, info
        w = np.array([1.0 / max(rates.get(str(t.task_id), 1.0), 1e-9) for t in s])
        pick = rng.choice(len(s), size=min(k, len(s)), replace=False, p=w / w.sum())
        return [s[i].id for i in sorted(pick)], None, info
    if method == "dapo":
        from trajinf.selection.priors import group_filter

        kept, finfo = group_filter(pool)
        info["filter"] = finfo
        kept_arr = np.array(kept, dtype=object)
        return list(kept_arr[rng.permutation(len(kept_arr))[:k]]), None, info
    if scored is None:
        raise TrajinfError(f"flood method '{method}' needs scores")
    if method in ("rds", "loss"):
        sel = select(method, list(pool), fraction=k / n, statistics=scored.statistics, seed=seed)
        return sel.ids[:k], None, info
    if method == "rs-harm":  # the job's calibrated flag (scores of the demo-target run)
        flagged = scored.scores["less"].set_index(scored.scores["less"]["id"].astype(str))
        flagged = flagged["harmful"].reindex([str(i) for i in ids]).fillna(False).to_numpy(bool)
        info["n_flagged_successes"] = int((flagged & succ).sum())
        return list(ids[succ & ~flagged]), None, info
    if method == "rs*inf":
        st = scored.steps["adv"]
        if not np.isfinite(st["score"].to_numpy(float)).any():
            info["fallback"] = "no outcome direction (every group one outcome): rs"
            return list(ids[succ]), None, info
        return _weighted_successes(pool, st, info, positive=False)
    mode = {"inf-less": "less", "inf-smf": "smf"}.get(method, "adv")
    table = scored.scores[mode].set_index(scored.scores[mode]["id"].astype(str))["score"]
    table = table.reindex([str(i) for i in ids])
    if table.isna().all():
        if method == "rs+inf":
            info["fallback"] = "no outcome direction (every group one outcome): rs"
            return list(ids[succ]), None, info
        info["fallback"] = "no outcome direction (every group one outcome): random"
        return list(ids[rng.permutation(n)[:k]]), None, info
    rank = _rank01(table)
    if method in ("inf-less", "inf-smf", "inf-adv"):
        order = rank.sort_values(ascending=False, kind="stable").index
        return list(order[:k]), None, info
    if method == "rs-inf":  # drop the lowest-scored quarter of the successes
        r = table[succ].fillna(-np.inf).sort_values(ascending=False, kind="stable")
        keep = set(r.index[: len(r) - len(r) // 4])
        info["n_dropped_successes"] = len(r) - len(keep)
        return [i for i in map(str, ids) if i in keep], None, info
    if method in ("inf-adv|succ", "inf-adv|succ*rare"):
        r = _rank01(table[succ])  # percentile among the successes
        if method.endswith("*rare"):
            rare = pd.Series(
                [-rates.get(str(t.task_id), 1.0) for t in pool if t.success], index=r.index
            )
            r = (r + _rank01(rare)) / 2
        return list(r.sort_values(ascending=False, kind="stable").index[:k]), None, info
    if method in ("inf-adv|succ/task", "rs+inf"):
        # one pass over the tasks per position: every task's best success before any second
        s = pd.DataFrame(
            {"score": table[succ].fillna(-np.inf).to_numpy(),
             "task": [str(t.task_id) for t in pool if t.success]},
            index=table.index[succ],
        )  # fmt: skip
        s["pos"] = s.groupby("task")["score"].rank(method="first", ascending=False)
        order = s.sort_values(["pos", "score"], ascending=[True, False], kind="stable").index
        if method == "inf-adv|succ/task":
            return list(order[:k]), None, info
        twice = set(order[:k])
        won = [t for t in pool if t.success]
        info["n_weighted_twice"] = len(twice)
        weights = {t.id: [2.0 if t.id in twice else 1.0] * len(t.steps()) for t in won}
        return [t.id for t in won], weights, info
    prior = {"inf-adv*gv": "group_variance", "inf-adv*branch": "branch"}[method]
    values = step_prior(prior, list(pool), env=env)
    combined = combine_steps(scored.steps[mode], values, how="rank")
    sel = select(
        "influence", list(pool), fraction=k / n, scores=scored.scores[mode].assign(
            score=scored.scores[mode]["score"].fillna(-np.inf)
        ), step_values=combined, step_weights=True, seed=seed,
    )  # fmt: skip
    return sel.ids[:k], sel.step_weights, info


def _weighted_successes(
    pool: Sequence[Trajectory], steps: pd.DataFrame, info: dict, *, positive: bool = True
) -> tuple[list[str], dict[str, list[float]], dict]:
    """Every success with per-step weights from ``steps`` (id, step, value or score): weight 0
    on the steps with value <= 0 (``positive``) or < 0, 1 elsewhere (NaN: no evidence, 1). A
    success left with no weighted step is not picked."""
    from trajinf.selection.priors.combine import weights_from_steps

    succ = [t for t in pool if t.success]
    weights = weights_from_steps(
        steps, [t.id for t in succ], threshold=np.nextafter(0.0, 1.0) if positive else 0.0,
        n_steps={t.id: len(t.steps()) for t in succ},
    )  # fmt: skip
    ids = [t.id for t in succ if sum(weights[t.id]) > 0]
    n_steps = sum(len(w) for w in weights.values())
    info["step_weight_share"] = sum(sum(weights[i]) for i in ids) / max(1, n_steps)
    info["n_dropped_successes"] = len(succ) - len(ids)
    return ids, {i: weights[i] for i in ids}, info


# past round 1 (each round of each method samples, scores and trains anew): the practitioner's
# filters and the influence variants that keep to successes
LATER_METHODS = ("base", "rs", "rs-budget", "rs+ee", "rs-rare", "random", "inf-adv",
                 "inf-adv|succ", "inf-adv|succ*rare", "inf-adv|succ/task")  # fmt: skip


def flood_preset(env: str, *, quick: bool = False) -> FloodConfig:
    """The benchmark's flood in ``env`` ("builtin" ToolWorld or "twx"); ``quick``: CI-sized
    (ToolWorld only: a small agent, 4 tasks x 8 rollouts, 5 methods, 1 seed)."""
    if quick:
        if env != "builtin":
            raise TrajinfError("flood: the --quick slice runs on the built-in env only")
        return FloodConfig(
            env="builtin",
            agent=AgentConfig(
                target_families=BUILTIN_TARGETS,
                n_other_tasks=8,
                n_target_demos=12,
                epochs=30,
                n_eval_tasks=24,
            ),  # fmt: skip
            n_train_tasks=12,
            n_test_tasks=24,
            k=8,
            temperature=0.7,
            budget=0.25,
            finetune_steps=4,
            rounds=2,
            seeds=1,
            proj_dim=256,
            methods=("base", "rs", "rs+ee", "random", "inf-adv", "inf-adv|succ"),
        )
    if env == "builtin":
        agent = AgentConfig(
            target_families=BUILTIN_TARGETS, n_other_tasks=32, n_target_demos=24, epochs=30,
            n_eval_tasks=80,
        )  # fmt: skip
        return FloodConfig(
            env="builtin", agent=agent, n_train_tasks=32, n_test_tasks=80, seeds=5,
            later_methods=LATER_METHODS,
        )  # fmt: skip
    if env == "twx":
        agent = AgentConfig(env="twx", n_other_tasks=24, n_target_demos=3, epochs=30)
        # 32 tasks drawn (16 of the target games) and lr 1e-3: with 8 train tasks and the
        # ToolWorld lr (5e-3) every fine-tune overfit the few layouts and fell below the base
        # agent (rs 0.33 vs base 0.56); here rs keeps the base level (pilot, 2 seeds)
        return FloodConfig(env="twx", agent=agent, n_train_tasks=32, n_test_tasks=60, seeds=5,
                           finetune_lr=1e-3)  # fmt: skip
    raise TrajinfError(f"bench flood: --env '{env}' not known (builtin, twx, all)")
