"""``trajinf bench``: does selecting by influence win, and which trajectories does it find?

Per environment: build the base agent, warmup checkpoints and the scenarios' pools once
(``scenarios.py``); score each scenario with the scoring variants its methods need
(``methods.py``); measure detection (planted-harmful AUROC, bad-step localization) and LDS
(``metrics.py``) without retraining; then retrain the same base agent on every method's selection
for every (budget, seed) *cell* and evaluate it on held-out target tasks. Every method gets the
same optimizer steps, seeds and evaluation. Cells are appended to ``cells.jsonl`` as they finish,
so an interrupted run resumes where it stopped; ``bench.json`` and ``bench.html`` are rewritten
at the end of each environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from trajinf.bench.agents import BUILTIN_TARGETS
from trajinf.bench.methods import BENCH_METHODS
from trajinf.bench.scenarios import SCENARIOS
from trajinf.errors import TrajinfError
from trajinf.loop.demo import DemoConfig
from trajinf.loop.steps import n_tasks_drawn

# scenario -> (methods at the headline budget, methods also run at every other budget)
FULL_GRID: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mixed": (
        (
            "inf",
            "inf-less",
            "inf-noprec",
            "inf-inner",
            "inf-inner-sum",
            "inf-meanrm",
            "inf-lora",
            "inf-sparse",
            "inf-kfac",
            "inf-kfac-cos",
            "inf+stepw",
            "inf-losssplit+stepw",
            "inf+zerovar",
            "inf-drop-harmful",
            "prior:branch",
            "prior:group_variance",
            "prior:expert_aligned",
            "prior:tool_call",
            "inf*branch",
            "inf*expert_aligned",
            "random",
            "task-random",
            "full",
            "success",
            "task-success",
            "rds",
            "loss",
            "gradnorm",
            "length",
        ),
        ("inf", "random", "success", "rds"),
    ),
    "flood": (
        (
            "inf",
            "inf+zerovar",
            "prior:branch",
            "prior:group_variance",
            "inf*branch",
            "random",
            "full",
            "success",
            "rds",
        ),
        ("inf", "random"),
    ),
    "outcome": (("inf", "inf-adv", "random", "full", "success", "rds"), ()),
    "early": (("inf", "inf-noee", "inf+allee", "inf+selee", "random", "full"), ()),
}
# the built-in env's tiny agent rarely finishes a task: a smaller grid, detection is its strength
SMALL_GRID: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mixed": (
        (
            "inf",
            "inf-drop-harmful",
            "inf+stepw",
            "prior:expert_aligned",
            "inf*expert_aligned",
            "random",
            "task-random",
            "full",
            "success",
            "task-success",
            "rds",
        ),
        (),
    ),
    "flood": (("inf", "random", "full"), ()),
    "outcome": (("inf", "random", "full"), ()),
    "early": (("inf-noee", "inf+allee", "inf+selee"), ()),
}
QUICK_GRID: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mixed": (("inf", "inf+stepw", "inf*expert_aligned", "random", "full", "rds"), ()),
    "flood": (("inf", "prior:branch", "random"), ()),
    "outcome": (("inf", "inf-adv", "random"), ()),
    "early": (("inf-noee", "inf+allee", "inf+selee"), ()),
}
# issue 13 (harm detection and repair): the mixed pool only; keep / drop / repair side by side
HARM_GRID: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mixed": (
        (
            "inf",
            "inf+drop-harm",
            "inf+repair",
            "inf+repair-inplace",
            "inf+drop-logprob",
            "inf+drop-oracle",
            "inf+repair-oracle",
            "inf-kfac-cos",
        ),
        (),
    ),  # fmt: skip
}


@dataclass
class EnvPlan:
    """What to run in one environment."""

    env: str
    demo: dict  # DemoConfig overrides
    grid: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    seeds: int = 3
    flood_per_task: int = 4
    flood_experts: int = 8
    early_experts: int = 12  # expert demos branched into early-experience examples
    early_k: int = 1  # alternatives tried per expert state
    lds_models: int = 0  # subset models for LDS (0: skip)
    seed: int = 0

    def demo_config(self) -> DemoConfig:
        """The DemoConfig the base agent, pool and warmup are built with."""
        return DemoConfig(**{"env": self.env, **self.demo})

    def demo_config_dict(self) -> dict:
        """JSON-able identity of the built data (reuse key)."""
        demo = asdict(self.demo_config())
        if demo.get("base_families") is None:  # the default draws as before the field existed
            demo.pop("base_families", None)
        return {
            **demo,
            "flood_per_task": self.flood_per_task,
            "flood_experts": self.flood_experts,
            "planted": "gold-path-v1",  # TWX planted demos joined the mixed pool (issue 13)
        }

    def n_tasks_drawn(self, env) -> int:
        """How many train tasks ``build_demo_data`` draws (to find the pool's tasks again)."""
        return n_tasks_drawn(env, self.demo_config())


@dataclass
class BenchConfig:
    """The whole benchmark: environments, scenarios, budgets."""

    plans: list[EnvPlan]
    scenarios: tuple[str, ...] = SCENARIOS
    budgets: tuple[float, ...] = (0.05, 0.1, 0.25)
    headline: float = 0.1
    proj_dim: int = 2048
    workers: int = 1  # processes for the retrain + eval cells
    is_quick: bool = False

    @classmethod
    def full(cls) -> BenchConfig:
        """TWX (the full grid, 3 seeds, LDS with 32 subset models) and ToolWorld (small grid)."""
        twx = DemoConfig.default()
        twx_demo = {
            k: getattr(twx, k)
            for k in ("seeds", "n_train_tasks", "n_test_tasks", "n_base_tasks", "self_per_task")
        }
        twx_demo["finetune_steps"] = twx.finetune_steps
        builtin = {"n_train_tasks": 60, "n_test_tasks": 40, "n_base_tasks": 30, "base_epochs": 8}
        builtin["finetune_steps"] = 40
        return cls(
            plans=[
                EnvPlan("twx", twx_demo, FULL_GRID, seeds=3, lds_models=32),
                EnvPlan("builtin", builtin, SMALL_GRID, seeds=2, flood_per_task=3),
            ],
            workers=2,
        )

    @classmethod
    def harm(cls) -> BenchConfig:
        """Harm detection and repair (issue 13): both environments, the mixed scenario, more
        planted demos (half the plantable target-family pool tasks) and a larger target (8
        demos per target family, the flag's calibration set), 3 seeds, budget 10 %; ToolWorld
        with a base agent that succeeds part of the time on its target families."""
        full = cls.full()
        plans = []
        for p in full.plans:
            demo = {**p.demo, "planted_fraction": 0.5, "n_target_per_family": 8}
            seeds = 3
            if p.env == "builtin":  # a base agent that succeeds on its own (as the flood's):
                # trained 30 epochs on 80 demos and targeted at the families it half-learns
                # (with the full preset's 8 epochs on 30 demos it never succeeds, and what the
                # contrast signal finds is only what the tuned model can learn)
                demo.update(target_families=list(BUILTIN_TARGETS), n_base_tasks=80,
                            base_epochs=30)  # fmt: skip
            plans.append(replace(p, demo=demo, grid=HARM_GRID, seeds=seeds, lds_models=0))
        return cls(plans=plans, scenarios=("mixed",), budgets=(0.1,), headline=0.1, workers=2)

    @classmethod
    def quick(cls) -> BenchConfig:
        """CI-sized: ToolWorld, small pool, 2 seeds, one budget, LDS with 6 subset models."""
        demo = dict(
            n_train_tasks=24,
            n_test_tasks=16,
            n_base_tasks=16,
            n_target_per_family=2,
            base_epochs=4,
            finetune_steps=8,
            noisy_levels=(0.4,),
            self_per_task=1,
        )
        plan = EnvPlan("builtin", demo, QUICK_GRID, seeds=2, flood_per_task=2, flood_experts=4)
        plan.lds_models = 6
        return cls(plans=[plan], budgets=(0.2,), headline=0.2, proj_dim=512, is_quick=True)

    def with_options(
        self,
        *,
        env: str = "all",
        seeds: int | None = None,
        scenarios: str = "",
        budgets: str = "",
        workers: int | None = None,
    ) -> BenchConfig:
        """A copy narrowed by the CLI options."""
        plans = self.plans
        if env != "all":
            plans = [p for p in plans if p.env == env]
            if not plans:
                known = ", ".join(p.env for p in self.plans)
                raise TrajinfError(f"bench: --env '{env}' not in this preset ({known}, all)")
        if seeds is not None:
            if seeds < 1:
                raise TrajinfError(f"bench: --seeds must be >= 1, got {seeds}")
            plans = [replace(p, seeds=seeds) for p in plans]
        out = replace(self, plans=plans)
        if scenarios:
            names = tuple(s.strip() for s in scenarios.split(",") if s.strip())
            bad = [s for s in names if s not in SCENARIOS]
            if bad:
                raise TrajinfError(f"bench: unknown scenario(s) {bad}; choose from {SCENARIOS}")
            out = replace(out, scenarios=names)
        if budgets:
            try:
                b = tuple(float(x) for x in budgets.split(",") if x.strip())
            except ValueError as e:
                raise TrajinfError(f"bench: --budgets must be numbers, got '{budgets}'") from e
            if not b or not all(0 < x <= 1 for x in b):
                raise TrajinfError(f"bench: --budgets must lie in (0, 1], got '{budgets}'")
            out = replace(
                out, budgets=b, headline=b[len(b) // 2] if self.headline not in b else self.headline
            )
        if workers is not None:
            out = replace(out, workers=max(1, workers))
        return out


def plan_cells(plan: EnvPlan, config: BenchConfig) -> list[dict]:
    """Every (scenario, method, budget, seed) cell of ``plan`` (full pool: budget 1.0)."""
    cells = []
    for scn in config.scenarios:
        head, every = plan.grid.get(scn, ((), ()))
        for method in dict.fromkeys(head + every):
            if BENCH_METHODS[method].full:
                budgets = (1.0,)
            else:
                budgets = tuple(
                    b for b in config.budgets if b == config.headline or method in every
                )
            for b in budgets:
                for s in range(plan.seeds):
                    cells.append({"scenario": scn, "method": method, "budget": b, "seed": s})
    return cells


def cell_key(c: dict) -> str:
    return f"{c['scenario']}|{c['method']}|{c['budget']:g}|{c['seed']}"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of an append-only JSONL file (absent: none; a torn last line from a kill is
    ignored)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def read_cells(path: Path) -> dict[str, dict]:
    """Finished cells of a previous run, by ``cell_key``."""
    return {cell_key(c): c for c in read_jsonl(path)}


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row and fsync, so a finished row survives a kill."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
