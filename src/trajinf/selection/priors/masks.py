"""Statistics of sparse update masks (arXiv 2505.11711: RL updates a small, nearly full-rank,
seed-consistent subnetwork). Masks come from ``trajinf.gradients.masks.sparse_update_mask``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trajinf.errors import TrajinfError

if TYPE_CHECKING:  # torch is only needed by the caller that built the masks
    import torch

__all__ = ["mask_stats"]


def mask_stats(mask_a: dict[str, torch.Tensor], mask_b: dict[str, torch.Tensor]) -> dict:
    """Sparsity of two update masks and their overlap, over the parameters both cover.

    Returns n_params; density_a/_b (fraction updated) and sparsity_a/_b (1 - density, the
    paper's "update sparsity"); jaccard ``|A & B| / |A | B|``; overlap_a/_b
    ``|A & B| / |A|`` (and ``/ |B|``: the share of one run's updates the other also makes);
    chance_jaccard, the expected Jaccard of independent random masks with the same densities
    ``pa pb / (pa + pb - pa pb)``; and jaccard_vs_chance, their ratio (1 = no more overlap than
    chance; the paper's seed-consistency claim is a ratio well above 1).
    """
    names = [n for n, m in mask_a.items() if n in mask_b and mask_b[n].shape == m.shape]
    if not names:
        raise TrajinfError("mask_stats: the two masks share no parameter (name and shape)")
    a = {n: mask_a[n].bool() for n in names}
    b = {n: mask_b[n].bool() for n in names}
    total = sum(m.numel() for m in a.values())
    inter = sum(int((a[n] & b[n]).sum()) for n in names)
    union = sum(int((a[n] | b[n]).sum()) for n in names)
    na, nb = sum(int(m.sum()) for m in a.values()), sum(int(m.sum()) for m in b.values())
    pa, pb = (na / total, nb / total) if total else (0.0, 0.0)
    chance = pa * pb / (pa + pb - pa * pb) if pa + pb > 0 else 0.0
    jac = inter / union if union else 1.0
    return {
        "n_params": int(total),
        "density_a": pa,
        "density_b": pb,
        "sparsity_a": 1.0 - pa,
        "sparsity_b": 1.0 - pb,
        "jaccard": jac,
        "overlap_a": inter / na if na else 0.0,
        "overlap_b": inter / nb if nb else 0.0,
        "chance_jaccard": chance,
        "jaccard_vs_chance": jac / chance if chance > 0 else float("nan"),
    }
