"""Chat-template rendering -> input ids, action mask and per-token step ids.

Message boundaries come from rendering message prefixes with the tokenizer's chat template and
checking each render is a string prefix of the next (only the prefixes that bound an action are
rendered, see ``_spans``). The full render is tokenized once; char
spans map to tokens through the fast tokenizer's offsets: a token belongs to the span that holds
its first character (so a BPE token straddling a boundary goes to the earlier message).

An action (loss) span is an assistant message's rendered text after its generation prompt (the
``<|im_start|>assistant\\n`` header) up to and including its end-of-turn token; whitespace the
template prints after the end-of-turn token (ChatML's ``\\n``) is not part of the action, since
generation stops at the end-of-turn token.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trajinf.data.schema import Trajectory
from trajinf.data.template_check import FIX, check_template_for
from trajinf.errors import TemplateError, TrajinfError


@dataclass
class TokenizedTrajectory:
    """A trajectory as tokens. Arrays are aligned with ``input_ids`` (length T)."""

    id: str
    input_ids: np.ndarray
    action_mask: np.ndarray
    step_ids: np.ndarray
    n_steps: int
    dropped_steps: int = 0
    weights: np.ndarray | None = None


class TrajectoryTooLongError(TrajinfError):
    """Even the head (messages before the first action) plus the last step exceed max_length."""


def _where(traj: Trajectory) -> str:
    if traj.origin is not None:
        return f"{traj.origin[0]}:{traj.origin[1]} trajectory {traj.id!r}"
    return f"trajectory {traj.id!r}"


def _render(tokenizer, messages: list[dict], tools, gen: bool, traj: Trajectory) -> str:
    try:
        out = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=gen
        )
    except Exception as e:  # jinja / transformers raise many types; all mean "template failed"
        raise TemplateError(
            f"{_where(traj)}: chat template failed on {len(messages)} messages: {e}"
        ) from e
    if not isinstance(out, str):
        raise TemplateError(f"{_where(traj)}: chat template returned {type(out).__name__}, not str")
    return out


def _spans(
    tokenizer, messages: list[dict], tools, traj: Trajectory, action_only: bool
) -> tuple[str, dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """-> (full render, {assistant i: action char span}, {system i: char span}).

    Only the prefixes that bound an assistant (or, with ``action_only=False``, a system) message
    are rendered, and each is checked to be a prefix of the next. A template may therefore
    rewrite text *between* actions (Qwen2.5 merges consecutive tool results into one block)
    without harm, since no boundary is taken from there.
    """
    n = len(messages)
    wanted = {"assistant"} if action_only else {"assistant", "system"}
    cuts = sorted(
        {c for i, m in enumerate(messages) if m.get("role") in wanted for c in (i, i + 1)} | {n}
    )
    renders: dict[int, str] = {0: ""}
    prev_cut, prev = 0, ""
    for c in cuts:
        if c == 0:
            continue
        cur = _render(tokenizer, messages[:c], tools, False, traj)
        if not cur.startswith(prev):
            raise TemplateError(
                f"{_where(traj)}: chat template is not prefix-stable: rendering messages[:{c}] "
                f"does not start with the render of messages[:{prev_cut}] (the template changes "
                "earlier text depending on later messages); message boundaries cannot be found"
            )
        renders[c], prev_cut, prev = cur, c, cur
    actions: dict[int, tuple[int, int]] = {}
    systems: dict[int, tuple[int, int]] = {}
    for i, m in enumerate(messages):
        before, after = renders.get(i), renders.get(i + 1)
        if m.get("role") == "system" and not action_only:
            systems[i] = (len(before), len(after))
        if m.get("role") != "assistant":
            continue
        head = _render(tokenizer, messages[:i], tools, True, traj) if i else ""
        if i and not (head.startswith(before) and after.startswith(head)):
            raise TemplateError(
                f"{_where(traj)}: the generation prompt (add_generation_prompt=True on "
                f"messages[:{i}]) is not a prefix of the render with assistant message {i}; "
                "the assistant header cannot be separated from the action"
            )
        start = max(len(head), len(before))
        actions[i] = (start, start + len(after[start:].rstrip()))
        for call in m.get("tool_calls") or ():
            name = (call.get("function") or call).get("name")
            if name and name not in after[start:]:
                raise TemplateError(
                    f"{_where(traj)}: the chat template rendered assistant message {i} without "
                    f"its tool call {name!r} (the action would be empty); {FIX}"
                )
    return renders[n], actions, systems


def _encode(
    traj: Trajectory, messages: list[dict], tokenizer, first_step: int, action_only: bool
) -> TokenizedTrajectory:
    text, actions, systems = _spans(tokenizer, messages, traj.tools, traj, action_only)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    # First char of each token; running max guards against odd offsets of special tokens.
    starts = np.maximum.accumulate(offsets[:, 0]) if len(ids) else offsets[:, 0]

    def tok_range(a: int, b: int) -> tuple[int, int]:
        lo, hi = np.searchsorted(starts, [a, b], side="left")
        return int(lo), int(hi)

    T = len(ids)
    step_ids = np.full(T, -1, dtype=np.int32)
    any_weight = any("weight" in m for m in messages)
    weights = np.zeros(T, dtype=np.float32) if any_weight else None
    for k, (i, (a, b)) in enumerate(sorted(actions.items())):
        lo, hi = tok_range(a, b)
        step_ids[lo:hi] = first_step + k
        if weights is not None:
            weights[lo:hi] = float(messages[i].get("weight", 1.0))
    if action_only:
        mask = step_ids >= 0
    else:
        mask = np.ones(T, dtype=bool)
        for a, b in systems.values():
            lo, hi = tok_range(a, b)
            mask[lo:hi] = False
        if weights is not None:
            weights[mask & (step_ids < 0)] = 1.0
    if T:
        mask[0] = False  # token 0 has no context, so it never carries loss
    if weights is not None:
        weights[~mask] = 0.0
    return TokenizedTrajectory(
        id=traj.id,
        input_ids=ids,
        action_mask=mask,
        step_ids=step_ids,
        n_steps=len(actions),
        dropped_steps=first_step,
        weights=weights,
    )


def tokenize_trajectory(
    traj: Trajectory, tokenizer, *, max_length: int | None = None, action_only: bool = True
) -> TokenizedTrajectory:
    """Tokenize one trajectory with ``tokenizer``'s chat template (``traj.tools`` passed through).

    Returns ``input_ids`` int64 [T], ``action_mask`` bool [T] (assistant content/tool-call tokens
    plus the end-of-turn token; never token 0), ``step_ids`` int32 [T] (original step index inside
    assistant spans, -1 elsewhere) and ``weights`` float32 [T] from message ``"weight"`` fields
    (1.0 default on loss tokens, 0 elsewhere; None when no message has a weight).
    ``action_only=False`` puts every non-system token except token 0 in the mask.
    If T > ``max_length``, the fewest whole steps are dropped from the left that make it fit (the
    messages before the first assistant message are kept), with a warning; step ids stay the
    original indices. Only the kept steps are rendered message by message, so a 10k-step
    trajectory costs about as much as its kept window (the template's prefix-stability is then
    checked on the kept messages only).
    Raises TemplateError (template not prefix-stable / fails), TrajectoryTooLongError.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TrajinfError("tokenize_trajectory needs a fast (Rust) tokenizer for offset mapping")
    if max_length is None:
        return _encode(traj, traj.messages, tokenizer, 0, action_only)
    # One render + one tokenizer pass is linear; _encode renders a prefix per action, which is
    # quadratic in the number of steps. So count first, and run _encode only on what is kept.
    T = _n_tokens(traj, traj.messages, tokenizer)
    if T <= max_length:
        return _encode(traj, traj.messages, tokenizer, 0, action_only)
    steps = traj.steps()
    if not steps:
        raise TrajectoryTooLongError(
            f"{_where(traj)}: {T} tokens > max_length={max_length} and it has no assistant "
            "message (no step) to drop; raise max_length or drop this trajectory"
        )
    head = traj.messages[: steps[0].action]
    d = _first_fitting_step(traj, head, steps, tokenizer, max_length)
    if d is None:
        raise TrajectoryTooLongError(
            f"{_where(traj)}: {T} tokens > max_length={max_length} and even the first messages "
            "plus the last step do not fit; raise max_length or drop this trajectory"
        )
    out = _encode(traj, head + traj.messages[steps[d].action :], tokenizer, d, action_only)
    warnings.warn(
        f"{_where(traj)}: {T} tokens > max_length={max_length}; "
        f"dropped the first {d} of {len(steps)} steps",
        stacklevel=2,
    )
    return out


