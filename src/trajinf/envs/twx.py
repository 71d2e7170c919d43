"""TextWorld Express adapter (``textworld_express``, a Java simulator behind py4j).

Games are the task families. Each instance owns one JVM (``close()`` it; ``fork()`` starts
another). Actions are plain text: ``tool_schema`` is None and an action is the assistant
message's content. Differences from ToolWorld, by design of the simulator:

- ``expert(task)`` is the simulator's gold path, recorded when ``tasks()`` drew the task. It does
  not re-plan: policies follow it with a pointer (see ``policies.expert_action``).
- ``tasks()`` and ``reset()`` share the JVM: call ``tasks()`` between episodes, not during one.
- Split "train"/"dev"/"test" maps to the simulator's game folds, whose seed sets are disjoint.
- ``max_valid_actions`` caps the listed actions by a deterministic random sample seeded by
  (task id, step) that never looks at the gold path, so the cap cannot leak the expert's choice
  (the gold action may then be missing from the list; ``step`` still accepts it).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Sequence

from trajinf.envs.base import Task
from trajinf.errors import EnvUnavailableError, TrajinfError

# gameParams chosen for short gold paths (3-7 actions) and short observations
TWX_GAMES: dict[str, str] = {
    "coin": "numLocations=2,numDistractorItems=0,includeDoors=0",
    "mapreader": "numLocations=3,maxDistanceApart=2,includeDoors=0,maxDistractorItemsPerLocation=0",
    "arithmetic": "",
    "twc": "numLocations=1,numItemsToPutAway=1,includeDoors=0",
    "sorting": "",
    "peckingorder": "",
    "cookingworld": (
        "numLocations=1,numIngredients=1,numDistractorItems=0,includeDoors=0,limitInventorySize=0"
    ),
}
DEFAULT_GAMES = ("coin", "mapreader", "arithmetic", "twc")
FOLDS = {"train": "train", "dev": "dev", "test": "test"}
JAVA_HINT = "apt-get install -y openjdk-17-jre-headless"


def _clean(action: str) -> str:
    """Single-spaced, stripped. NOT lower-cased: the simulator's parser is case-sensitive
    ("take TV remote control")."""
    return " ".join(action.split())


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (TextWorld Express needs one)."""
    return shutil.which("java") is not None


