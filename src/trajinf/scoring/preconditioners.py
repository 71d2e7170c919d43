"""Preconditioners, registered by name: every name trajinf knows (none, adam, factored_adam,
gram, kfac) with the stage that applies it.

- Extraction stage (``adam``, ``factored_adam``): Adam's second moment from a checkpoint's
  optimizer state, applied to pool gradients inside :mod:`trajinf.gradients` (names and modes
  from :data:`trajinf.gradients.config.EXTRACTION_PRECONDITIONERS`).
- Scoring stage (``gram``, ``kfac``): a :class:`Preconditioner` maps target vectors of one
  checkpoint, float32 [M, D] -> [M, D]. ``gram`` is fit on the pool's feature moments and acts
  on the formed target directions; ``kfac`` is fit on per-layer K-FAC factors (from a model
  pass, :func:`trajinf.gradients.kfac.kfac_factors`) and acts on every target feature before
  the directions are formed (``on_targets``), and on the harmful null's random draws too.

``none`` is the identity at both stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from trajinf.errors import StoreMismatchError, TrajinfError
from trajinf.gradients.config import EXTRACTION_PRECONDITIONERS

# {module name: (A [k, k], G [k, k])} in feature (tracked-module) order: see gradients/kfac.py
KfacFactors = Mapping[str, tuple[np.ndarray, np.ndarray]]
MODES = ("factorized", "less")


@dataclass
class PoolMoments:
    """Moments of one checkpoint's finite pool trajectory features: ``n`` rows (at least 1),
    ``total`` float64 [D] (their sum) and ``second`` float64 [D, D] (sum of x x^T; None when
    the preconditioner needs none)."""

    n: int
    total: np.ndarray
    second: np.ndarray | None = None

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.n


class Preconditioner:
    """The scoring-time interface, and its identity (``none``).

    ``fit(c, moments)`` is called for checkpoint ``c`` when ``needs_pool`` and before
    ``apply(c, ...)`` of that checkpoint; ``apply(c, vectors [M, D]) -> [M, D]`` maps target
    vectors: every target feature when ``on_targets`` (before directions are formed), else the
    formed directions.
    """

    name: ClassVar[str] = "none"
    on_targets: ClassVar[bool] = False
    needs_pool: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: Any, kfac: Any = None) -> Preconditioner:
        """The preconditioner of a :class:`~trajinf.scoring.source.ScoreConfig`."""
        return cls()

    def check(self, n_checkpoints: int) -> None:
        """Raise if this preconditioner cannot serve ``n_checkpoints`` checkpoints."""

    def fit(self, c: int, moments: PoolMoments) -> None:
        """Fit checkpoint ``c`` on the pool's feature moments (``needs_pool`` only)."""

    def apply(self, c: int, vectors: np.ndarray) -> np.ndarray:
        return vectors


class Gram(Preconditioner):
    """Damped inverse of the pool's feature covariance, ``(F + lambda I)^-1 u`` with
    ``F = X^T X / n`` (centered when ``center``, i.e. with ``remove_mean``) and
    ``lambda = damping * trace(F) / D``. Fit and applied one checkpoint at a time: one D x D
    factor in memory."""

    name = "gram"
    needs_pool = True

    def __init__(self, damping: float, *, center: bool = False) -> None:
        self.damping, self.center = damping, center
        self._c: int | None = None
        self._factor = None

    @classmethod
    def from_config(cls, config: Any, kfac: Any = None) -> Gram:
        return cls(config.gram_damping, center=config.remove_mean)

    def fit(self, c: int, moments: PoolMoments) -> None:
        """Cholesky factor of checkpoint c's damped covariance (consumes ``moments.second``)."""
        import scipy.linalg  # here: reading a config (the CLI's options) stays light

        gram, n = moments.second, moments.n
        if gram is None:
            raise TrajinfError("gram preconditioner: fit needs the pool's second moments")
        d = gram.shape[0]
        raw_tr = np.trace(gram) / n
        if self.center:
            mu = moments.mean
            gram -= n * np.outer(mu, mu)
        gram /= n
        # Centering cancels digits of the float32 block sums, so lambda never drops below
        # their rounding level; an all-zero pool (F == 0) falls back to the identity.
        lam = max(self.damping * np.trace(gram) / d, 1e-5 * raw_tr / d)
        lam = lam if lam > 0 else 1.0
        gram[np.diag_indices(d)] += lam
        try:
            self._factor = scipy.linalg.cho_factor(gram)
        except np.linalg.LinAlgError as e:
            raise TrajinfError(
                f"gram preconditioner: (F + lambda I) is not positive definite at checkpoint "
                f"{c}; increase ScoreConfig field 'gram_damping' (now {self.damping})"
            ) from e
        self._c = c

    def apply(self, c: int, vectors: np.ndarray) -> np.ndarray:
        if self._c != c:
            raise TrajinfError(f"gram preconditioner: checkpoint {c} applied before it was fit")
        import scipy.linalg

        u = scipy.linalg.cho_solve(self._factor, vectors.T.astype(np.float64))
        return u.T.astype(np.float32)


