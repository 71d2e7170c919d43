"""K-FAC factors in the factorized projected space (a LoGra-style preconditioner).

A factorized feature of tracked layer l is F_l = sum_t g~_t x~_t^T (k_out x k_in) with
x~ = P_in x and g~ = P_out g (see factorized.py). K-FAC approximates the Fisher of the projected
weight by A_l (x) G_l with
    A_l = sum_t x~_t x~_t^T / n,    G_l = sum_t g~_t g~_t^T / n      (k x k each),
summed over the n real (non-pad) token positions of a sample of pool items. g is the output
gradient of each item's action-weighted loss (the same backward as the features), so the loss's
token weights enter through g; A counts every position, as the feature sums over every position.
Scoring then applies (G_l + lambda_G I)^-1 F_l (A_l + lambda_A I)^-1 to the target features
(:func:`trajinf.scoring.directions.kfac_precondition`).

The factors come from a separate pass over up to ``max_items`` pool items (one forward + one
backward per batch, no feature buffers), not from the store extraction: simpler, and a few
hundred items give tens of thousands of token samples for k x k factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.batching import item_steps, make_batch, model_logits, plan_batches, token_nll
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import eval_mode, model_device
from trajinf.gradients.factorized import FactorizedExtractor
from trajinf.gradients.hooks import ActivationGradientCollector
from trajinf.gradients.modules import TrackedModule, tracked_modules
from trajinf.models.checkpoints import CheckpointState

KfacFactors = dict[str, tuple[np.ndarray, np.ndarray]]


class _FactorAccumulator:
    """Hook callbacks that add x~ x~^T and g~ g~^T over the real positions of a batch."""

    def __init__(self, extractor: FactorizedExtractor) -> None:
        self.ex = extractor
        k = extractor.k
        dev = next(iter(extractor.p_in.values())).device
        # float64 sums: tens of thousands of tokens of float32 outer products
        self.a = {
            t.name: torch.zeros(k, k, dtype=torch.float64, device=dev) for t in extractor.modules
        }
        self.g = {
            t.name: torch.zeros(k, k, dtype=torch.float64, device=dev) for t in extractor.modules
        }
        self.mask: torch.Tensor | None = None
        self.seen: set[str] = set()

    def on_input(self, tracked: TrackedModule, x: torch.Tensor) -> None:
        xs = (x.detach().float() @ self.ex.p_in[tracked.name])[self.mask].double()  # [n, k]
        self.a[tracked.name] += xs.T @ xs

    def on_output_grad(self, tracked: TrackedModule, g: torch.Tensor) -> None:
        gs = (g.float() @ self.ex.p_out[tracked.name])[self.mask].double()
        self.g[tracked.name] += gs.T @ gs
        self.seen.add(tracked.name)


def kfac_factors(
    model: torch.nn.Module,
    items: Sequence[TokenizedTrajectory],
    config: ExtractionConfig,
    *,
    max_items: int = 256,
    seed: int = 0,
    checkpoint_state: CheckpointState | None = None,
    update_mask: dict[str, torch.Tensor] | None = None,
) -> KfacFactors:
    """{module name: (A float64 [k, k], G float64 [k, k])} in tracked-module (= feature) order.

    Uses up to ``max_items`` items (a seeded random sample when there are more; items without
    action tokens are skipped). ``config`` must be the factorized ExtractionConfig the features
    were extracted with: projections, factored-Adam scales and update masks are folded in the
    same way, so the factors live in the features' projected space.
    """
    config.validate()
    if config.mode != "factorized":
        raise TrajinfError(
            f"ExtractionConfig field 'mode': K-FAC factors need 'factorized', got {config.mode!r}"
        )
    if max_items < 1:
        raise TrajinfError(f"kfac_factors: max_items must be >= 1, got {max_items}")
    modules = tracked_modules(model, config.modules)
    device = model_device(model)
    extractor = FactorizedExtractor(
        modules, config, device, checkpoint_state=checkpoint_state, update_mask=update_mask
    )
    pick = np.arange(len(items))
    if len(items) > max_items:
        pick = np.sort(np.random.default_rng(seed).choice(len(items), max_items, replace=False))
    chosen = [items[i] for i in pick]
    steps = [item_steps(it, config.loss) for it in chosen]
    keep = [i for i, st in enumerate(steps) if st.n_action > 0]
    if not keep:
        raise TrajinfError("kfac_factors: no item has action tokens")
    acc = _FactorAccumulator(extractor)
    n_tokens = 0
    with eval_mode(model):
        for group in plan_batches([len(chosen[i].input_ids) for i in keep], config.batch_tokens):
            idx = [keep[j] for j in group]
            batch = make_batch([chosen[i] for i in idx], [steps[i] for i in idx], device)
            acc.mask = batch.attention_mask.bool()
            acc.seen.clear()
            collector = ActivationGradientCollector(modules, acc.on_input, acc.on_output_grad)
            with collector, torch.enable_grad():
                collector.new_forward()
                logits, embeds = model_logits(model, batch, embeds_requires_grad=True)
                total = (token_nll(logits, batch.input_ids) * batch.token_weight).sum()
                del logits
                # grads w.r.t. the embeddings only: the hooks see every g, no weight gradients
                torch.autograd.grad(total, [embeds])
            missing = sorted({t.name for t in modules} - acc.seen)
            if missing:
                raise TrajinfError(f"no gradient reached tracked modules {missing[:3]}")
            n_tokens += int(acc.mask.sum())
    out: KfacFactors = {}
    for t in modules:
        a = (acc.a[t.name] / n_tokens).cpu().numpy()
        g = (acc.g[t.name] / n_tokens).cpu().numpy()
        if not (np.isfinite(a).all() and np.isfinite(g).all()):
            raise TrajinfError(f"kfac_factors: non-finite factors for module {t.name!r}")
        out[t.name] = (a, g)
    return out