class TwxEnv:
    """TextWorld Express games as a ``TextEnv`` (name "twx")."""

    name = "twx"
    tool_schema = None
    # rollout forks up to max_batch instances, each a JVM (~1 s start, ~0.3 s per game load):
    # serial is fastest for scripted policies; pass rollout(batch_size=...) for model policies
    max_batch = 1

    def __init__(
        self,
        games: list[str] | tuple[str, ...] = DEFAULT_GAMES,
        *,
        params: dict[str, str] | None = None,
        slack: int = 6,
        max_valid_actions: int | None = None,
    ) -> None:
        if not java_available():
            raise EnvUnavailableError(f"TextWorld Express needs Java (none on PATH): {JAVA_HINT}")
        try:
            from textworld_express import TextWorldExpressEnv
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise EnvUnavailableError(
                "TextWorld Express missing: pip install textworld-express"
            ) from exc
        self.games = tuple(games)
        self.params = {g: (params or {}).get(g, TWX_GAMES.get(g, "")) for g in self.games}
        for g in self.games:
            if g not in TWX_GAMES and g not in (params or {}):
                raise TrajinfError(
                    f"twx field 'games': unknown game {g!r}; known: {', '.join(TWX_GAMES)}"
                )
        self.slack, self.max_valid_actions = slack, max_valid_actions
        # the simulator's own step limit is set high; episodes end at the task's max_steps here
        self._env = TextWorldExpressEnv(envStepLimit=10_000)
        self._closed = False
        self._loaded: tuple[str, str] | None = None
        self._seeds: dict[tuple[str, str], Sequence[int]] = {}
        self._task: Task | None = None
        self._steps, self._done, self._all_valid = 0, False, []

    def fork(self) -> TwxEnv:
        """A new instance (its own JVM) with the same configuration."""
        return TwxEnv(
            self.games,
            params=self.params,
            slack=self.slack,
            max_valid_actions=self.max_valid_actions,
        )

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        """``n`` tasks, games round robin, simulator seeds drawn from the split's fold."""
        if split not in FOLDS:
            raise TrajinfError(
                f"twx.tasks field 'split': expected one of {tuple(FOLDS)}, got {split!r}"
            )
        fold, rng, draws, used = FOLDS[split], random.Random(f"twx-{split}-{seed}"), [], set()
        for i in range(n):
            game = self.games[i % len(self.games)]
            seeds = self._fold_seeds(game, fold)
            s = rng.choice(seeds)
            while (game, s) in used and len(used) < len(seeds) * len(self.games):
                s = rng.choice(seeds)
            used.add((game, s))
            draws.append((game, s))
        out: list[Task | None] = [None] * n
        # generate grouped by game: every game switch reloads the simulator (~0.3 s)
        for i in sorted(range(n), key=lambda j: self.games.index(draws[j][0])):
            game, s = draws[i]
            self._load(game)
            _, infos = self._env.reset(seed=s, gameFold=fold, generateGoldPath=True)
            gold = [_clean(a) for a in self._env.getGoldActionSequence()]
            data = {
                "game": game,
                "params": self.params[game],
                "fold": fold,
                "gold": gold,
                "max_steps": len(gold) + self.slack,
            }
            out[i] = Task(
                id=f"{game}-{s}",
                family=game,
                split=split,
                seed=s,
                goal=infos["taskDescription"].strip(),
                data=data,
            )
        self._task = None  # the draws above replaced any live episode
        return [t for t in out if t is not None]

    def make_task(self, game: str, seed: int, split: str = "train") -> Task:
        """The task of ``game`` with simulator ``seed`` in ``split``'s fold (what ``tasks``
        draws), e.g. to rebuild a recorded trajectory's task from its meta."""
        if split not in FOLDS:
            raise TrajinfError(f"twx.make_task field 'split': expected one of {tuple(FOLDS)}")
        if game not in self.games:
            raise TrajinfError(f"twx.make_task field 'game': {game!r} not in {self.games}")
        self._load(game)
        _, infos = self._env.reset(seed=seed, gameFold=FOLDS[split], generateGoldPath=True)
        gold = [_clean(a) for a in self._env.getGoldActionSequence()]
        data = {"game": game, "params": self.params[game], "fold": FOLDS[split], "gold": gold,
                "max_steps": len(gold) + self.slack}  # fmt: skip
        self._task = None  # the reset above replaced any live episode
        return Task(id=f"{game}-{seed}", family=game, split=split, seed=seed,
                    goal=infos["taskDescription"].strip(), data=data)  # fmt: skip

    def reset(self, task: Task) -> str:
        """Start ``task``: the first observation is the task description plus the room."""
        self._load(task.data["game"], task.data.get("params"))
        obs, infos = self._env.reset(
            seed=task.seed, gameFold=task.data["fold"], generateGoldPath=False
        )
        self._task, self._steps, self._done = task, 0, False
        self._all_valid = sorted(_clean(a) for a in infos["validActions"])
        return f"{task.goal}\n{obs.strip()}"

    def valid_actions(self) -> list[str] | None:
        """Sorted valid actions (capped per ``max_valid_actions``); None before ``reset``."""
        if self._task is None or self._done:
            return None
        cap = self.max_valid_actions
        if cap is None or len(self._all_valid) <= cap:
            return list(self._all_valid)
        rng = random.Random(f"{self._task.id}/{self._steps}")  # never looks at the gold path
        return sorted(rng.sample(self._all_valid, cap))

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """Apply ``action``. info: success, valid, doomed (simulator task failure), truncated,
        score, valid_actions. Reward is the simulator's score delta."""
        if self._task is None:
            raise TrajinfError("twx: no episode; call reset(task) first")
        if self._done:
            raise TrajinfError(
                f"twx: step() after the episode of {self._task.id} ended; reset first"
            )
        a = _clean(action)
        valid = a in self._all_valid
        if not valid:  # accept a case-insensitive match (models often lower-case names)
            folded = {x.lower(): x for x in self._all_valid}
            a = folded.get(a.lower(), a)
            valid = a in self._all_valid
        obs, reward, done, infos = self._env.step(a)
        self._steps += 1
        self._all_valid = sorted(_clean(x) for x in infos["validActions"])
        truncated = not done and self._steps >= self._task.data["max_steps"]
        self._done = bool(done or truncated)
        info = {
            "success": bool(infos["tasksuccess"]),
            "valid": valid,
            "doomed": bool(infos["taskfailure"]),
            "truncated": truncated,
            "score": float(infos["score"]),
            "valid_actions": self.valid_actions() or [],
        }
        return obs.strip(), float(reward), self._done, info

    def expert(self, task: Task) -> list[str]:
        """The simulator's gold action sequence for ``task`` (fixed; not re-planned)."""
        return list(task.data["gold"])

    def action_to_message(self, action: str) -> dict:
        """Plain-text assistant message (no tool schema)."""
        return {"role": "assistant", "content": action}

    def message_to_action(self, message: dict) -> str:
        """The action in an assistant message's content (the tool call's name, spaces for
        underscores, if a model emitted a call anyway)."""
        calls = message.get("tool_calls") or []
        if calls and not (message.get("content") or "").strip():
            fn = calls[0].get("function", {})
            return _clean(str(fn.get("name", "")).replace("_", " "))
        return _clean(str(message.get("content") or ""))

    def close(self) -> None:
        """Shut the JVM down (idempotent)."""
        if not self._closed:
            self._closed = True
            self._env.close()
            self._env.close = lambda: None  # its __del__ closes again; once is enough

    def __enter__(self) -> TwxEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self, game: str, params: str | None = None) -> None:
        params = self.params.get(game, "") if params is None else params
        if self._loaded != (game, params):
            try:
                self._env.load(game, params)
            except ValueError as exc:
                raise TrajinfError(f"twx game {game!r} params {params!r}: {exc}") from exc
            self._loaded = (game, params)

    def _fold_seeds(self, game: str, fold: str) -> Sequence[int]:
        key = (game, fold)
        if key not in self._seeds:
            self._load(game)
            server = self._env.server
            get = {
                "train": server.getSeedsTrain,
                "dev": server.getSeedsDev,
                "test": server.getSeedsTest,
            }[fold]
            seeds = get()
            n, first = int(seeds.size()), int(seeds.get(0))
            # folds are contiguous ranges; copying 1000 ints over py4j one by one takes ~1 s
            contiguous = int(seeds.get(n - 1)) == first + n - 1
            self._seeds[key] = (
                range(first, first + n) if contiguous else sorted(int(x) for x in seeds)
            )
        return self._seeds[key]
