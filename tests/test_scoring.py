"""Scoring against a naive loop reference; additivity; chunking; streaming top-k; stores."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trajinf.errors import StoreMismatchError, TrajinfError
from trajinf.scoring.directions import prepare_directions, target_directions
from trajinf.scoring.scores import score_features, score_stores, top_k
from trajinf.scoring.source import PoolSource, ScoreConfig
from trajinf.store.feature_store import FeatureStore


def synth(seed: int, n=7, d=5, c=2, m=6, max_steps=3):
    """Pool whose trajectory features are exactly the sums of their step features."""
    rng = np.random.default_rng(seed)
    n_steps = rng.integers(1, max_steps + 1, size=n)
    owner = np.repeat(np.arange(n), n_steps)
    steps = [rng.standard_normal((len(owner), d)).astype(np.float32) + 0.3 for _ in range(c)]
    traj = [np.zeros((n, d), np.float32) for _ in range(c)]
    for ci in range(c):
        np.add.at(traj[ci], owner, steps[ci])
    target = [rng.standard_normal((m, d)).astype(np.float32) for _ in range(c)]
    return {
        "traj": traj,
        "steps": steps,
        "owner": owner,
        "tokens": rng.integers(0, 5, size=len(owner)),
        "target": target,
        "subtasks": [["a", "b", "c"][j % 3] for j in range(m)],
        "success": [j % 2 == 0 for j in range(m)],
        "reward": rng.uniform(size=m).round(1).tolist(),
        "groups": [f"g{j // 3}" for j in range(m)],
        "lr": [0.5, 2.0][:c],
    }


def naive(s: dict, cfg: ScoreConfig) -> tuple[np.ndarray, list[float]]:
    """Loop reference: per-trajectory scores [N] and raw per-step scores [K]."""
    traj, steps, target, owner = s["traj"], s["steps"], s["target"], s["owner"]
    n, d = traj[0].shape
    m = len(target[0])
    labels = s["subtasks"]
    # per-subtask target weights w[s][j] so that dir_s = sum_j w_j * t_j
    if cfg.target_mode == "subtask":
        w = {
            a: [(1 / labels.count(a)) if labels[j] == a else 0 for j in range(m)]
            for a in set(labels)
        }
    elif cfg.target_mode == "success_minus_failure":
        w = {}
        for a in set(labels):
            ns = sum(1 for j in range(m) if labels[j] == a and s["success"][j])
            nf = sum(1 for j in range(m) if labels[j] == a and not s["success"][j])
            if ns and nf:
                w[a] = [
                    (1 / ns if s["success"][j] else -1 / nf) if labels[j] == a else 0
                    for j in range(m)
                ]
    else:
        adv = []
        for j in range(m):
            grp = [s["reward"][i] for i in range(m) if s["groups"][i] == s["groups"][j]]
            sd = np.std(grp)
            adv.append((s["reward"][j] - np.mean(grp)) / sd if sd > 1e-8 else 0.0)
        w = {
            a: [adv[j] / labels.count(a) if labels[j] == a else 0 for j in range(m)]
            for a in set(labels)
        }
    names = sorted(w)
    per = np.zeros((n, len(names)))
    step_per = np.zeros((len(owner), len(names)))
    for c, lr in enumerate(s["lr"]):
        x = traj[c].astype(np.float64)
        mu = x.mean(0) if cfg.remove_mean else np.zeros(d)
        tok = np.asarray(s["tokens"], float)
        share = np.zeros(len(owner))
        for k in range(len(owner)):
            tot = tok[owner == owner[k]].sum()
            share[k] = tok[k] / tot if tot > 0 else 1 / (owner == owner[k]).sum()
        t = target[c].astype(np.float64)
        if cfg.metric == "cosine":
            t = t / np.linalg.norm(t, axis=1, keepdims=True)
        if cfg.preconditioner == "gram":
            xc = x - mu
            f = xc.T @ xc / n
            f += cfg.gram_damping * np.trace(f) / d * np.eye(d)
            t = np.linalg.solve(f, t.T).T
        for i, (si, a) in itertools.product(range(n), enumerate(names)):
            p = x[i] - mu
            nrm = np.linalg.norm(p) if cfg.metric == "cosine" else 1.0
            per[i, si] += lr * sum(w[a][j] * (p @ t[j]) for j in range(m)) / nrm
            for k in np.nonzero(owner == i)[0]:
                q = steps[c][k] - share[k] * mu
                step_per[k, si] += lr * sum(w[a][j] * (q @ t[j]) for j in range(m)) / nrm
    if cfg.aggregate == "max":
        best = per.argmax(1)
        return per.max(1), step_per[np.arange(len(owner)), best[owner]]
    return per.mean(1), step_per.mean(1)


def run(s: dict, cfg: ScoreConfig):
    return score_features(
        s["traj"], s["target"], cfg, subtasks=s["subtasks"], pool_steps=s["steps"],
        step_owner=s["owner"], step_tokens=s["tokens"], success=s["success"],
        reward=s["reward"], groups=s["groups"], lr=s["lr"],
    )  # fmt: skip


CONFIGS = [
    ScoreConfig(metric=m, aggregate=a, remove_mean=r, target_mode=t, preconditioner=p)
    for m, a, r, t, p in itertools.product(
        ["cosine", "inner"],
        ["max", "mean"],
        [False, True],
        ["subtask", "success_minus_failure", "advantage"],
        ["none", "gram"],
    )
]


@pytest.mark.parametrize(
    "cfg",
    CONFIGS,
    ids=lambda c: (
        f"{c.metric}-{c.aggregate}-rm{int(c.remove_mean)}-{c.target_mode}-{c.preconditioner}"
    ),
)
def test_matches_naive_reference(cfg):
    s = synth(1)
    res = run(s, cfg)
    ref, ref_steps = naive(s, cfg)
    np.testing.assert_allclose(res.trajectories["score"], ref, rtol=2e-4, atol=1e-5)
    # steps: the additive remainder is only float rounding here (traj == sum of steps)
    np.testing.assert_allclose(res.steps["score"], ref_steps, rtol=1e-3, atol=1e-4)
    sums = res.steps.groupby("id", sort=False)["score"].sum()
    np.testing.assert_allclose(sums.to_numpy(), res.trajectories["score"], rtol=1e-5, atol=1e-6)


def test_single_checkpoint_plain_array_and_columns():
    s = synth(2, c=1)
    res = score_features(s["traj"][0], s["target"][0], ScoreConfig(), subtasks=s["subtasks"],
                         pool_steps=s["steps"][0], step_owner=s["owner"])  # fmt: skip
    t = res.trajectories
    assert {"score_a", "score_b", "score_c", "best_subtask", "min_step_score"} <= set(t.columns)
    np.testing.assert_allclose(
        t["score"], t[["score_a", "score_b", "score_c"]].max(axis=1), rtol=1e-6
    )
    assert (t["best_subtask"] == t[["score_a", "score_b", "score_c"]].idxmax(axis=1).str[6:]).all()
    mins = res.steps.groupby("id", sort=False)["score"].min().to_numpy()
    np.testing.assert_allclose(t["min_step_score"], mins)
    assert res.steps["step"].tolist() == [
        k for i in range(7) for k in range((s["owner"] == i).sum())
    ]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 6),
    c=st.integers(1, 3),
    metric=st.sampled_from(["cosine", "inner"]),
    aggregate=st.sampled_from(["max", "mean"]),
    remove_mean=st.booleans(),
    pre=st.sampled_from(["none", "gram"]),
    chunk=st.integers(1, 8),
)
def test_steps_sum_to_trajectory(seed, n, c, metric, aggregate, remove_mean, pre, chunk):
    s = synth(seed, n=n, c=c, d=4, max_steps=4)
    s["lr"] = list(np.random.default_rng(seed).uniform(0.1, 2, size=c))
    cfg = ScoreConfig(metric=metric, aggregate=aggregate, remove_mean=remove_mean,
                      preconditioner=pre, chunk_rows=chunk)  # fmt: skip
    res = run(s, cfg)
    sums = res.steps.groupby("id", sort=False)["score"].sum().to_numpy()
    score = res.trajectories["score"].to_numpy()
    np.testing.assert_allclose(sums, score, rtol=1e-5, atol=1e-5 * (1 + np.abs(score).max()))
    # traj == sum of steps, so nothing needed redistributing beyond float rounding (relative
    # to the step scores, which can be large and cancel, e.g. gram with a one-item pool)
    scale = 1 + np.abs(res.steps["score"]).max()
    assert np.abs(res.trajectories["additivity_residual"]).max() <= 1e-4 * scale


def test_residual_redistributed_when_not_additive():
    s = synth(3, c=1)
    s["traj"][0][0] += 5.0  # e.g. LESS mode: trajectory feature != sum of step features
    res = run(s, ScoreConfig())
    sums = res.steps.groupby("id", sort=False)["score"].sum().to_numpy()
    np.testing.assert_allclose(sums, res.trajectories["score"], rtol=1e-5, atol=1e-6)
    assert abs(res.trajectories["additivity_residual"].iloc[0]) > 1e-3


def test_chunked_equals_unchunked():
    s = synth(4, n=23, m=9)
    for cfg in CONFIGS[::5]:
        a = run(s, cfg)
        b = run(s, ScoreConfig(**{**cfg.__dict__, "chunk_rows": 4}))
        np.testing.assert_allclose(
            a.trajectories["score"], b.trajectories["score"], rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(a.steps["score"], b.steps["score"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 40, 100])
def test_streaming_top_k_equals_full_sort(k):
    s = synth(5, n=60, c=2)
    cfg = ScoreConfig(chunk_rows=7, remove_mean=True)
    pool = PoolSource.from_arrays(s["traj"], steps=s["steps"], step_owner=s["owner"], lr=s["lr"])
    dirs = prepare_directions(
        pool, target_directions(s["target"], cfg, subtasks=s["subtasks"], lr=s["lr"]), cfg
    )
    got = top_k(pool, dirs, cfg, k)
    full = run(s, cfg).trajectories.sort_values("score", ascending=False, kind="stable")
    assert got["id"].tolist() == full["id"].tolist()[:k]
    np.testing.assert_allclose(got["score"], full["score"].to_numpy()[:k], rtol=1e-6)


def test_nonfinite_items_and_bad_targets():
    s = synth(6, c=1)
    pool = PoolSource.from_arrays(s["traj"], steps=s["steps"], step_owner=s["owner"],
                                  finite=np.array([True] * 6 + [False]))  # fmt: skip
    cfg = ScoreConfig()
    dirs = target_directions(s["target"], cfg, subtasks=s["subtasks"])
    from trajinf.scoring.scores import score_tables

    res = score_tables(pool, dirs, cfg)
    assert (
        np.isnan(res.trajectories["score"].iloc[-1])
        and res.trajectories["score"].iloc[:-1].notna().all()
    )
    assert top_k(pool, dirs, cfg, 10)["id"].tolist().count("6") == 0
    with pytest.raises(TrajinfError, match="success"):
        target_directions(s["target"], ScoreConfig(target_mode="success_minus_failure"),
                          subtasks=s["subtasks"], success=[True] * 6)  # fmt: skip
    with pytest.raises(TrajinfError, match="metric"):
        ScoreConfig(metric="euclid")


def _write(path, traj, steps, owner, lr, extra):
    fs = FeatureStore.create(path, fingerprint={"model_fingerprint": "m"}, dim=traj[0].shape[1],
                             checkpoints=[{"path": f"c{i}", "lr": x} for i, x in enumerate(lr)])  # fmt: skip
    rows, order = [], []
    for i in range(len(traj[0])):
        rows.append({"id": f"t{i}", "step": -1, "item": i, **extra(i)})
        order.append(("t", i))
        for j, k in enumerate(np.nonzero(owner == i)[0]):
            rows.append({"id": f"t{i}", "step": j, "item": i, "n_action_tokens": 2})
            order.append(("s", k))
    df = pd.DataFrame(rows)
    for c in range(len(lr)):
        f = np.stack([traj[c][i] if kind == "t" else steps[c][i] for kind, i in order])
        half = len(df) // 2  # two shards, splitting some item's rows across them
        fs.write_shard(c, 0, df.iloc[:half], f[:half])
        fs.write_shard(c, 1, df.iloc[half:], f[half:])
    return fs


def test_score_stores_matches_arrays(tmp_path):
    s = synth(7, n=9, c=2)
    lr = [1e-3, 3e-3]
    pool = _write(tmp_path / "p", s["traj"], s["steps"], s["owner"], lr, lambda i: {})
    no = np.zeros(0, int)
    target = _write(tmp_path / "t", s["target"], [np.zeros((0, 5))] * 2, no, lr,
                    lambda j: {"subtask": s["subtasks"][j], "task_id": s["groups"][j],
                               "success": s["success"][j], "reward": s["reward"][j]})  # fmt: skip
    for mode in ["subtask", "success_minus_failure", "advantage"]:
        cfg = ScoreConfig(target_mode=mode, remove_mean=True, chunk_rows=4)
        res = score_stores(pool, target, cfg)
        # reference on the float16-rounded features the store holds
        r16 = {k: s[k] for k in s}
        for key in ("traj", "steps", "target"):
            r16[key] = [a.astype(np.float16).astype(np.float32) for a in s[key]]
        r16["lr"], r16["tokens"] = lr, np.full(len(s["owner"]), 2)
        ref = run(r16, cfg)
        np.testing.assert_allclose(
            res.trajectories["score"], ref.trajectories["score"], rtol=1e-4, atol=1e-9
        )
        assert res.trajectories["id"].tolist() == [f"t{i}" for i in range(9)]
        sums = res.steps.groupby("id", sort=False)["score"].sum().to_numpy()
        np.testing.assert_allclose(sums, res.trajectories["score"], rtol=1e-4, atol=1e-9)
    other = _write(tmp_path / "o", [t[:, :4] for t in s["traj"]], [st_[:, :4] for st_ in s["steps"]],
                   s["owner"], lr, lambda i: {})  # fmt: skip
    with pytest.raises(StoreMismatchError, match="dim"):
        score_stores(pool, other, ScoreConfig())


@pytest.mark.parametrize(
    "metric, remove_mean, pre", [("cosine", True, "gram"), ("inner", False, "none")]
)
def test_workers_give_identical_scores_and_top_k(tmp_path, metric, remove_mean, pre):
    """Blocks scored on a thread pool: bit-identical to the serial path (scores, steps,
    directions) and the same streaming top-k."""
    s = synth(3, n=40, d=16, c=2, m=6)
    lr = [1e-3, 3e-3]
    pool = _write(tmp_path / "p", s["traj"], s["steps"], s["owner"], lr, lambda i: {})
    no = np.zeros(0, int)
    target = _write(tmp_path / "t", s["target"], [np.zeros((0, 16))] * 2, no, lr,
                    lambda j: {"subtask": s["subtasks"][j]})  # fmt: skip
    kw = dict(metric=metric, remove_mean=remove_mean, preconditioner=pre, chunk_rows=7)
    serial = score_stores(pool, target, ScoreConfig(**kw))
    for workers in (2, 4):
        par = score_stores(pool, target, ScoreConfig(**kw, workers=workers))
        pd.testing.assert_frame_equal(par.trajectories, serial.trajectories)
        pd.testing.assert_frame_equal(par.steps, serial.steps)
        for a, b in zip(par.directions.vectors, serial.directions.vectors, strict=True):
            np.testing.assert_array_equal(a, b)
        pd.testing.assert_frame_equal(
            top_k(pool, target, ScoreConfig(**kw, workers=workers), 5),
            top_k(pool, target, ScoreConfig(**kw), 5),
        )
    with pytest.raises(TrajinfError, match="'workers'"):
        ScoreConfig(workers=0)


def test_cli_score_has_workers_option():
    from typer.testing import CliRunner

    from trajinf.cli.main import app

    out = CliRunner().invoke(app, ["score", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--workers" in out.output


def _many_shard_store(path, n=50, d=8, shard=40, seed=11, dup=None):
    """One-checkpoint store of n trajectories with 0-2 steps each, in shards of ``shard`` rows;
    trajectory 7 is non-finite; ``dup=(i, j)`` gives trajectory j the id of trajectory i."""
    rng = np.random.default_rng(seed)
    fs = FeatureStore.create(path, fingerprint={"model_fingerprint": "m"}, dim=d,
                             checkpoints=[{"path": "c0", "lr": 1.0}])  # fmt: skip
    rows = []
    for i in range(n):
        name = f"t{dup[0]}" if dup and i == dup[1] else f"t{i}"
        rows += [{"id": name, "step": s, "finite": i != 7} for s in range(-1, int(rng.integers(3)))]
    df = pd.DataFrame(rows)
    feats = rng.standard_normal((len(df), d)).astype(np.float32)
    feats[(df["id"] == "t7").to_numpy()] = 0.0
    for a in range(0, len(df), shard):
        fs.append(df.iloc[a : a + shard], [feats[a : a + shard]])
    return FeatureStore.open(path)


@pytest.mark.parametrize("chunk, workers", [(4, 1), (13, 2), (1000, 1)])
def test_store_top_k_streams_rows_and_reads_ids_of_winners_only(
    tmp_path, monkeypatch, chunk, workers
):
    """Top-k from a store scans row numbers and scores (blocks crossing shards), reads no
    items table whole and no per-row frame, maps only the k winners to ids, and returns
    exactly what the PoolSource path returns."""
    import trajinf.scoring.scores as scoring

    store = _many_shard_store(tmp_path / "p")
    assert len(store.shards(0)) >= 3
    rng = np.random.default_rng(0)
    dirs = target_directions(rng.standard_normal((3, 8)).astype(np.float32), ScoreConfig(),
                             subtasks=["a", "b", "a"])  # fmt: skip
    cfg = ScoreConfig(chunk_rows=chunk, workers=workers)
    expect = {k: top_k(PoolSource.from_store(FeatureStore.open(store.path)), dirs, cfg, k)
              for k in (1, 5, 60)}  # fmt: skip
    asked = []
    real_ids = scoring.store_ids
    monkeypatch.setattr(scoring, "store_ids", lambda s, r: asked.append(len(r)) or real_ids(s, r))
    monkeypatch.setattr(PoolSource, "from_store", lambda s: pytest.fail("PoolSource built"))
    monkeypatch.setattr(FeatureStore, "items", property(lambda s: pytest.fail("items read")))
    for k, want in expect.items():
        got = top_k(store, dirs, cfg, k)
        pd.testing.assert_frame_equal(got, want)
    assert "t7" not in got["id"].tolist() and len(got) == 49  # non-finite never selected
    assert asked == [1, 5, 49]  # ids looked up for the winners only
    assert all(store._parts.loaded(s) is None for s in store._parts)  # no table read whole


def test_store_top_k_with_a_repeated_id_matches_pool_source(tmp_path):
    """A later trajectory row repeating an earlier id is not scored by PoolSource.from_store
    (first row wins); the streaming path must give the same top-k, also when that row would
    have won."""
    rng = np.random.default_rng(1)
    dirs = target_directions(rng.standard_normal((2, 8)).astype(np.float32), ScoreConfig())
    for dup in [(3, 40), (40, 3)]:
        store = _many_shard_store(tmp_path / f"p{dup[1]}", dup=dup)
        for k in (1, 3, 49):
            want = top_k(
                PoolSource.from_store(FeatureStore.open(store.path)), dirs, ScoreConfig(), k
            )
            pd.testing.assert_frame_equal(top_k(store, dirs, ScoreConfig(), k), want)


def test_store_reads_leave_no_shard_mapped(tmp_path):
    """Each read maps its shard and unmaps it after: pages read stay out of RSS, whatever
    the store's size (a map kept per shard held every page ever read)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    store = _many_shard_store(tmp_path / "p")
    rows = np.arange(store.manifest["n_rows"])
    full = store.features(0, rows)
    assert "features-" not in maps.read_text()
    np.testing.assert_array_equal(full[::-1], store.features(0, rows[::-1]))
    np.testing.assert_array_equal(np.concatenate([b for _, b in store.iter_chunks(0, 7)]), full)
    assert "features-" not in maps.read_text()


