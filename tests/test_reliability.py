"""Never lose work: SIGKILL + resume, determinism, corrupted shards, mismatch guards,
non-finite items, no pickle, no remote code."""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from trajinf.data.tokenize import tokenize_pool
from trajinf.data.trajectories import load_pool
from trajinf.data.write import write_pool
from trajinf.errors import StoreMismatchError
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import extract_features
from trajinf.job.config import build_job_config
from trajinf.job.run import extract_job, score_pool
from trajinf.models.checkpoints import load_model
from trajinf.selection.select import select
from trajinf.store.feature_store import FeatureStore

SRC = Path(__file__).resolve().parents[1] / "src" / "trajinf"
KILLS = 4  # SIGKILLs per kill test
FP32_ROW_RTOL = 1e-5  # docs/operations.md: features across batch sizes, relative L2 per row


def config(**kw):
    cfg = build_job_config(proj_dim=64, **kw)
    cfg.shard_items = 1
    cfg.device = "cpu"
    cfg.null_directions = 8
    return cfg


@pytest.fixture(scope="module")
def job(tmp_path_factory, make_tiny_job):
    """pool (20), target (3), a tiny model, and an uninterrupted reference extraction + scoring."""
    d = tmp_path_factory.mktemp("rel")
    make_tiny_job(d)
    t0 = time.perf_counter()
    score_pool(d / "model", d / "pool.jsonl", d / "target.jsonl", d / "ref", config=config())
    return d, time.perf_counter() - t0


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _child(fn, *args) -> None:
    code = 0
    try:
        fn(*args)
    except BaseException:
        code = 1
    os._exit(code)


def _extract(d: Path, out: Path) -> None:
    extract_job(d / "model", d / "pool.jsonl", out, target=d / "target.jsonl", config=config())


def _score(d: Path, out: Path) -> None:
    score_pool(d / "model", d / "pool.jsonl", d / "target.jsonl", out, config=config())


def _shard_count(out: Path) -> int:
    return len(list((out / "store" / "pool").glob("ckpt-0/features-*.npy")))


def _check_store_whole(out: Path) -> None:
    """After any kill the store opens, every recorded shard checks out, rows are unique."""
    p = out / "store" / "pool"
    if not (p / "manifest.json").exists():
        return
    st = FeatureStore.open(p)
    assert st.verify() == []
    rows = st.items["row"].to_numpy()
    assert np.array_equal(rows, np.arange(len(rows)))
    assert not st.items.duplicated(["id", "step"]).any()


def test_extraction_survives_sigkill_and_resumes_byte_identical(job):
    d, _ = job
    out = d / "killed-extract"
    rng = np.random.default_rng(7)
    n_shards = 20  # 20 trajectories / shard_items 1
    ctx = mp.get_context("fork")
    kills = 0
    for _ in range(KILLS):
        have = _shard_count(out)
        if have >= n_shards - 1:
            break
        goal = min(have + int(rng.integers(1, 5)), n_shards - 1)
        proc = ctx.Process(target=_child, args=(_extract, d, out))
        proc.start()
        deadline = time.monotonic() + 60
        while proc.is_alive() and _shard_count(out) < goal and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0, 0.03)))  # land inside a shard write, sometimes
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.join()
        _check_store_whole(out)
    assert kills >= 3
    _extract(d, out)  # resume to the end
    ref = tree_bytes(d / "ref" / "store")
    assert tree_bytes(out / "store") == ref


def test_scoring_survives_sigkill_with_atomic_outputs(job):
    d, ref_seconds = job
    out = d / "killed-score"
    rng = np.random.default_rng(11)
    ctx = mp.get_context("fork")
    kills = 0
    # each resumed run has less left to do, so kill early in the reference time: a run that
    # finishes before its kill leaves nothing more to interrupt (the loop then stops)
    for _ in range(KILLS - 1):
        proc = ctx.Process(target=_child, args=(_score, d, out))
        proc.start()
        proc.join(float(rng.uniform(0.1, 0.45)) * ref_seconds)
        killed = proc.is_alive()
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.join()
        _check_store_whole(out)
        for f in out.glob("*.parquet"):
            pd.read_parquet(f)  # whole or absent, never half-written
        if not killed:
            break
    assert kills >= 2
    _score(d, out)
    for name in ("scores.parquet", "step_scores.parquet", "statistics.parquet"):
        assert (out / name).read_bytes() == (d / "ref" / name).read_bytes(), name
    assert tree_bytes(out / "store") == tree_bytes(d / "ref" / "store")
    strip = lambda j: {k: v for k, v in j.items() if k != "timings"}  # noqa: E731
    job_a = json.loads((out / "job.json").read_text())
    assert strip(job_a) == strip(json.loads((d / "ref" / "job.json").read_text()))


def test_features_deterministic_across_runs_and_batch_sizes(job):
    d, _ = job
    model, tok = load_model(d / "model")
    toks = tokenize_pool(load_pool(d / "pool.jsonl"), tok, max_length=2048)

    def rows(batch_tokens: int) -> np.ndarray:
        fs = extract_features(model, toks, ExtractionConfig(proj_dim=64, batch_tokens=batch_tokens))
        return np.concatenate([np.concatenate([f.trajectory[None], f.steps]) for f in fs])

    a = rows(8192)
    assert np.array_equal(a, rows(8192))  # same inputs, same batches: bit for bit
    for bt in (600, 100_000):  # other batch compositions and padding
        b = rows(bt)
        rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30)
        assert rel.max() < FP32_ROW_RTOL, (bt, rel.max())


