"""docs/tutorial.md runs as written: its Python blocks, in order, in one namespace, in a directory
holding a tiny model/, pool.jsonl and target.jsonl (ToolWorld rollouts)."""

from __future__ import annotations

import json
import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("trl")

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"


def python_blocks(text: str, lang: str = "python") -> list[str]:
    """The fenced ```{lang} blocks of a markdown text, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_tutorial_is_about_twenty_lines_of_code():
    blocks = python_blocks(TUTORIAL.read_text())
    lines = [
        ln for b in blocks for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    assert len(blocks) == 4 and 15 <= len(lines) <= 25, lines


def test_tutorial_runs(tmp_path, make_tiny_job, monkeypatch):
    from typer.testing import CliRunner

    from trajinf.cli.main import app
    from trajinf.data.trajectories import load_pool
    from trajinf.models.checkpoints import load_checkpoint_state, load_model

    make_tiny_job(tmp_path, n_tasks=10)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL / transformers deprecation chatter
        for block in python_blocks(TUTORIAL.read_text()):
            exec(compile(block, str(TUTORIAL), "exec"), namespace)  # noqa: S102

    # 1. one checkpoint per epoch, each with moments and the lr it was trained with
    ckpts = namespace["warmup"].checkpoints
    assert [p.name for p in ckpts] == ["step-3", "step-6"]  # 20 trajectories, batch 8, 2 epochs
    for c in ckpts:
        state = load_checkpoint_state(c)
        assert state is not None and state.learning_rate > 0 and state.exp_avg
    # 2. + 3. scores with both checkpoints; a selection whose assistant messages carry weights
    job = json.loads((tmp_path / "scores" / "job.json").read_text())
    assert job["checkpoints"] == [str(c) for c in ckpts]
    selected = load_pool(tmp_path / "selected.jsonl")
    assert len(selected) == 5  # a quarter of 20
    weights = [m["weight"] for t in selected for m in t.messages if m["role"] == "assistant"]
    assert len(weights) == sum(len(t.steps()) for t in selected)
    # the shell line of step 2 (the callback's contract: `trajinf score --checkpoint DIR`) gives
    # the same scores
    (cli,) = python_blocks(TUTORIAL.read_text(), "bash")
    argv = shlex.split(cli.strip())
    assert argv[:2] == ["trajinf", "score"]
    argv[argv.index("--out") + 1] = "scores-cli"
    res = CliRunner().invoke(app, argv[1:])
    assert res.exit_code == 0, res.output
    a = pd.read_parquet(tmp_path / "scores" / "scores.parquet").set_index("id")["score"]
    b = pd.read_parquet(tmp_path / "scores-cli" / "scores.parquet").set_index("id")["score"]
    np.testing.assert_allclose(b.loc[a.index], a, rtol=0, atol=1e-7)
    # 4. the final model was trained on the selection (weights moved from the start)
    final, _ = load_model(tmp_path / "final-model")
    start, _ = load_model(tmp_path / "model")
    moved = [
        n
        for (n, a), (_, b) in zip(final.named_parameters(), start.named_parameters(), strict=True)
        if not a.detach().equal(b.detach())
    ]
    assert moved
