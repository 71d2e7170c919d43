"""LESS mode (the faithful reference): per-example flattened gradients, Adam, dense projection.

Per item: one forward (batch size 1), then the gradient of each step's masked loss
(weights as in factorized mode: the item's 1/n_action_tokens), one backward per step over
the retained graph. The trajectory gradient is the sum of the step gradients (plus the
gradient of action tokens outside any step, if any). Note the step semantics differ from
factorized mode: here a step's feature is the gradient of its own loss; there it is the
item-loss gradient flowing through the step's positions (see factorized.py).
Then feature = m' / (sqrt(v') + eps) with LESS's one-more-step Adam moments ("adam") or the
gradient ("none"), masked elementwise, and projected by `DenseProjector`. With "adam" the step
features do not sum to the trajectory feature (the preconditioner is nonlinear in g).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.batching import ItemSteps, make_batch, model_logits, token_nll
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.modules import TrackedModule
from trajinf.gradients.preconditioners import adam_precondition
from trajinf.gradients.projection import DenseProjector
from trajinf.models.checkpoints import CheckpointState

# Flattened gradient rows held before one projection pass (bytes); bigger amortizes the
# generation of the random matrix over more rows.
PROJECT_BUFFER_BYTES = 512 * 2**20


@contextmanager
def tracked_params_require_grad(modules: Sequence[TrackedModule]):
    """Temporarily make the tracked weights require grad (restored on exit)."""
    before = [t.module.weight.requires_grad for t in modules]
    try:
        for t in modules:
            t.module.weight.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(modules, before, strict=True):
            t.module.weight.requires_grad_(flag)


class LessExtractor:
    """Raw per-item / per-step gradients -> preconditioned -> projected features."""

    def __init__(
        self,
        modules: Sequence[TrackedModule],
        config: ExtractionConfig,
        device: torch.device,
        *,
        checkpoint_state: CheckpointState | None = None,
        update_mask: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.modules = list(modules)
        self.config = config
        self.device = device
        names = [t.param_name for t in self.modules]
        numels = [t.module.weight.numel() for t in self.modules]
        self.projector = DenseProjector(
            list(zip(names, numels, strict=True)), config.proj_dim, config.seed
        )
        self.dim = config.proj_dim
        self.m = self.v = None
        if config.preconditioner == "adam":
            if checkpoint_state is None:
                raise TrajinfError(
                    "ExtractionConfig field 'preconditioner': 'adam' needs checkpoint_state"
                )
            missing = [n for n in names if n not in checkpoint_state.exp_avg]
            if missing:
                raise TrajinfError(f"checkpoint optimizer state has no exp_avg for {missing[0]!r}")
            self.m = torch.cat([checkpoint_state.exp_avg[n].float().reshape(-1) for n in names]).to(
                device
            )
            self.v = torch.cat(
                [checkpoint_state.exp_avg_sq[n].float().reshape(-1) for n in names]
            ).to(device)
            self.betas, self.eps = tuple(checkpoint_state.betas), checkpoint_state.eps
        self.mask = None
        if update_mask is not None:
            parts = [
                update_mask[n].reshape(-1).float().cpu() if n in update_mask else torch.ones(k)
                for n, k in zip(names, numels, strict=True)
            ]
            self.mask = torch.cat(parts).to(device)
        self.rows_per_pass = max(1, PROJECT_BUFFER_BYTES // (4 * self.projector.n_inputs))

    def raw_gradients(
        self, model: torch.nn.Module, item: TokenizedTrajectory, steps: ItemSteps
    ) -> tuple[torch.Tensor, float]:
        """Flattened gradients float32 [1 + S, N] (row 0: trajectory) and the mean action loss."""
        batch = make_batch([item], [steps], self.device)
        n_steps = len(steps.step_index)
        weight = torch.from_numpy(steps.token_weight).to(self.device)
        slot = torch.from_numpy(steps.token_slot).to(self.device)
        rows = [weight * (slot == s) for s in range(n_steps)]
        residual = weight * (slot < 0)
        has_residual = bool((residual != 0).any())
        if has_residual:
            rows.append(residual)
        params = [t.module.weight for t in self.modules]
        with torch.enable_grad(), tracked_params_require_grad(self.modules):
            logits, _ = model_logits(model, batch, embeds_requires_grad=False)
            nll = token_nll(logits, batch.input_ids)[0]
            del logits
            grads = _batched_grads(nll, params, torch.stack(rows)) if rows else None
        action = torch.from_numpy(np.asarray(item.action_mask, dtype=bool)).to(self.device)
        loss = float(nll.detach()[action].mean()) if steps.n_action else float("nan")
        n_in = self.projector.n_inputs
        if grads is None:
            return torch.zeros(1, n_in, device=self.device), loss
        r = len(rows)
        flat = torch.cat(
            [
                g.reshape(r, -1).float() if g is not None else p.new_zeros(r, p.numel()).float()
                for g, p in zip(grads, params, strict=True)
            ],
            dim=1,
        )
        trajectory = flat.sum(0, keepdim=True)
        return torch.cat([trajectory, flat[:n_steps]]), loss

    def features(self, raw: torch.Tensor) -> torch.Tensor:
        """Preconditioned, masked, projected: [R, N] -> float32 [R, D]."""
        if self.m is not None:
            raw = adam_precondition(raw, self.m, self.v, self.betas, self.eps)
        if self.mask is not None:
            raw = raw * self.mask
        return self.projector.project(raw)


def _batched_grads(
    nll: torch.Tensor, params: list[torch.Tensor], rows: torch.Tensor
) -> list[torch.Tensor | None]:
    """Gradients of <rows[r], nll> w.r.t. params, each [R, *param.shape] (None if unused).

    One backward per row over the retained graph: on CPU this measured faster than
    `is_grads_batched` (vmap), whose attention backward falls back to a slow per-row loop.
    """
    per_row = [
        torch.autograd.grad(nll, params, grad_outputs=r, retain_graph=True, allow_unused=True)
        for r in rows
    ]
    return [None if gs[0] is None else torch.stack(gs) for gs in zip(*per_row, strict=True)]
