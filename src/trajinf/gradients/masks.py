"""Sparse update masks: track only parameters that changed between two checkpoints."""

from __future__ import annotations

import torch

from trajinf.errors import TrajinfError


@torch.no_grad()
def sparse_update_mask(
    model_a: torch.nn.Module, model_b: torch.nn.Module, threshold: float = 1e-5
) -> dict[str, torch.Tensor]:
    """{param name: bool tensor (param's shape)}, True where |b - a| > threshold.

    Covers parameters present in both models with the same shape (names as in
    `model_b.named_parameters()`). Factorized extraction uses it as row/column masks (an
    over-approximation), LESS extraction elementwise.
    """
    params_a = dict(model_a.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for name, b in model_b.named_parameters():
        a = params_a.get(name)
        if a is None or a.shape != b.shape:
            continue
        masks[name] = (
            (b.detach().float() - a.detach().float().to(b.device)).abs() > threshold
        ).cpu()
    if not masks:
        raise TrajinfError("sparse_update_mask: the two models share no parameter (name and shape)")
    return masks


def mask_density(mask: dict[str, torch.Tensor]) -> float:
    """Fraction of elements tracked (True) over all masked parameters, in [0, 1]."""
    total = sum(m.numel() for m in mask.values())
    return float(sum(int(m.sum()) for m in mask.values()) / total) if total else 0.0
