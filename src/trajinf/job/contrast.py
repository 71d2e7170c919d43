"""The contrast harm signal: what training on the target does to each action token of the pool.

The gradient signals of :mod:`trajinf.scoring.calibration` see a step as the sum of its tokens'
gradients. A plausible-but-wrong step differs from the right one in a token or two (``put map
in box`` where the target puts the coin; ``use knife`` where it peels), and summed over the
step that difference drowns in what the two share. The contrast signal measures it where it is:
the model at the scoring checkpoint is fine-tuned for a few epochs on the target, and every
action token of the pool is scored by how much that changed its log-probability::

    c_t = log p_tuned(x_t | x_<t) - log p_ref(x_t | x_<t)
    value_k = min_{t in action tokens of step k} c_t

(the exact, finite-step version of the target's influence on that token; the sign is kept:
a token the target teaches against goes down). A step the target teaches against has a very
negative value while the rest of its trajectory, which the target teaches, goes up: the
trajectory's harm score is the largest drop (:func:`trajinf.scoring.calibration.step_drops`,
statistic ``drop``) and its worst step the one where it happens.

**Calibration** is cross-fitted on the target, which is known good: the target is split into
``folds`` folds (stratified by subtask), and each fold's trajectories are scored exactly like
the pool by a model tuned on the other folds. Those held-out harm scores set the threshold
(split conformal, else a Gaussian bound: :func:`trajinf.scoring.calibration.harm_threshold`).
The fold models see ``(folds - 1) / folds`` of the target, the pool's model all of it: the
false-positive rate is therefore measured on known-good pool trajectories in the benchmark
(``trajinf bench --harm``), not assumed.

Cost: ``folds + 1`` short fine-tunes on the target and two forward passes over the pool (no
backward over the pool).

The ``logprob`` signal (:func:`logprob_harm`) is the same read without the tuning: a step's
value is the reference's own log-probability of its least likely action token. It needs a
reference that knows every skill of the pool: on TextWorld Express it ranks every planted demo
first but flags known-good demos of games the target does not cover (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.batching import plan_batches
from trajinf.scoring.calibration import HarmResult, flags_from_step_values, step_drops
from trajinf.train.sft import TrainConfig, collate, pad_id, token_logprobs, train_sft

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContrastConfig:
    """How the reference model is tuned on the target (and on each calibration fold)."""

    epochs: int = 2
    lr: float = 1e-3
    folds: int = 4
    seed: int = 0
    batch_tokens: int = 8192  # padded tokens per forward / training batch (the job's own)
    lora: bool = False  # tune fresh LoRA adapters (models.lora) instead of all weights

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.folds < 2 or not self.lr > 0:
            raise TrajinfError(
                f"contrast harm: needs epochs >= 1, folds >= 2 and lr > 0, got {self}"
            )


def action_logprobs(
    model: torch.nn.Module,
    items: Sequence[TokenizedTrajectory],
    pad_token_id: int,
    *,
    batch_tokens: int = 8192,
) -> list[np.ndarray]:
    """Per item, float32 [T]: log p(token | prefix) at action tokens, 0 elsewhere."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[np.ndarray | None] = [None] * len(items)
    for batch in plan_batches([len(it.input_ids) for it in items], batch_tokens):
        b = collate([items[i] for i in batch], pad_token_id).to(device)
        mask = torch.zeros_like(b.attention_mask, dtype=torch.bool)
        for r, i in enumerate(batch):
            am = np.asarray(items[i].action_mask, bool)
            mask[r, : len(am)] = torch.from_numpy(am)
        with torch.no_grad():
            lp = token_logprobs(model, b.input_ids, b.attention_mask, mask).cpu().numpy()
        for r, i in enumerate(batch):
            out[i] = lp[r, : len(items[i].input_ids)].copy()
    model.train(was_training)
    return out  # type: ignore[return-value]