def test_preconditioner_registry_names_each_once_with_its_stage():
    from trajinf.errors import literal_choices
    from trajinf.gradients.config import EXTRACTION_PRECONDITIONERS, ExtractionConfig
    from trajinf.scoring.preconditioners import PRECONDITIONERS, Gram, Kfac, Preconditioner

    assert set(PRECONDITIONERS) == {"none", "adam", "factored_adam", "gram", "kfac"}
    stage = {n: r.stages for n, r in PRECONDITIONERS.items()}
    assert stage["adam"] == stage["factored_adam"] == ("extraction",)
    assert stage["gram"] == stage["kfac"] == ("scoring",)
    hints = __import__("typing").get_type_hints
    assert set(literal_choices(hints(ScoreConfig)["preconditioner"])) == {"none", "gram", "kfac"}
    ext = literal_choices(hints(ExtractionConfig)["preconditioner"])
    assert set(ext) == set(EXTRACTION_PRECONDITIONERS) == {"none", "adam", "factored_adam"}
    assert PRECONDITIONERS["kfac"].modes == ("factorized",)
    assert PRECONDITIONERS["none"].cls is Preconditioner
    assert PRECONDITIONERS["gram"].cls is Gram and PRECONDITIONERS["kfac"].cls is Kfac
    assert PRECONDITIONERS["adam"].cls is None  # applied inside gradients


def test_gram_preconditioner_against_dense_solve():
    """Gram.fit on pool moments + apply == (F + lambda I)^-1 u with F the (centered) feature
    covariance, by a dense float64 solve."""
    from trajinf.scoring.directions import pool_moments
    from trajinf.scoring.preconditioners import Gram

    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 6)).astype(np.float32) + 0.5
    u = rng.standard_normal((2, 6)).astype(np.float32)
    pool = PoolSource.from_arrays(x)
    for center in (False, True):
        cfg = ScoreConfig(preconditioner="gram", remove_mean=center, chunk_rows=7, workers=2)
        g = Gram(cfg.gram_damping, center=center)
        g.fit(0, pool_moments(pool, cfg, 0, second=True))
        xc = x.astype(np.float64) - (x.mean(0) if center else 0.0)
        f = xc.T @ xc / len(x)
        f += cfg.gram_damping * np.trace(f) / 6 * np.eye(6)
        np.testing.assert_allclose(g.apply(0, u), np.linalg.solve(f, u.T).T, rtol=1e-4)
        with pytest.raises(TrajinfError, match="before it was fit"):
            g.apply(1, u)
