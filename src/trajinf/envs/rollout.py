"""Run a policy in a text env and record each episode as a ``Trajectory``.

Episodes run in lockstep batches: at every step ``policy.act`` is called ONCE with all live
episodes of the batch (a model policy scores them in one forward pass). Each episode gets its own
env instance (``env.fork()``) and its own seeded ``random.Random``, so a trajectory does not
depend on batch size or on which other episodes ran beside it.

Messages follow the trajectory contract: system prompt, the first observation (goal included) as
a user message, then per step the assistant action (``env.action_to_message``) and its
consequence: a ``tool`` message answering the call id, or a ``user`` message when the action is
plain content (envs without a tool schema, or unparseable model output).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from trajinf.data.schema import Trajectory
from trajinf.data.trajectories import trajectory_from_messages
from trajinf.envs.base import Task, TextEnv
from trajinf.errors import TrajinfError

SYSTEM_PROMPT_TOOLS = (
    "You act in a text world to reach the goal. Call exactly one tool per turn; "
    "the tool result tells you what happened."
)
SYSTEM_PROMPT_TEXT = (
    "You act in a text world to reach the goal. Reply with exactly one action per turn, "
    "e.g. 'take coin'; the next message tells you what happened."
)
DEFAULT_MAX_STEPS = 30


@dataclass
class EpisodeState:
    """Everything a policy may look at for one live episode.

    ``messages`` is the OpenAI chat so far (system, first observation as user, then actions and
    their consequences); ``tools`` the OpenAI tool schemas to pass to a chat template (None for
    plain-text envs); ``valid_actions`` the env's current list (None if the env has none).
    ``meta`` is copied into the trajectory's meta (policies note e.g. their noisy steps there);
    ``notes`` is private policy scratch space (not recorded). A policy sets ``stop`` to end the
    episode right after the action it is returning.
    """

    env: TextEnv
    task: Task
    k: int
    messages: list[dict]
    tools: list[dict] | None
    valid_actions: list[str] | None
    rng: random.Random
    step: int = 0
    observation: str = ""
    actions: list[str] = field(default_factory=list)
    done: bool = False
    success: bool = False
    reward: float = 0.0
    info: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    stop: bool = False


class Policy(Protocol):
    """Anything that picks one action per live episode, batched across episodes."""

    def act(self, episodes: list[EpisodeState]) -> list[str]: ...


def rollout(
    env: TextEnv,
    tasks: Sequence[Task],
    policy: Policy,
    *,
    source: str,
    n_per_task: int = 1,
    max_steps: int | None = None,
    seed: int = 0,
    id_prefix: str | None = None,
    batch_size: int | None = None,
    system_prompt: str | None = None,
    with_tools: bool = True,
) -> list[Trajectory]:
    """Run ``n_per_task`` episodes of every task with ``policy``; one Trajectory per episode.

    Ids are ``{id_prefix or source}-{task.id}-{k}`` (k = 0..n_per_task-1), in task order.
    ``max_steps`` caps every episode (default: the task's ``data["max_steps"]``, else 30).
    ``batch_size`` bounds the episodes run together (default ``env.max_batch`` or 64; 1 when the
    env cannot ``fork``). A policy with ``relabel_success = True`` (PlantedHarmfulPolicy) gets
    success=True / reward=1.0 with the true outcome kept in ``meta["true_success"]``,
    ``meta["true_reward"]`` and ``meta["planted"] = True``. ``with_tools=False`` leaves the tool
    schemas out of the prompt and the trajectory (``tools=None``; the tool calls stay): chat
    templates render schemas as JSON, which more than doubles a ToolWorld trajectory's tokens.
    """
    if n_per_task < 1:
        raise TrajinfError(f"rollout field 'n_per_task': must be >= 1, got {n_per_task}")
    episodes = [(task, k) for task in tasks for k in range(n_per_task)]
    if not episodes:
        return []
    can_fork = callable(getattr(env, "fork", None))
    size = batch_size or getattr(env, "max_batch", 64)
    size = max(1, min(size if can_fork else 1, len(episodes)))
    pool: list[TextEnv] = [env] + [env.fork() for _ in range(size - 1)]  # type: ignore[attr-defined]
    prefix = id_prefix or source
    # run grouped by family (stable), return in task order: envs that reload per family (TWX)
    # switch less, and no episode depends on its neighbours, so the order changes nothing else
    order = sorted(range(len(episodes)), key=lambda i: episodes[i][0].family)
    out: list[Trajectory | None] = [None] * len(episodes)
    try:
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            states = [
                _start(pool[b], *episodes[i], seed, system_prompt, with_tools)
                for b, i in enumerate(batch)
            ]
            _run_batch(states, policy, max_steps)
            for i, st in zip(batch, states, strict=True):
                out[i] = _to_trajectory(st, policy, source, prefix)
    finally:
        for extra in pool[1:]:
            close = getattr(extra, "close", None)
            if callable(close):
                close()
    return [t for t in out if t is not None]


def _start(
    env: TextEnv, task: Task, k: int, seed: int, system_prompt: str | None, with_tools: bool
) -> EpisodeState:
    obs = env.reset(task)
    tools_for = getattr(env, "tools_for", None)
    tools = tools_for(task) if callable(tools_for) else env.tool_schema
    calls = env.tool_schema is not None  # the env answers actions as tool calls
    prompt = system_prompt or (SYSTEM_PROMPT_TOOLS if calls else SYSTEM_PROMPT_TEXT)
    tools = tools if with_tools else None
    return EpisodeState(
        env=env,
        task=task,
        k=k,
        messages=[{"role": "system", "content": prompt}, {"role": "user", "content": obs}],
        tools=tools,
        valid_actions=env.valid_actions(),
        rng=random.Random(f"{seed}/{task.id}/{k}"),  # str seeds hash stably across processes
        observation=obs,
    )


def _run_batch(states: list[EpisodeState], policy: Policy, max_steps: int | None) -> None:
    while True:
        live = [st for st in states if not st.done]
        if not live:
            return
        actions = policy.act(live)
        if len(actions) != len(live):
            raise TrajinfError(
                f"policy {type(policy).__name__}.act returned {len(actions)} actions for {len(live)} episodes"
            )
        for st, action in zip(live, actions, strict=True):
            _advance(st, str(action), max_steps)


def _advance(st: EpisodeState, action: str, max_steps: int | None) -> None:
    message = st.env.action_to_message(action)
    obs, reward, done, info = st.env.step(action)
    st.messages.append(message)
    calls = message.get("tool_calls") or []
    if calls:
        st.messages.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": obs})
    else:
        st.messages.append({"role": "user", "content": obs})
    st.actions.append(action)
    if not info.get("valid", True):
        st.meta.setdefault("invalid_steps", []).append(st.step)
    if info.get("doomed") and "doom_step" not in st.meta:
        st.meta["doom_step"] = st.step  # first step after which the task was unsolvable
    st.step += 1
    st.reward += float(reward)
    st.observation, st.info = obs, info
    st.success = bool(info.get("success", False))
    limit = max_steps or st.task.data.get("max_steps", DEFAULT_MAX_STEPS)
    if not done and st.step >= limit:
        done, st.meta["truncated"] = True, True
    done = done or st.stop
    if info.get("truncated"):  # the env's own step limit
        st.meta["truncated"] = True
    st.done = bool(done)
    st.valid_actions = None if st.done else info.get("valid_actions", st.env.valid_actions())


def _to_trajectory(st: EpisodeState, policy: Policy, source: str, prefix: str) -> Trajectory:
    meta = {
        "family": st.task.family,
        "env": getattr(st.env, "name", type(st.env).__name__),
        "policy": getattr(policy, "name", type(policy).__name__),
        "split": st.task.split,
        "task_seed": st.task.seed,
        "k": st.k,
        "n_steps": st.step,
        **st.meta,
    }
    success, reward = st.success, st.reward
    if getattr(policy, "relabel_success", False) and not st.notes.get("not_planted"):
        meta.update(planted=True, true_success=success, true_reward=reward)
        success, reward = True, 1.0
    return trajectory_from_messages(  # validates: call ids, roles, contents
        st.messages,
        id=f"{prefix}-{st.task.id}-{st.k}",
        task_id=st.task.id,
        source=source,
        success=success,
        reward=reward,
        tools=st.tools,
        meta=meta,
    )