def test_damaged_shards_are_named_and_reextracted(job, tmp_path, caplog):
    d, _ = job
    out = tmp_path / "job"
    shutil.copytree(d / "ref" / "store", out / "store")
    shards = sorted((out / "store" / "pool" / "ckpt-0").glob("features-*.npy"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(shards[4].read_bytes())
    flipped[-5] ^= 0xFF
    shards[4].write_bytes(bytes(flipped))  # one bit-flipped value
    shards[6].unlink()  # lost
    with caplog.at_level(logging.WARNING):
        _extract(d, out)
    for bad in (shards[1], shards[4], shards[6]):
        assert any(bad.name in r.getMessage() for r in caplog.records), bad.name
    assert tree_bytes(out / "store") == tree_bytes(d / "ref" / "store")


def _retokenized(model_dir: Path) -> None:
    """Same vocabulary, different chat template text (renders the same): a new tokenizer."""
    _, tok = load_model(model_dir)
    tok.chat_template = tok.chat_template + "{# v2 #}"
    tok.save_pretrained(model_dir)


def _reweighted(model_dir: Path) -> None:
    model, _ = load_model(model_dir)
    with torch.no_grad():
        next(iter(model.parameters())).add_(1e-3)
    model.save_pretrained(model_dir)


@pytest.mark.parametrize(
    "change, key",
    [("model", "models"), ("tokenizer", "tokenizer"), ("seed", "extraction.seed"),
     ("modules", "modules")],
)  # fmt: skip
def test_store_refuses_another_model_tokenizer_seed_or_modules(job, tmp_path, change, key):
    d, _ = job
    shutil.copytree(d / "model", tmp_path / "model")  # so only `change` differs, not the path
    base = config()
    extract_job(tmp_path / "model", d / "pool.jsonl", tmp_path / "job", config=base)
    cfg = base
    if change == "model":
        _reweighted(tmp_path / "model")
    elif change == "tokenizer":
        _retokenized(tmp_path / "model")
    elif change == "seed":
        cfg = config(seed=1)
    else:
        cfg = config(modules=["*q_proj"])
    with pytest.raises(StoreMismatchError, match=re.escape(key)):
        extract_job(tmp_path / "model", d / "pool.jsonl", tmp_path / "job", config=cfg)


def _poisoned_pool(d: Path, tmp_path: Path):
    """The pool plus one copy of a trajectory whose action text holds a token no other item
    uses, and a copy of the model with NaN in that token's embedding (poisons only that item)."""
    pool = load_pool(d / "pool.jsonl")
    model, tok = load_model(d / "model")
    used = set().union(*(set(t.input_ids.tolist()) for t in tokenize_pool(pool, tok)))
    victim = copy.deepcopy(pool[0])
    victim.id, victim.raw = "poisoned", None
    act = next(m for m in victim.messages if m["role"] == "assistant")
    for cand in sorted(set(range(len(tok))) - used - set(tok.all_special_ids)):
        act["content"] = f"{act.get('content') or ''} {tok.decode([cand])}"
        if cand in tokenize_pool([victim], tok)[0].input_ids:
            break
    else:
        pytest.fail("no unused token to poison")
    with torch.no_grad():
        model.get_input_embeddings().weight[cand] = float("nan")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    write_pool([*pool, victim], tmp_path / "pool.jsonl")
    return tmp_path / "pool.jsonl", len(pool) + 1


def test_nonfinite_items_are_reported_and_never_selected(job, tmp_path):
    d, _ = job
    pool, n = _poisoned_pool(d, tmp_path)
    res = score_pool(tmp_path / "model", pool, d / "target.jsonl", tmp_path / "o", config=config())
    info = json.loads((tmp_path / "o" / "job.json").read_text())
    assert info["nonfinite"] == ["poisoned"]
    row = res.trajectories.set_index("id").loc["poisoned"]
    assert np.isnan(row["score"]) and not row["harmful"]
    others = res.trajectories[res.trajectories["id"] != "poisoned"]
    assert np.isfinite(others["score"]).all() and len(others) == n - 1
    sel = select("influence", res.trajectories, fraction=1.0, scores=res.trajectories)
    assert "poisoned" not in sel.ids and len(sel.ids) == n - 1


def _code_lines():
    for path in sorted(SRC.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            yield path, n, line


def test_no_pickle_anywhere_in_src():
    bad = []
    for path, n, line in _code_lines():
        if re.search(r"\bimport pickle\b|\bpickle\.|allow_pickle\s*=\s*True|\bcloudpickle\b", line):
            bad.append(f"{path}:{n}")
        if "torch.load(" in line and "weights_only=True" not in line:
            bad.append(f"{path}:{n}")
    assert not bad, bad


def test_remote_code_only_on_request():
    on = [f"{p}:{n}" for p, n, line in _code_lines() if re.search(r"remote_code\s*=\s*True", line)]
    assert not on, on
    from trajinf.job.config import ScoreJobConfig

    assert ScoreJobConfig().trust_remote_code is False
