"""K-FAC factors in the projected space and the kfac scoring preconditioner.

Factors are checked against a slow reference (plain hooks, one item at a time, unprojected x and
g projected afterwards, token loops); the preconditioned score against dense Kronecker algebra
on the full projected feature.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from grad_oracles import VOCAB, nll_of, tiny_model, token_weights

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import extract_features
from trajinf.gradients.kfac import kfac_factors
from trajinf.gradients.modules import tracked_modules
from trajinf.gradients.projection import factorized_k, factorized_pair
from trajinf.scoring.preconditioners import kfac_precondition
from trajinf.scoring.scores import score_features
from trajinf.scoring.source import ScoreConfig

torch.set_num_threads(1)
CFG = ExtractionConfig(mode="factorized", proj_dim=14 * 9, seed=3)  # 14 linears, k = 3


def _items(n: int = 4) -> list[TokenizedTrajectory]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = 9 + 3 * i  # different lengths: batches are padded
        steps = np.repeat(np.arange(3), t // 3 + 1)[:t]
        action = rng.random(t) < 0.5
        action[-1] = True
        out.append(
            TokenizedTrajectory(
                id=f"i{i}",
                input_ids=rng.integers(1, VOCAB, t).astype(np.int64),
                action_mask=action,
                step_ids=steps.astype(np.int64),
                n_steps=3,
            )
        )
    return out


def _reference_factors(model, items, config):
    """Per item: hooks record raw x [T, in] and g [T, out]; project and sum outer products."""
    tracked = tracked_modules(model, config.modules)
    k = factorized_k(config.proj_dim, len(tracked))
    acc = {t.name: [np.zeros((k, k)), np.zeros((k, k))] for t in tracked}
    n = 0
    for item in items:
        xs, gs, handles = {}, {}, []
        for t in tracked:

            def fwd(mod, inp, out, name=t.name, xs=xs, gs=gs):
                xs[name] = inp[0][0].detach().double()
                out.register_hook(lambda g: gs.__setitem__(name, g[0].detach().double()))

            handles.append(t.module.register_forward_hook(fwd))
        ids = torch.from_numpy(item.input_ids)
        try:
            logits = model(ids[None], use_cache=False).logits[0]
            (nll_of(logits, ids) * token_weights(item)).sum().backward()
        finally:
            for h in handles:
                h.remove()
        model.zero_grad()
        for t in tracked:
            p_in, p_out = (
                p.double()
                for p in factorized_pair(config.seed, t.name, k, t.in_features, t.out_features)
            )
            for pos in range(len(ids)):
                xt, gt = p_in @ xs[t.name][pos], p_out @ gs[t.name][pos]
                acc[t.name][0] += np.outer(xt, xt)
                acc[t.name][1] += np.outer(gt, gt)
        n += len(ids)
    return {name: (a / n, g / n) for name, (a, g) in acc.items()}


def test_factors_match_slow_reference():
    model, items = tiny_model("llama"), _items()
    got = kfac_factors(model, items, CFG)
    ref = _reference_factors(model, items, CFG)
    assert list(got) == [t.name for t in tracked_modules(model, None)]  # feature order
    for name, (a, g) in ref.items():
        assert got[name][0].shape == (3, 3)
        np.testing.assert_allclose(got[name][0], a, rtol=1e-4, atol=1e-6 * np.abs(a).max())
        np.testing.assert_allclose(got[name][1], g, rtol=1e-4, atol=1e-6 * np.abs(g).max())
    # a small batch budget (one item per batch) gives the same sums
    one = kfac_factors(model, items, replace(CFG, batch_tokens=1))
    for name in got:
        np.testing.assert_allclose(one[name][1], got[name][1], rtol=1e-4, atol=1e-9)


def test_sample_and_errors():
    model, items = tiny_model("llama"), _items(6)
    sub = kfac_factors(model, items, CFG, max_items=2, seed=1)
    pick = np.sort(np.random.default_rng(1).choice(6, 2, replace=False))
    ref = kfac_factors(model, [items[i] for i in pick], CFG)
    for name in sub:
        np.testing.assert_allclose(sub[name][0], ref[name][0], rtol=1e-6)
    with pytest.raises(TrajinfError, match="mode"):
        kfac_factors(model, items, ExtractionConfig(mode="less", proj_dim=64))
    with pytest.raises(TrajinfError, match="factors"):
        score_features(np.ones((2, 126)), np.ones((1, 126)), ScoreConfig(preconditioner="kfac"))
    bad = {"a": (np.eye(2), np.eye(2))}
    with pytest.raises(TrajinfError, match="feature dim"):
        kfac_precondition(np.ones((1, 5)), bad, 0.1)


def _dense_inverse(factors, damping):
    """Block-diagonal D x D H^-1 from kron((A + lA I)^-T, (G + lG I)^-1) acting on vec(F)
    (column-major vec of each k_out x k_in block), mapped back to the row-major layout."""
    blocks = []
    for a, g in factors.values():
        k = a.shape[0]
        ai = np.linalg.inv(a + damping * np.trace(a) / k * np.eye(k))
        gi = np.linalg.inv(g + damping * np.trace(g) / k * np.eye(k))
        kr = np.kron(ai.T, gi)  # vec_c(Gi F Ai) = kron(Ai^T, Gi) vec_c(F)
        perm = np.arange(k * k).reshape(k, k).T.reshape(-1)  # row-major index -> column-major
        blocks.append(kr[np.ix_(perm, perm)])
    d = sum(b.shape[0] for b in blocks)
    out, o = np.zeros((d, d)), 0
    for b in blocks:
        out[o : o + len(b), o : o + len(b)] = b
        o += len(b)
    return out


def _scores(res, qids):
    table = res.trajectories.set_index("id")
    return np.stack([table[f"score_{q}"].to_numpy() for q in qids], 1)


def test_score_matches_dense_kronecker():
    model, items = tiny_model("llama"), _items(6)
    factors = kfac_factors(model, items, CFG)
    feats = np.stack([f.trajectory for f in extract_features(model, items, CFG)])
    pool, target, qids = feats[:4], feats[4:], ["q0", "q1"]
    h_inv = _dense_inverse(factors, 0.1)
    pre = target.astype(np.float64) @ h_inv.T  # [M, D]: H^-1 t per target
    for metric in ("inner", "cosine"):
        cfg = ScoreConfig(metric=metric, preconditioner="kfac", kfac_damping=0.1)
        got = _scores(score_features(pool, target, cfg, subtasks=qids, kfac=factors), qids)
        p, t = pool.astype(np.float64), pre
        if metric == "cosine":
            p = p / np.linalg.norm(p, axis=1, keepdims=True)
            t = t / np.linalg.norm(t, axis=1, keepdims=True)
        want = p @ t.T
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5 * np.abs(want).max())
    # per checkpoint: one factor set per checkpoint
    two = score_features(
        [pool, pool], [target, target], ScoreConfig(metric="inner", preconditioner="kfac"),
        subtasks=qids, kfac=[factors, factors], lr=[1.0, 1.0],
    )  # fmt: skip
    np.testing.assert_allclose(_scores(two, qids), 2 * (pool @ pre.T), rtol=2e-4, atol=1e-6)


def test_identity_factors_reduce_to_plain_inner_product():
    rng = np.random.default_rng(0)
    k, layers = 3, 2
    pool = rng.normal(size=(5, layers * k * k)).astype(np.float32)
    target = rng.normal(size=(2, layers * k * k)).astype(np.float32)
    ident = {f"l{i}": (np.eye(k), np.eye(k)) for i in range(layers)}
    qids = ["a", "b"]
    for metric in ("inner", "cosine"):
        plain = _scores(
            score_features(pool, target, ScoreConfig(metric=metric), subtasks=qids), qids
        )
        cfg = ScoreConfig(metric=metric, preconditioner="kfac", kfac_damping=0.0)
        got = _scores(score_features(pool, target, cfg, subtasks=qids, kfac=ident), qids)
        np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)
    # damping 0.1 on identity factors: lambda = 0.1 on each side, a uniform 1 / 1.1^2
    cfg = ScoreConfig(metric="inner", preconditioner="kfac", kfac_damping=0.1)
    got = _scores(score_features(pool, target, cfg, subtasks=qids, kfac=ident), qids)
    plain = _scores(score_features(pool, target, ScoreConfig(metric="inner"), subtasks=qids), qids)
    np.testing.assert_allclose(got, plain / 1.21, rtol=1e-5, atol=1e-6)
