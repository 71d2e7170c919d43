"""Adam-style preconditioners built from a checkpoint's optimizer moments.

Bias correction is not applied (as in LESS): within one checkpoint it is a global scale.
"""

from __future__ import annotations

import torch


def factored_adam_scales(exp_avg_sq: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adafactor-style rank-1 factorization of Adam's second moment, split into two scales.

    exp_avg_sq: v [out, in] (the weight's layout in [out, in] orientation).
    With a = v.sum(1) [out], b = v.sum(0) [in], s = a.sum(): v ~ a b^T / s. Writing
    r = a / sqrt(s), c = b / sqrt(s) gives v_ij ~ r_i c_j, so
        G_ij / sqrt(v_ij) ~ (G_ij) / (sqrt(r_i) sqrt(c_j))
    and we damp each factor separately:
        precond(G)_ij = G_ij * scale_out_i * scale_in_j,
        scale_out = 1 / (sqrt(r) + eps),  scale_in = 1 / (sqrt(c) + eps).
    Since G = sum_t g_t x_t^T this is sum_t (scale_out * g_t)(scale_in * x_t)^T: still rank one
    per token, so it is folded into the projections. Returns (scale_out [out], scale_in [in]).
    """
    v = exp_avg_sq.detach().float().clamp_min(0)
    a, b = v.sum(1), v.sum(0)
    root_s = a.sum().sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    scale_out = 1.0 / ((a / root_s).sqrt() + eps)
    scale_in = 1.0 / ((b / root_s).sqrt() + eps)
    return scale_out, scale_in


def adam_precondition(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor:
    """LESS's Adam direction of one more step: m' / (sqrt(v') + eps).

    grad: [R, N] rows of flattened gradients; exp_avg, exp_avg_sq: [N] moments.
    m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2. Returns [R, N].
    (LESS's code writes sqrt(v' + eps); we use the Adam update's sqrt(v') + eps.)
    """
    b1, b2 = betas
    m = exp_avg.unsqueeze(0) * b1 + grad * (1 - b1)
    v = exp_avg_sq.unsqueeze(0) * b2 + grad.square() * (1 - b2)
    return m / (v.sqrt() + eps)
