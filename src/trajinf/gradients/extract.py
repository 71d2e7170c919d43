"""`extract_features`: per-item and per-step projected gradient features (the method core)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.gradients.batching import ItemSteps, item_steps, make_batch, plan_batches
from trajinf.gradients.config import ExtractionConfig, ItemFeatures
from trajinf.gradients.factorized import FactorizedExtractor, split_item
from trajinf.gradients.less import LessExtractor
from trajinf.gradients.loss import ActionNLL
from trajinf.gradients.modules import tracked_modules
from trajinf.gradients.projection import factorized_k
from trajinf.models.checkpoints import CheckpointState

# Items sorted and batched together; results are yielded in input order after each window,
# so memory stays bounded while batches are still length-bucketed.
WINDOW_ITEMS = 512


def feature_dim(model: torch.nn.Module, config: ExtractionConfig) -> int:
    """Actual feature dim D: n_modules * k^2 (factorized) or proj_dim (less)."""
    config.validate()
    if config.mode == "less":
        return config.proj_dim
    n = len(tracked_modules(model, config.modules))
    return n * factorized_k(config.proj_dim, n) ** 2


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off during extraction; the caller's train/eval flag is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def extract_features(
    model: torch.nn.Module,
    items: Sequence[TokenizedTrajectory],
    config: ExtractionConfig,
    *,
    checkpoint_state: CheckpointState | None = None,
    update_mask: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
    loss: ActionNLL | None = None,
) -> Iterator[ItemFeatures]:
    """Yield one ItemFeatures per item, in input order.

    ``loss``: the loss whose gradients are the features (:mod:`trajinf.gradients.loss`);
    default ``config.loss``, the action-only NLL with ``config.loss_normalization``.

    Each ItemFeatures has trajectory float32 [D] and steps float32 [S, D]; D = feature_dim.
    Non-finite loss or features give finite=False and zero features (other items of the batch
    are recomputed alone, so one bad item never spoils its batch); an item without action
    tokens also gets finite=False, loss NaN. `progress(n)` is called with the number of items
    just finished (after each batch). Hooks, eval mode and requires_grad changes are
    only in place while a window is computed, never across a `yield`.
    """
    config.validate()
    modules = tracked_modules(model, config.modules)
    device = model_device(model)
    kwargs = {"checkpoint_state": checkpoint_state, "update_mask": update_mask}
    if config.mode == "factorized":
        extractor = FactorizedExtractor(modules, config, device, **kwargs)
        window_fn = _factorized_window
    else:
        extractor = LessExtractor(modules, config, device, **kwargs)
        window_fn = _less_window
    done = progress if progress is not None else (lambda n: None)
    loss = config.loss if loss is None else loss
    for start in range(0, len(items), WINDOW_ITEMS):
        window = list(range(start, min(start + WINDOW_ITEMS, len(items))))
        with eval_mode(model):
            results = window_fn(model, items, window, extractor, config, loss, done)
        for i in window:
            yield results[i]


def _result(
    index: int,
    item: TokenizedTrajectory,
    steps: ItemSteps,
    trajectory: np.ndarray,
    step_feats: np.ndarray,
    loss: float,
    dim: int,
) -> ItemFeatures:
    finite = bool(
        np.isfinite(loss) and np.isfinite(trajectory).all() and np.isfinite(step_feats).all()
    )
    if not finite:
        trajectory = np.zeros(dim, np.float32)
        step_feats = np.zeros((len(steps.step_index), dim), np.float32)
    return ItemFeatures(
        index=index,
        id=item.id,
        trajectory=trajectory,
        steps=step_feats,
        step_index=steps.step_index,
        step_tokens=steps.step_tokens,
        loss=float(loss),
        finite=finite,
    )


def _factorized_window(
    model,
    items,
    window,
    extractor: FactorizedExtractor,
    config: ExtractionConfig,
    objective: ActionNLL,
    done: Callable[[int], None],
) -> dict[int, ItemFeatures]:
    steps = {i: item_steps(items[i], objective) for i in window}
    device = model_device(model)

    def run(indices: list[int]) -> dict[int, ItemFeatures]:
        batch = make_batch([items[i] for i in indices], [steps[i] for i in indices], device)
        feats, loss = extractor.run_batch(model, batch)
        out = {}
        for r, i in enumerate(indices):
            traj, step_feats = split_item(feats[r], steps[i])
            out[i] = _result(i, items[i], steps[i], traj, step_feats, float(loss[r]), extractor.dim)
        return out

    results: dict[int, ItemFeatures] = {}
    lengths = [len(items[i].input_ids) for i in window]
    for group in plan_batches(lengths, config.batch_tokens):
        indices = [window[j] for j in group]
        out = run(indices)
        # items without action tokens are finite=False by definition; anything else that is
        # non-finite is recomputed alone so it cannot spoil the other items' features
        if len(indices) > 1 and any(not out[i].finite and steps[i].n_action for i in indices):
            out = {}
            for i in indices:
                out.update(run([i]))
        results.update(out)
        done(len(indices))
    return results


def _less_window(
    model,
    items,
    window,
    extractor: LessExtractor,
    config: ExtractionConfig,
    objective: ActionNLL,
    done: Callable[[int], None],
) -> dict[int, ItemFeatures]:
    results: dict[int, ItemFeatures] = {}
    pending: list[tuple[int, ItemSteps, torch.Tensor, float]] = []

    def flush() -> None:
        if not pending:
            return
        raw = torch.cat([p[2] for p in pending])
        feats = extractor.features(raw).cpu().numpy()
        row = 0
        for i, st, r, loss in pending:
            block = feats[row : row + r.shape[0]]
            row += r.shape[0]
            s = len(st.step_index)
            traj, step_feats = block[0].copy(), block[1 : 1 + s].copy()
            results[i] = _result(i, items[i], st, traj, step_feats, loss, extractor.dim)
        done(len(pending))
        pending.clear()

    n_rows = 0
    for i in window:
        st = item_steps(items[i], objective)
        raw, loss = extractor.raw_gradients(model, items[i], st)
        if not bool(torch.isfinite(raw).all()):
            loss = float("nan")  # finite=False; zeros are written by _result
            raw = torch.zeros_like(raw)
        pending.append((i, st, raw, loss))
        n_rows += raw.shape[0]
        if n_rows >= extractor.rows_per_pass:
            flush()
            n_rows = 0
    flush()
    return results
