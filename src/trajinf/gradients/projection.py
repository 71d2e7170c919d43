"""Seeded random projections, deterministic in (seed, name) - never in call order.

Matrices are drawn on the CPU from a torch.Generator seeded by a SHA-256 of the parts,
so any process, batch order or device gets the same numbers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

# Rows of the dense (LESS) projection generated per seeded block. Part of the definition of
# the projection: changing it changes every LESS feature.
DENSE_CHUNK_ROWS = 4096


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from SHA-256 of the parts' str() (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_gaussian(rows: int, cols: int, scale: float, *parts: object) -> torch.Tensor:
    """float32 [rows, cols] with i.i.d. N(0, scale^2) entries, seeded by `parts`."""
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(*parts))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32).mul_(scale)


def factorized_k(proj_dim: int, n_modules: int) -> int:
    """Per-module projection size k = max(2, floor(sqrt(proj_dim / n_modules)))."""
    return max(2, math.isqrt(max(proj_dim // max(n_modules, 1), 0)))


def factorized_pair(
    seed: int, module_name: str, k: int, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_in [k, in], P_out [k, out]), entries N(0, 1/k).

    E ||P_out G P_in^T||_F^2 = ||G||_F^2, so projected inner products are unbiased.
    """
    scale = 1.0 / math.sqrt(k)
    p_in = seeded_gaussian(k, in_features, scale, "factorized", seed, module_name, "in")
    p_out = seeded_gaussian(k, out_features, scale, "factorized", seed, module_name, "out")
    return p_in, p_out


class DenseProjector:
    """Projects flattened parameter gradients [R, N] to [R, D] with a Gaussian N(0, 1/D) matrix.

    The [N, D] matrix is never held whole: it is generated in blocks of DENSE_CHUNK_ROWS rows
    per parameter, block (name, c) seeded by (seed, name, c), and each block multiplies all R
    rows at once, so generation is amortized over every gradient in the call.
    """

    def __init__(self, params: Sequence[tuple[str, int]], dim: int, seed: int) -> None:
        self.params = list(params)
        self.dim = dim
        self.seed = seed
        self.n_inputs = sum(n for _, n in self.params)

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """flat: float32 [R, N] (parameters concatenated in `params` order) -> [R, D]."""
        if flat.shape[1] != self.n_inputs:
            raise ValueError(f"expected {self.n_inputs} gradient columns, got {flat.shape[1]}")
        out = torch.zeros(flat.shape[0], self.dim, dtype=torch.float32, device=flat.device)
        scale = 1.0 / math.sqrt(self.dim)
        offset = 0
        for name, numel in self.params:
            for chunk, start in enumerate(range(0, numel, DENSE_CHUNK_ROWS)):
                rows = min(DENSE_CHUNK_ROWS, numel - start)
                block = seeded_gaussian(rows, self.dim, scale, "less", self.seed, name, chunk)
                lo = offset + start
                out.addmm_(flat[:, lo : lo + rows], block.to(flat.device))
            offset += numel
        return out
