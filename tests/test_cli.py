"""The CLI's job options come from the config dataclasses: names, choices, defaults and help
texts once, validation in the configs' ``__post_init__``, nothing edited after a build."""

from __future__ import annotations

import re
import sys
from dataclasses import fields

import pytest
from typer.testing import CliRunner

from trajinf.cli.extract import SCORING_ONLY, _forwarded
from trajinf.cli.main import app
from trajinf.errors import ConfigError, TrajinfError, literal_choices
from trajinf.gradients.config import ExtractionConfig
from trajinf.job.config import ScoreJobConfig, build_job_config, job_options
from trajinf.scoring.source import ScoreConfig


class Captured(Exception):
    """Raised by a patched job entry point, carrying the config the verb built."""

    def __init__(self, config):
        self.config = config


def _capture(monkeypatch, name):
    import trajinf.job.run as run

    def fake(*_a, config=None, **_k):
        raise Captured(config)

    monkeypatch.setattr(run, name, fake)


def _help(verb: str) -> str:
    out = CliRunner().invoke(app, [verb, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert out.exit_code == 0, out.output
    return out.output


def _flat(text: str) -> str:
    return "".join(text.split())  # help wraps at spaces and after hyphens


def test_every_config_field_is_an_option_or_hidden_on_purpose():
    table = job_options()
    by_field = {(o.owner, o.field) for o in table.values()}
    for owner in (ExtractionConfig, ScoreConfig, ScoreJobConfig):
        for f in fields(owner):
            if f.name in ("extraction", "scoring"):
                continue
            hidden = f.metadata.get("cli") is False
            assert hidden != ((owner, f.name) in by_field), (owner.__name__, f.name)
            assert hidden or f.metadata.get("help"), (owner.__name__, f.name)


def test_score_help_lists_every_option_with_its_help_choices_and_default():
    text = _help("score")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    flat = _flat(text)
    for opt in job_options().values():
        assert re.search(rf"^\s+{re.escape(opt.flag)}[ /<]", text, re.M), opt.flag
        assert _flat(opt.help) in flat, opt.flag
        choices = literal_choices(opt.type)
        if choices:
            assert all(str(c) in flat for c in choices if c is not None), opt.flag
    assert "[default:auto]" in flat  # --preconditioner resolves "auto"


def test_extract_help_has_the_extraction_options_only():
    text = _help("extract")
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for opt in job_options().values():
        present = re.search(rf"^\s+{re.escape(opt.flag)}[ /<]", text, re.M) is not None
        assert present == (opt.name not in SCORING_ONLY), opt.flag


def _score_args(tmp_path, *extra):
    return ["score", "--model", str(tmp_path / "m"), "--pool", str(tmp_path / "p.jsonl"),
            "--target", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o"), *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--workers", "0"], "--workers: must be >= 1, got 0"),
        (["--kfac-damping", "-1"], "--kfac-damping: must be >= 0"),
        (["--mode", "less", "--scoring-preconditioner", "kfac"], "--scoring-preconditioner"),
        (["--mode", "less", "--preconditioner", "factored_adam"], "--preconditioner"),
        (["--update-mask-from", "a"], "--update-mask-from: needs exactly two"),
    ],
)
def test_bad_option_is_one_line_error_exit_2(tmp_path, monkeypatch, capsys, extra, says):
    """Validated by the config's __post_init__ before anything is loaded; main() prints one
    line naming the option and exits 2 (no thread count silently falls back to 1)."""
    from trajinf.cli import main as cli

    _capture(monkeypatch, "score_pool")
    monkeypatch.setattr(sys, "argv", ["trajinf", *_score_args(tmp_path, *extra)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    one = " ".join(line.strip() for line in err.strip().splitlines())
    assert one.startswith("error:") and one.count("error:") == 1, err
    assert says in one


def test_bad_choice_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(app, _score_args(tmp_path, "--metric", "dot"))
    assert r.exit_code == 2 and "dot" in r.output


def test_score_builds_the_same_config_as_the_library(tmp_path, monkeypatch):
    _capture(monkeypatch, "score_pool")
    args = _score_args(
        tmp_path, "--checkpoint", str(tmp_path / "c1"), "--workers", "3", "--metric", "inner",
        "--scoring-preconditioner", "gram", "--no-baselines", "--update-mask-from", "a",
        "--update-mask-from", "b", "--update-mask-threshold", "0.01", "--max-length", "512",
        "--modules", "*q_proj", "--modules", "*v_proj",
    )  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert isinstance(r.exception, Captured), r.output
    want = build_job_config(
        has_checkpoints=True, workers=3, metric="inner", scoring_preconditioner="gram",
        baselines=False, update_mask_from=("a", "b"), update_mask_threshold=0.01, max_length=512,
        modules=["*q_proj", "*v_proj"],
    )  # fmt: skip
    assert r.exception.config == want
    assert want.extraction.preconditioner == "factored_adam"  # auto with checkpoints
    assert want.scoring.workers == 3


def test_extract_forwards_options_that_parse_back_to_the_same_config(tmp_path, monkeypatch):
    """The --distributed launcher re-parses the forwarded options in every worker: the round
    trip must give the parent's config (booleans both ways, repeated options, 'auto')."""
    _capture(monkeypatch, "extract_job")
    base = ["--model", "m", "--pool", "p.jsonl", "--out", "o"]
    args = ["extract", *base, "--lora", "--no-trust-remote-code", "--shard-items", "7",
            "--update-mask-from", "a", "--update-mask-from", "b", "--step-split", "loss"]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert isinstance(first.exception, Captured), first.output
    params = {"model": "m", "pool": "p.jsonl", "out": "o", "target": None, "checkpoint": [],
              "backend": None, "lora": True, "trust_remote_code": False, "shard_items": 7,
              "update_mask_from": ["a", "b"], "step_split": "loss", "preconditioner": "auto"}  # fmt: skip
    again = CliRunner().invoke(app, _forwarded(params))
    assert isinstance(again.exception, Captured), again.output
    assert again.exception.config == first.exception.config
    assert first.exception.config.lora and first.exception.config.shard_items == 7


def test_configs_validate_on_construction():
    with pytest.raises(ConfigError, match="'workers'") as e:
        ScoreConfig(workers=0)
    assert e.value.field == "workers"
    with pytest.raises(ConfigError, match="'metric'"):
        ScoreConfig(metric="dot")
    with pytest.raises(ConfigError, match="'preconditioner'"):
        ScoreJobConfig(
            extraction=ExtractionConfig(mode="less"), scoring=ScoreConfig(preconditioner="kfac")
        )
    with pytest.raises(ConfigError, match="'harmful_alpha'"):
        ScoreJobConfig(harmful_alpha=1.5)
    with pytest.raises(TrajinfError, match="unknown job option"):
        build_job_config(mettric="inner")


def test_cli_options_load_without_torch():
    """Building every verb's options (the configs' fields) imports no torch: `--help` and
    option errors stay fast."""
    import subprocess

    code = "import sys, trajinf.cli.main; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
