"""Scripted policies for building trajectory pools: expert, noisy expert, planted-harmful, random.

All implement the rollout ``Policy`` protocol (``act(episodes) -> list[str]``) and draw
randomness only from each episode's own ``EpisodeState.rng``, so a rollout is reproducible from
its seed whatever the batch composition.

Expert actions come from ``env.next_action()`` when the env has a planner (ToolWorld: re-planned from
the current state, so the expert recovers from any harmless detour); otherwise from
``env.expert(task)`` followed in order with a per-episode pointer (TextWorld Express gold paths:
no re-planning, so a noisy detour that moves the world usually dooms the episode).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trajinf.errors import TrajinfError

if TYPE_CHECKING:
    from trajinf.envs.rollout import EpisodeState


def expert_action(ep: EpisodeState, *, wrong_rule: bool = False, advance: bool = True) -> str:
    """The expert's next action for ``ep``; ``wrong_rule`` asks the planner for the family's
    wrong rule (planner envs only); ``advance=False`` peeks at a gold-path env's next action
    without consuming it."""
    next_action = getattr(ep.env, "next_action", None)
    if callable(next_action):
        action = next_action(wrong_rule=wrong_rule)
        return action if action is not None else random_action(ep)
    if wrong_rule:
        raise TrajinfError(
            f"env {getattr(ep.env, 'name', type(ep.env).__name__)} has no planner with a wrong rule; "
            "planted demonstrations need the built-in toolworld env"
        )
    gold = ep.notes.setdefault("gold", list(ep.env.expert(ep.task)))
    pos = ep.notes.get("gold_pos", 0)
    if pos >= len(gold):
        return random_action(ep)
    if advance:
        ep.notes["gold_pos"] = pos + 1
    return gold[pos]


def random_action(ep: EpisodeState) -> str:
    """A uniformly random valid action (``ep.rng``); raises when the env lists none."""
    if not ep.valid_actions:
        raise TrajinfError(
            f"task {ep.task.id} step {ep.step}: no valid_actions to choose a random action from"
        )
    return ep.rng.choice(ep.valid_actions)


class ExpertPolicy:
    """The env's expert: re-planned from the current state when the env can plan."""

    name = "expert"

    def act(self, episodes: list[EpisodeState]) -> list[str]:
        """One expert action per episode."""
        return [expert_action(ep) for ep in episodes]


class RandomPolicy:
    """Uniform over the valid actions of each step."""

    name = "random"

    def act(self, episodes: list[EpisodeState]) -> list[str]:
        """One random valid action per episode."""
        return [random_action(ep) for ep in episodes]


class NoisyExpertPolicy:
    """An expert that errs; success falls as ``level`` rises (graded mediocrity).

    mode="inject": at every step, with probability ``level``, a random valid action instead of
    the expert's (planner envs re-plan afterwards; gold-path envs resume the gold path where
    they left it). mode="cutoff": with probability ``level`` an episode is cut at a uniform
    step of the expert's path and acts at random from there on.
    Steps where the random action differs from the expert's are listed in
    ``meta["noisy_steps"]``; the cut step in ``meta["cutoff_step"]``.
    """

    def __init__(self, level: float, *, mode: str = "inject") -> None:
        if not 0.0 <= level <= 1.0:
            raise TrajinfError(f"NoisyExpertPolicy field 'level': must be in [0, 1], got {level}")
        if mode not in ("inject", "cutoff"):
            raise TrajinfError(
                f"NoisyExpertPolicy field 'mode': 'inject' or 'cutoff', got {mode!r}"
            )
        self.level, self.mode = level, mode
        self.name = f"noisy-{mode}-{level:g}"

    def act(self, episodes: list[EpisodeState]) -> list[str]:
        """One action per episode: the expert's, or a random one."""
        return [self._act_one(ep) for ep in episodes]

    def _act_one(self, ep: EpisodeState) -> str:
        if self.mode == "cutoff":
            if "cutoff" not in ep.notes:
                horizon = max(1, len(ep.env.expert(ep.task)))
                cut = ep.rng.randrange(horizon) if ep.rng.random() < self.level else None
                ep.notes["cutoff"] = cut
                if cut is not None:
                    ep.meta["cutoff_step"] = cut
            noisy = ep.notes["cutoff"] is not None and ep.step >= ep.notes["cutoff"]
        else:
            noisy = ep.rng.random() < self.level
        if not noisy:
            return expert_action(ep)
        action, planned = random_action(ep), expert_action(ep, advance=False)
        if action == planned:
            return expert_action(ep)  # a lucky draw: consume the gold step too
        ep.meta.setdefault("noisy_steps", []).append(ep.step)
        return action


class PlantedHarmfulPolicy:
    """Plausible demonstrations that are wrong at one decision point, labelled successful.

    Planner envs (ToolWorld): the family's WRONG rule at its decision point (``next_action(
    wrong_rule=True)``), expert everywhere else; the steps where the wrong rule's action differs
    from the right one are listed in ``meta["planted_steps"]``.

    Gold-path envs (TextWorld Express): the gold path, except that its decisive (last) step takes a
    wrong object or direction: another valid action with the same verb ("put map in box" for
    "put coin in box", "move east" for "move south"), drawn from ``ep.rng``; the episode ends
    right after it, so the demonstration is exactly as long as the gold path. Tasks whose last
    gold step has no same-verb alternative (e.g. TWX coin) cannot be planted: they are played as
    the expert and NOT relabelled (``meta["planted"]`` absent).

    ``rollout`` labels planted trajectories success=True, reward=1.0 and keeps the truth in
    ``meta["planted"]``, ``meta["true_success"]``, ``meta["true_reward"]`` and
    ``meta["planted_steps"]`` (for evaluation only).
    """

    name = "planted"
    relabel_success = True

    def act(self, episodes: list[EpisodeState]) -> list[str]:
        """One wrong-rule (or wrong decisive-step) expert action per episode."""
        return [self._act_one(ep) for ep in episodes]

    def _act_one(self, ep: EpisodeState) -> str:
        next_action = getattr(ep.env, "next_action", None)
        if callable(next_action):
            wrong, right = next_action(wrong_rule=True), next_action(wrong_rule=False)
            if wrong is not None and wrong != right:
                ep.meta.setdefault("planted_steps", []).append(ep.step)
            return expert_action(ep, wrong_rule=True)
        gold = ep.notes.setdefault("gold", list(ep.env.expert(ep.task)))
        if ep.notes.get("gold_pos", 0) != len(gold) - 1:
            return expert_action(ep)
        planned = expert_action(ep)
        verb = planned.split(" ", 1)[0]
        others = [a for a in ep.valid_actions or [] if a != planned and a.split(" ", 1)[0] == verb]
        if not others:
            ep.notes["not_planted"] = True
            return planned
        ep.meta["planted_steps"] = [ep.step]
        ep.stop = True  # a demonstration as long as the gold path, wrong at its last step
        return ep.rng.choice(others)
