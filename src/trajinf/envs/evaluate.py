"""Evaluation: env success rate of a policy (with Wilson intervals) and AUROC for detection metrics."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import rankdata

from trajinf.errors import TrajinfError


@dataclass
class EvalResult:
    """Success of a policy on a set of env tasks. ``asdict``-able (plain floats/ints/dicts)."""

    success_rate: float  # fraction of episodes that succeeded
    ci_low: float  # 95% Wilson interval of the success rate
    ci_high: float
    n_episodes: int
    seed: int
    mean_steps: float  # mean number of agent steps per episode
    per_family: dict[str, float] = field(default_factory=dict)  # family -> success rate
    per_family_n: dict[str, int] = field(default_factory=dict)  # family -> episodes
    split: str = "test"

    def to_dict(self) -> dict:
        """Plain-JSON dict."""
        return asdict(self)


def success_rate_ci(successes: int, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (default 95%); (0, 1) when ``n == 0``.

    Wilson instead of the normal approximation because evaluations are small and rates often sit
    near 0 or 1, where the normal interval collapses to a point.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"success_rate_ci: successes={successes} outside [0, n={n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` [N] for binary ``labels`` [N] (True = positive).

    Rank-based (Mann-Whitney U with average ranks), so tied scores count one half. Returns NaN when
    one class is empty (the AUROC is undefined).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("auroc: scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties, 1-based
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def summarize_episodes(trajectories: Sequence, *, seed: int = 0, split: str = "test") -> EvalResult:
    """EvalResult from finished rollouts (``Trajectory`` with ``success`` and ``meta['family']``)."""
    n = len(trajectories)
    wins = sum(bool(t.success) for t in trajectories)
    fam_n: dict[str, int] = defaultdict(int)
    fam_w: dict[str, int] = defaultdict(int)
    steps = []
    for t in trajectories:
        fam = str(t.meta.get("family", t.task_id or "all"))
        fam_n[fam] += 1
        fam_w[fam] += bool(t.success)
        steps.append(sum(m.get("role") == "assistant" for m in t.messages))
    lo, hi = success_rate_ci(wins, n)
    return EvalResult(
        success_rate=wins / n if n else 0.0,
        ci_low=lo,
        ci_high=hi,
        n_episodes=n,
        seed=seed,
        mean_steps=float(np.mean(steps)) if steps else 0.0,
        per_family={f: fam_w[f] / fam_n[f] for f in sorted(fam_n)},
        per_family_n={f: fam_n[f] for f in sorted(fam_n)},
        split=split,
    )


def eval_tasks(env, split: str, n_tasks: int, seed: int, families: Sequence[str] | None) -> list:
    """``n_tasks`` tasks of ``split`` drawn with ``seed``, then only those of ``families``."""
    tasks = env.tasks(split, n_tasks, seed)
    if families is None:
        return tasks
    wanted = set(families)
    tasks = [t for t in tasks if t.family in wanted]
    if not tasks:
        raise TrajinfError(f"evaluation field 'families': no {split} task in {sorted(wanted)}")
    return tasks


def evaluate_policy(
    env,
    policy,
    *,
    split: str = "test",
    n_tasks: int = 100,
    seed: int = 0,
    families: Sequence[str] | None = None,
    **rollout_kwargs,
) -> EvalResult:
    """Success rate of ``policy`` on ``n_tasks`` tasks of ``env``'s ``split`` (drawn with ``seed``).

    ``families`` keeps only tasks of those families (the count drawn is still ``n_tasks``, before
    filtering). Extra keyword arguments go to ``rollout.rollout`` (e.g. ``max_steps``).
    """
    from trajinf.envs.rollout import rollout

    tasks = eval_tasks(env, split, n_tasks, seed, families)
    rollout_kwargs.setdefault("source", "eval")
    trajectories = rollout(env, tasks, policy, seed=seed, **rollout_kwargs)
    return summarize_episodes(trajectories, seed=seed, split=split)


class ExpertAgreementPolicy:
    """Acts as the expert, and records whether ``policy`` would have chosen the expert's action.

    Success needs every step of an episode right, so a weak agent scores 0 whatever it learned;
    agreement with the expert in the expert's own states is the dense per-step counterpart.
    """

    def __init__(self, policy) -> None:
        self.policy = policy
        self.hits = 0
        self.total = 0

    def act(self, episodes: list) -> list[str]:
        """The expert's action per episode; counts the wrapped policy's agreement with it."""
        from trajinf.envs.base import normalize_action
        from trajinf.envs.policies import expert_action

        choices = self.policy.act(episodes)
        out = []
        for ep, choice in zip(episodes, choices, strict=True):
            expert = expert_action(ep)
            self.total += 1
            self.hits += int(normalize_action(choice) == normalize_action(expert))
            out.append(expert)
        return out


def expert_step_agreement(
    env,
    policy,
    *,
    split: str = "test",
    n_tasks: int = 100,
    seed: int = 0,
    families: Sequence[str] | None = None,
    **rollout_kwargs,
) -> float:
    """Fraction of expert states in which ``policy`` picks the expert's action (teacher-forced)."""
    from trajinf.envs.rollout import rollout

    tasks = eval_tasks(env, split, n_tasks, seed, families)
    probe = ExpertAgreementPolicy(policy)
    rollout_kwargs.setdefault("source", "eval")
    rollout(env, tasks, probe, seed=seed, **rollout_kwargs)
    return probe.hits / max(1, probe.total)