class Kfac(Preconditioner):
    """Per-layer K-FAC in the projected space: each layer block F_l (row-major k_out x k_in) of
    a target feature becomes ``(G_l + lambda_G I)^-1 F_l (A_l + lambda_A I)^-1`` with
    ``lambda = damping * trace(factor) / k``; ``factors``: one set per checkpoint."""

    name = "kfac"
    on_targets = True

    def __init__(self, factors: KfacFactors | Sequence[KfacFactors] | None, damping: float):
        if factors is None:
            raise TrajinfError(
                "ScoreConfig field 'preconditioner': 'kfac' needs factors (kfac=, from "
                "trajinf.gradients.kfac.kfac_factors)"
            )
        self.factors = [factors] if isinstance(factors, Mapping) else list(factors)
        self.damping = damping

    @classmethod
    def from_config(cls, config: Any, kfac: Any = None) -> Kfac:
        return cls(kfac, config.kfac_damping)

    def check(self, n_checkpoints: int) -> None:
        if len(self.factors) != n_checkpoints:
            raise TrajinfError(
                f"kfac: {len(self.factors)} factor sets for {n_checkpoints} checkpoints"
            )

    def apply(self, c: int, vectors: np.ndarray) -> np.ndarray:
        return kfac_precondition(vectors, self.factors[c], self.damping)


def _damped_inverse(m: np.ndarray, damping: float) -> np.ndarray:
    """(M + lambda I)^-1 of a symmetric PSD factor, lambda = damping * trace(M) / k; an all-zero
    factor gets lambda = 1 (the identity)."""
    k = m.shape[0]
    lam = damping * float(np.trace(m)) / k
    lam = lam if lam > 0 else (0.0 if np.trace(m) > 0 else 1.0)
    w, v = np.linalg.eigh((m + m.T) / 2)  # symmetrize float rounding away
    w = w + lam
    if w.min() <= 1e-12 * max(1.0, float(w.max())):
        raise TrajinfError(
            f"kfac preconditioner: factor + lambda I is singular; increase ScoreConfig field "
            f"'kfac_damping' (now {damping})"
        )
    return (v / w) @ v.T


def kfac_precondition(vectors: np.ndarray, factors: KfacFactors, damping: float) -> np.ndarray:
    """float32 [M, D]: per layer l, block F_l (row-major k_out x k_in, blocks in ``factors``
    order, as the factorized features lay them out) -> (G_l + lambda_G I)^-1 F_l
    (A_l + lambda_A I)^-1, lambda = damping * trace(factor) / k."""
    v = np.asarray(vectors, np.float64)
    m, d = v.shape
    blocks = list(factors.values())
    k = blocks[0][0].shape[0] if blocks else 0
    if not blocks or len(blocks) * k * k != d:
        raise StoreMismatchError(
            f"kfac: {len(blocks)} layers of {k} x {k} factors do not match feature dim {d}"
        )
    out = np.empty_like(v)
    for i, (a, g) in enumerate(blocks):
        sl = slice(i * k * k, (i + 1) * k * k)
        f = v[:, sl].reshape(m, k, k)
        out[:, sl] = (_damped_inverse(g, damping) @ f @ _damped_inverse(a, damping)).reshape(m, -1)
    return out.astype(np.float32)


@dataclass(frozen=True)
class Registered:
    """A registry entry: the stages that apply the name, the extraction modes it works with,
    and its scoring-time class (None: applied inside :mod:`trajinf.gradients`)."""

    stages: tuple[str, ...]
    modes: tuple[str, ...]
    cls: type[Preconditioner] | None


PRECONDITIONERS: dict[str, Registered] = {
    "none": Registered(("extraction", "scoring"), MODES, Preconditioner),
    **{
        name: Registered(("extraction",), modes, None)
        for name, modes in EXTRACTION_PRECONDITIONERS.items()
        if name != "none"
    },
    "gram": Registered(("scoring",), MODES, Gram),
    "kfac": Registered(("scoring",), ("factorized",), Kfac),
}
SCORING_PRECONDITIONERS = tuple(n for n, r in PRECONDITIONERS.items() if "scoring" in r.stages)


def scoring_preconditioner(config: Any, kfac: Any = None) -> Preconditioner:
    """The scoring-time preconditioner named by ``config.preconditioner`` (a ScoreConfig);
    ``kfac``: K-FAC factors (one set, or one per checkpoint) for ``"kfac"``."""
    cls = PRECONDITIONERS[config.preconditioner].cls
    if cls is None:
        raise TrajinfError(f"preconditioner {config.preconditioner!r} acts at extraction")
    return cls.from_config(config, kfac)