def _n_tokens(traj: Trajectory, messages: list[dict], tokenizer) -> int:
    """Exact token count of the full render of ``messages`` (what ``_encode`` would produce)."""
    text = _render(tokenizer, messages, traj.tools, False, traj)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _first_fitting_step(
    traj: Trajectory, head: list[dict], steps: list, tokenizer, max_length: int
) -> int | None:
    """Smallest ``d >= 1`` with ``head + steps[d:]`` rendering to <= max_length tokens, or None.

    Assumes (as left truncation itself does) that keeping more steps never gives fewer tokens,
    so it gallops from the right (keep 1, 2, 4, ... steps) and then bisects: O(log k) renders of
    at most ~2x the kept window each (the caller renders the whole trajectory once, to count).
    """
    n = len(steps)

    def fits(d: int) -> bool:
        return _n_tokens(traj, head + traj.messages[steps[d].action :], tokenizer) <= max_length

    if not fits(n - 1):
        return None
    ok, k = n - 1, 2  # ok: a start known to fit; bad: a start known not to (d=0, the full render)
    while n - k > 0 and fits(n - k):
        ok, k = n - k, 2 * k
    bad = max(n - k, 0)
    while ok - bad > 1:
        mid = (ok + bad) // 2
        if fits(mid):
            ok = mid
        else:
            bad = mid
    return ok


def tokenize_pool(
    trajs: Sequence[Trajectory],
    tokenizer,
    *,
    max_length: int | None = None,
    action_only: bool = True,
    on_too_long: str = "raise",
) -> list[TokenizedTrajectory]:
    """Tokenize every trajectory (see :func:`tokenize_trajectory`), in input order.

    The chat template is first probed (``template_check.check_template_for``): one that drops the
    tool calls or tool results the trajectories use raises TemplateError before any work.
    ``on_too_long="skip"`` leaves out (with a warning) trajectories whose last step alone does
    not fit in ``max_length`` instead of raising; then the output is shorter than the input and
    must be matched by ``id``.
    """
    if on_too_long not in ("raise", "skip"):
        raise ValueError(f"on_too_long must be 'raise' or 'skip', got {on_too_long!r}")
    check_template_for(tokenizer, trajs)
    out = []
    for t in trajs:
        try:
            out.append(
                tokenize_trajectory(t, tokenizer, max_length=max_length, action_only=action_only)
            )
        except TrajectoryTooLongError as e:
            if on_too_long == "raise":
                raise
            warnings.warn(f"skipped: {e}", stacklevel=2)
    return out
