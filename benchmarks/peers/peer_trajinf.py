"""trajinf adapter: ``trajinf.gradients.extract_features`` for the features and
``trajinf.scoring.scores.score_features`` for the scores (each query is its own target subtask, so
column ``score_<query id>`` is that query's score of every train item).

Fit stage = train-pool feature extraction (+ the K-FAC factor pass over the train pool for the
"+ kfac" rows); score stage = query extraction + scoring.
Positive scores = train gradient aligned with the query gradient = helpful (our convention).
"""

from __future__ import annotations

import numpy as np
from peer_common import MethodResult, PeerSetup, Stopwatch


def _features(model, items, config) -> np.ndarray:
    from trajinf.gradients.extract import extract_features

    feats = list(extract_features(model, items, config))
    if not all(f.finite for f in feats):
        raise RuntimeError("trajinf returned non-finite features")
    return np.stack([f.trajectory for f in feats]).astype(np.float32)  # [N, D]


def run(
    setup: PeerSetup, workdir, mode: str, proj_dim: int | None = None
) -> list[tuple[str, MethodResult]]:
    """Extract once in ``mode`` ("factorized" | "less"), then score several ways.
    ``proj_dim`` overrides the harness-wide dimension (the row names then say so)."""
    from trajinf.gradients.config import ExtractionConfig
    from trajinf.gradients.kfac import kfac_factors
    from trajinf.scoring.scores import score_features
    from trajinf.scoring.source import ScoreConfig

    model = setup.fresh_model()
    cfg = ExtractionConfig(
        mode=mode,
        proj_dim=proj_dim or setup.proj_dim,
        seed=0,
        preconditioner="none",
        loss_normalization="mean",
    )
    train_items, query_items = setup.train.tokenized(), setup.query.tokenized()
    sw = Stopwatch()
    with sw("fit"):
        f_train = _features(model, train_items, cfg)
    with sw("query_features"):
        f_query = _features(model, query_items, cfg)
    variants = [("inner", "none", 0.0), ("cosine", "none", 0.0)]
    if mode == "factorized":
        # damping relative to the mean eigenvalue: with n_train < D the pool covariance is
        # rank-deficient, so the damping decides how much the inverse amplifies noise
        variants += [("inner", "gram", 1e-3), ("inner", "gram", 0.1), ("inner", "gram", 1.0)]
        # K-FAC in the projected space (LoGra-style): factors from the whole train pool (96
        # items < the 256-item default sample), counted as part of the fit stage
        with sw("kfac_factors"):
            factors = kfac_factors(model, train_items, cfg)
        # default damping 0.1 first; 0.01 and 1 only show the sensitivity
        variants += [("inner", "kfac", 0.1), ("cosine", "kfac", 0.1)]
        variants += [("cosine", "kfac", 0.01), ("cosine", "kfac", 1.0)]
    out = []
    qids = list(setup.query.ids)
    for metric, precond, damping in variants:
        sc = Stopwatch()
        with sc("score"):
            res = score_features(
                f_train,
                f_query,
                ScoreConfig(
                    metric=metric,
                    preconditioner=precond,
                    aggregate="max",
                    gram_damping=damping or 1e-3,
                    kfac_damping=damping if precond == "kfac" else 0.1,
                ),
                subtasks=qids,
                ids=list(setup.train.ids),
                kfac=factors if precond == "kfac" else None,
            )
            table = res.trajectories.set_index("id").loc[list(setup.train.ids)]
            scores = np.stack([table[f"score_{q}"].to_numpy() for q in qids], axis=1)
        name = (
            f"trajinf {mode}{f' D~{proj_dim}' if proj_dim else ''} {metric}"
            + (f" +gram(d={damping:g})" if precond == "gram" else "")
            + (f" + kfac(d={damping:g})" if precond == "kfac" else "")
        )
        fit_s = sw.seconds["fit"] + (sw.seconds["kfac_factors"] if precond == "kfac" else 0.0)
        out.append(
            (
                name,
                MethodResult(
                    scores.astype(np.float64),
                    fit_s,
                    sw.seconds["query_features"] + sc.seconds["score"],
                    {
                        "dim": int(f_train.shape[1]),
                        "extraction": cfg.to_dict(),
                        **(
                            {"kfac_seconds": sw.seconds["kfac_factors"]}
                            if precond == "kfac"
                            else {}
                        ),
                    },
                ),
            )
        )
    return out
