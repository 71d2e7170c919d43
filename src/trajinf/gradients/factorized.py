"""Factorized projected gradients: one forward + one backward per batch for all items and steps.

For a tracked layer y_t = W x_t the item gradient is G = sum_t g_t x_t^T (g_t = dL/dy_t). We
project per token, x~ = P_in x, g~ = P_out g, and a step's feature is
    F_s = sum_{t in step s} g~_t x~_t^T  (k x k)  =  P_out (sum_{t in s} g_t x_t^T) P_in^T,
flattened and concatenated over layers. With step_split="position" (one backward) the
position-to-step assignment is in `batching.item_steps`; F_s is the exact gradient of the
item's loss w.r.t. a copy of W used only at the positions of step s (so sum_s F_s =
P_out G P_in^T exactly). With step_split="loss", g is replaced by g^(s) = dL_s/dy, the output
gradient of step s's own loss, summed over all positions: F_s = P_out G_s P_in^T with G_s the
gradient of L_s; one backward per step slot (see loss_split.py). Since L = sum_s L_s, both
splits sum to the same trajectory feature.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trajinf.errors import TrajinfError
from trajinf.gradients.batching import Batch, ItemSteps, model_logits, token_nll
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.hooks import ActivationGradientCollector
from trajinf.gradients.loss_split import capture_head_input, per_step_backward
from trajinf.gradients.modules import TrackedModule
from trajinf.gradients.preconditioners import factored_adam_scales
from trajinf.gradients.projection import factorized_k, factorized_pair
from trajinf.models.checkpoints import CheckpointState


def row_col_masks(mask: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise weight mask -> (row mask [out], column mask [in]) as float32.

    A row (column) is kept if any of its elements is. Masking g and x with these keeps every
    tracked element but also the untracked elements in tracked rows x tracked columns: an
    over-approximation of the elementwise mask, exact when the mask is a row/column block.
    """
    m = mask.bool()
    if transposed:  # Conv1D stores [in, out]
        m = m.t()
    return m.any(1).float(), m.any(0).float()


class FactorizedExtractor:
    """Builds effective projections (preconditioner and masks folded in) and runs batches."""

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
        self.step_split = config.step_split
        self.k = factorized_k(config.proj_dim, len(self.modules))
        self.dim = len(self.modules) * self.k * self.k
        self.p_in: dict[str, torch.Tensor] = {}
        self.p_out: dict[str, torch.Tensor] = {}
        for t in self.modules:
            p_in, p_out = factorized_pair(
                config.seed, t.name, self.k, t.in_features, t.out_features
            )
            if config.preconditioner == "factored_adam":
                v = _moment(checkpoint_state, t.param_name)
                scale_out, scale_in = factored_adam_scales(
                    v.t() if t.transposed else v, checkpoint_state.eps
                )
                p_out, p_in = p_out * scale_out, p_in * scale_in
            if update_mask is not None and t.param_name in update_mask:
                rows, cols = row_col_masks(update_mask[t.param_name].cpu(), t.transposed)
                p_out, p_in = p_out * rows, p_in * cols
            # stored transposed so the per-token projection is a plain [.., in] @ [in, k]
            self.p_in[t.name] = p_in.t().contiguous().to(device)
            self.p_out[t.name] = p_out.t().contiguous().to(device)
        self._x: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()
        self._slot: int | None = None  # loss split: the step slot being backpropagated
        self._onehot: torch.Tensor | None = None
        self._feats: torch.Tensor | None = None
        self._offsets = {t.name: i * self.k * self.k for i, t in enumerate(self.modules)}

    def _on_input(self, tracked: TrackedModule, x: torch.Tensor) -> None:
        self._x[tracked.name] = x.detach().float() @ self.p_in[tracked.name]  # [B, T, k]

    def _on_output_grad(self, tracked: TrackedModule, g: torch.Tensor) -> None:
        g_p = g.float() @ self.p_out[tracked.name]  # [B, T, k]
        x_p = self._x[tracked.name]
        self._seen.add(tracked.name)
        b, t, k = g_p.shape
        off = self._offsets[tracked.name]
        if self._slot is not None:  # every position counts towards the slot: sum_t g~_t x~_t^T
            block = torch.bmm(g_p.transpose(1, 2), x_p).view(b, k * k)
            self._feats[:, self._slot, off : off + k * k] = block
            return
        outer = (g_p.unsqueeze(-1) * x_p.unsqueeze(-2)).view(b, t, k * k)  # g~_t x~_t^T
        # one bmm with the one-hot step assignment [B, S, T] sums tokens into their steps
        self._feats[:, :, off : off + k * k] = torch.bmm(self._onehot, outer)

    def _set_slot(self, s: int) -> None:
        self._slot = s

    def run_batch(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Step features float32 [B, S_max, D] and per-item mean action loss [B]."""
        b, t = batch.input_ids.shape
        s_max = max(batch.max_steps, 1)
        device = batch.input_ids.device
        if self.step_split == "position":
            slots = torch.arange(s_max, device=device)
            self._onehot = (batch.position_slot.unsqueeze(1) == slots.view(1, -1, 1)).float()
        self._feats = torch.zeros(b, s_max, self.dim, device=device)
        self._x.clear()
        self._seen.clear()
        collector = ActivationGradientCollector(self.modules, self._on_input, self._on_output_grad)
        try:
            with (
                collector,
                capture_head_input(model, self.modules, active=self.step_split == "loss") as head,
                torch.enable_grad(),
            ):
                collector.new_forward()
                logits, embeds = model_logits(model, batch, embeds_requires_grad=True)
                nll = token_nll(logits, batch.input_ids)
                del logits
                if self.step_split == "loss":
                    per_step_backward(
                        nll,
                        batch.token_weight,
                        batch.position_slot,
                        embeds,
                        head,
                        s_max,
                        self._set_slot,
                    )
                else:
                    total = (nll * batch.token_weight).sum()
                    # grads w.r.t. the embeddings only: autograd skips every weight gradient
                    torch.autograd.grad(total, [embeds])
            missing = sorted(set(self._x) - self._seen)
            if missing:
                raise TrajinfError(f"no gradient reached tracked modules {missing[:3]}")
            feats = self._feats
        finally:
            self._x.clear()
            self._seen.clear()
            self._slot = None
            self._onehot, self._feats = None, None
        nll = nll.detach()
        counts = batch.action_mask.sum(1)
        loss = (nll * batch.action_mask).sum(1) / counts.clamp_min(1)
        loss = torch.where(counts > 0, loss, torch.full_like(loss, float("nan")))
        return feats, loss


def _moment(state: CheckpointState | None, param_name: str) -> torch.Tensor:
    if state is None:
        raise TrajinfError(
            "ExtractionConfig field 'preconditioner': needs checkpoint_state (optimizer moments)"
        )
    if param_name not in state.exp_avg_sq:
        raise TrajinfError(f"checkpoint optimizer state has no exp_avg_sq for {param_name!r}")
    return state.exp_avg_sq[param_name]


def split_item(feats: torch.Tensor, steps: ItemSteps) -> tuple[np.ndarray, np.ndarray]:
    """[S_max, D] slice of one item -> (trajectory [D], steps [S, D]) float32 numpy."""
    s = len(steps.step_index)
    step_feats = feats[:s].cpu().numpy().astype(np.float32, copy=True)
    return step_feats.sum(0, dtype=np.float32) if s else np.zeros(
        feats.shape[1], np.float32
    ), step_feats