def step_minima(
    items: Sequence[TokenizedTrajectory], before: Sequence[np.ndarray], after: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values float64 [K], owner int [K], step index int [K]): per step of every item, the
    smallest log-probability change over its action tokens. A step without action tokens (cut
    by truncation) gets NaN."""
    values, owner, index = [], [], []
    for i, (it, a, b) in enumerate(zip(items, before, after, strict=True)):
        am = np.asarray(it.action_mask, bool)
        sid = np.asarray(it.step_ids)
        change = np.asarray(b, np.float64) - np.asarray(a, np.float64)
        for k in range(int(it.n_steps)):
            sel = am & (sid == k)
            values.append(float(change[sel].min()) if sel.any() else np.nan)
            owner.append(i)
            index.append(k)
    return np.array(values, np.float64), np.array(owner, np.int64), np.array(index, np.int64)


def tuned_copy(model: torch.nn.Module, tokenizer, target, config: ContrastConfig):
    """A copy of ``model`` fine-tuned on ``target`` (trajectories or tokens); with
    ``config.lora`` the copy with LoRA adapters tuned (a peft model)."""
    m = copy.deepcopy(model)
    res = train_sft(m, tokenizer, list(target),
                    TrainConfig(epochs=config.epochs, lr=config.lr, seed=config.seed,
                                lora=config.lora, batch_tokens=config.batch_tokens,
                                log_every=0))  # fmt: skip
    return res.model


def stratified_folds(labels: Sequence[str], k: int) -> np.ndarray:
    """int [M]: a fold in 0..k-1 for each item, dealt round robin within each label (so every
    fold sees every subtask the target has at least ``k`` demos of)."""
    labels = [str(x) for x in labels]
    fold = np.zeros(len(labels), np.int64)
    nxt = 0
    for lab in sorted(set(labels)):
        idx = [i for i, x in enumerate(labels) if x == lab]
        for j, i in enumerate(idx):
            fold[i] = (nxt + j) % k
        nxt = (nxt + len(idx)) % k  # small subtasks do not all land in fold 0
    return fold


def contrast_calibration(
    model: torch.nn.Module,
    tokenizer,
    target: Sequence[TokenizedTrajectory],
    subtasks: Sequence[str],
    known_good: np.ndarray,
    config: ContrastConfig,
    *,
    statistic: str = "drop",
) -> np.ndarray:
    """Cross-fitted harm scores float64 [M'] of the known-good target trajectories: each fold
    scored by a copy tuned on the other folds."""
    m = len(target)
    k = min(config.folds, m)
    if k < 2:
        raise TrajinfError(
            f"harm calibration: {m} target trajectories; need >= 2 (a larger target calibrates "
            "the flag)"
        )
    fold = stratified_folds(subtasks, k)
    pad = pad_id(tokenizer)
    before = action_logprobs(model, target, pad, batch_tokens=config.batch_tokens)
    harm = np.full(m, np.nan)
    for f in range(k):
        held = np.flatnonzero(fold == f)
        train = [target[i] for i in np.flatnonzero(fold != f)]
        if not len(held) or not train:
            continue
        tuned = tuned_copy(model, tokenizer, train, config)
        items = [target[i] for i in held]
        after = action_logprobs(tuned, items, pad, batch_tokens=config.batch_tokens)
        values, owner, _ = step_minima(items, [before[i] for i in held], after)
        harm[held] = step_drops(values, owner, len(held), statistic)[1]
        del tuned
    good = np.asarray(known_good, bool) & np.isfinite(harm)
    return harm[good]


def contrast_harm(
    model: torch.nn.Module,
    tokenizer,
    pool: Sequence[TokenizedTrajectory],
    target: Sequence[TokenizedTrajectory],
    *,
    subtasks: Sequence[str],
    known_good: np.ndarray | None = None,
    config: ContrastConfig = ContrastConfig(),
    alpha: float = 0.05,
    statistic: str = "drop",
) -> HarmResult:
    """Contrast harm scores, worst steps and calibrated flags of the pool (module docstring).
    ``model``: the reference (the scoring checkpoint); ``subtasks`` [M]: the target's subtask
    labels (fold strata); ``known_good`` bool [M]: target trajectories that calibrate (default
    all)."""
    good = np.ones(len(target), bool) if known_good is None else np.asarray(known_good, bool)
    calibration = contrast_calibration(
        model, tokenizer, target, subtasks, good, config, statistic=statistic
    )
    return contrast_flags(model, tokenizer, pool, target, calibration, config=config,
                          alpha=alpha, statistic=statistic)  # fmt: skip


def contrast_flags(
    model: torch.nn.Module,
    tokenizer,
    pool: Sequence[TokenizedTrajectory],
    target: Sequence[TokenizedTrajectory],
    calibration: np.ndarray,
    *,
    config: ContrastConfig = ContrastConfig(),
    alpha: float = 0.05,
    statistic: str = "drop",
) -> HarmResult:
    """Contrast harm of ``pool`` at given calibration scores (appended rows reuse the stored
    ones: the tuning is seeded, so the tuned model is the one the first rows saw)."""
    pad = pad_id(tokenizer)
    before = action_logprobs(model, pool, pad, batch_tokens=config.batch_tokens)
    tuned = tuned_copy(model, tokenizer, target, config)
    after = action_logprobs(tuned, pool, pad, batch_tokens=config.batch_tokens)
    res = pool_flags(pool, step_minima(pool, before, after), calibration, alpha=alpha,
                     statistic=statistic, signal="contrast")  # fmt: skip
    res.info.update(contrast=asdict(config))
    return res


def pool_flags(
    pool: Sequence[TokenizedTrajectory],
    steps: tuple[np.ndarray, np.ndarray, np.ndarray],
    calibration: np.ndarray,
    *,
    alpha: float,
    statistic: str,
    signal: str,
) -> HarmResult:
    """Flags of ``pool`` from its step values ``steps`` = (values, owner, step index), at the
    known-good ``calibration`` harm scores (recorded in ``info``)."""
    calibration = np.asarray(calibration, np.float64)
    ids = np.array([t.id for t in pool], dtype=object)
    res = flags_from_step_values(ids, *steps, np.ones(len(pool), bool), calibration,
                                 alpha=alpha, statistic=statistic, signal=signal)  # fmt: skip
    res.info.update(calibration=calibration.tolist())
    return res


def logprob_values(
    model: torch.nn.Module, tokenizer, items: Sequence[TokenizedTrajectory], batch_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values [K], owner [K], step index [K]): per step, the lowest log-probability of its
    action tokens under ``model`` (the ``logprob`` signal: no tuning)."""
    lp = action_logprobs(model, items, pad_id(tokenizer), batch_tokens=batch_tokens)
    return step_minima(items, [np.zeros_like(x) for x in lp], lp)


def logprob_harm(
    model: torch.nn.Module,
    tokenizer,
    pool: Sequence[TokenizedTrajectory],
    target: Sequence[TokenizedTrajectory],
    *,
    known_good: np.ndarray | None = None,
    calibration: np.ndarray | None = None,
    alpha: float = 0.05,
    statistic: str = "drop",
    batch_tokens: int = 8192,
) -> HarmResult:
    """Harm of the pool by the reference model's own surprise: a step's value is its least
    likely action token, the harm score the largest drop below the trajectory's other steps;
    the flag is calibrated on the known-good target scored the same way (or at the stored
    ``calibration`` scores, for appended rows). A step the reference finds implausible is the
    evidence, so the reference must know the skill and not have trained on the target (the
    job's last warm-up checkpoint, trained on a pool fraction, as for contrast)."""
    if calibration is None:
        good = np.ones(len(target), bool) if known_good is None else np.asarray(known_good, bool)
        if int(good.sum()) < 2:
            raise TrajinfError(
                f"harm calibration: {int(good.sum())} known-good target trajectories; need >= 2"
            )
        items = [t for t, g in zip(target, good, strict=True) if g]
        values, owner, _ = logprob_values(model, tokenizer, items, batch_tokens)
        calibration = step_drops(values, owner, len(items), statistic)[1]
        calibration = calibration[np.isfinite(calibration)]
    return pool_flags(pool, logprob_values(model, tokenizer, pool, batch_tokens), calibration,
                      alpha=alpha, statistic=statistic, signal="logprob")  # fmt: skip
