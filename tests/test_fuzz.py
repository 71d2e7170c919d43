"""Hostile inputs: loaders, tokenizer and CLI fail only with TrajinfError (one line, exit 2)."""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trajinf.data.tokenize import tokenize_pool, tokenize_trajectory
from trajinf.data.trajectories import load_pool, trajectory_from_messages
from trajinf.errors import TrajectoryFormatError, TrajinfError

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4),
    max_leaves=15,
)
ROLES = ["system", "user", "assistant", "tool", "function", "observation", "gpt", "human", "x"]
call_ids = st.sampled_from(["c1", "c2", "c1 "]) | json_values  # few ids, so they get reused
tool_call = st.fixed_dictionaries(
    {"id": call_ids, "type": st.sampled_from(["function", "other"]) | json_values,
     "function": st.fixed_dictionaries({"name": text | json_values,
                                        "arguments": text | json_values})},
)  # fmt: skip
message = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES) | json_values, "content": text | json_values},
    optional={"tool_calls": st.lists(tool_call, max_size=3) | json_values,
              "tool_call_id": call_ids, "weight": json_values | st.floats(),
              "from": st.sampled_from(ROLES), "value": text},
)  # fmt: skip
record = st.fixed_dictionaries(
    {},
    optional={"id": text | json_values, "messages": st.lists(message, max_size=6) | json_values,
              "conversations": st.lists(message, max_size=4) | json_values,
              "task_id": text | json_values, "success": json_values, "reward": json_values,
              "tools": json_values, "meta": json_values, "source": json_values},
)  # fmt: skip


def _load_text(data: str | bytes, suffix: str = ".jsonl"):
    """load_pool on a temp file holding ``data``; returns trajectories or the TrajinfError."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"pool{suffix}"
        p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return load_pool(p)
        except TrajinfError as e:
            assert str(e).strip() and "\n" not in str(e).strip()[:200]
            return e


@FUZZ
@given(st.lists(st.text(), max_size=5))
def test_random_unicode_lines(lines):
    _load_text("\n".join(lines))


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data):
    _load_text(data)
    _load_text(data, suffix=".json")


def _check_records(tokenizer, records: list) -> None:
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    out = _load_text(lines)
    if isinstance(out, list):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tokenize_pool(out, tokenizer, max_length=64)
        except TrajinfError:
            pass


@FUZZ
@given(st.lists(record, min_size=1, max_size=4))
def test_random_records_load_and_tokenize(chatml_tokenizer, records):
    _check_records(chatml_tokenizer, records)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record, min_size=1, max_size=4))
def test_random_records_load_and_tokenize_long_run(llama3_tokenizer, records):
    _check_records(llama3_tokenizer, records)


def _valid() -> dict:
    return {
        "id": "a",
        "task_id": "t",
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            {"role": "assistant", "content": "done"},
        ],
    }  # fmt: skip


PATHS = [("id",), ("messages",), ("messages", 0), ("messages", 1, "tool_calls"),
         ("messages", 1, "tool_calls", 0, "id"), ("messages", 1, "tool_calls", 0, "function"),
         ("messages", 2, "tool_call_id"), ("messages", 2, "content"), ("messages", 3, "role"),
         ("messages", 3, "content")]  # fmt: skip


@FUZZ
@given(st.sampled_from(PATHS), st.booleans(), json_values)
def test_valid_record_with_one_field_missing_or_wrong(chatml_tokenizer, path, drop, value):
    rec = _valid()
    node = rec
    for k in path[:-1]:
        node = node[k]
    if drop:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    out = _load_text(json.dumps(rec))
    if isinstance(out, list):
        try:
            tokenize_pool(out, chatml_tokenizer, max_length=64)
        except TrajinfError:
            pass


def test_reused_tool_call_id_is_named():
    rec = _valid()
    rec["messages"] += [rec["messages"][1], rec["messages"][2]]
    out = _load_text(json.dumps(rec))
    assert isinstance(out, TrajectoryFormatError) and "c1" in str(out)


def test_deeply_nested_json_is_a_format_error():
    deep = "[" * 200_000 + "]" * 200_000
    assert isinstance(_load_text(deep), TrajinfError)
    rec = '{"id": "a", "messages": [{"role": "user", "content": ' + deep + "}]}"
    assert isinstance(_load_text(rec), TrajinfError)
    assert isinstance(_load_text(deep, suffix=".json"), TrajinfError)


def test_ten_megabyte_lines_are_bounded(chatml_tokenizer):
    t0 = time.perf_counter()
    assert isinstance(_load_text("x" * 10_000_000), TrajinfError)
    rec = _valid()
    rec["messages"][3]["content"] = "word " * 2_000_000  # a 10 MB action
    out = _load_text(json.dumps(rec))
    assert isinstance(out, list) and len(out[0].messages[3]["content"]) == 10_000_000
    assert time.perf_counter() - t0 < 20


def _long(n_steps: int):
    msgs = [{"role": "user", "content": "go"}]
    for k in range(n_steps):
        msgs += [{"role": "assistant", "content": f"step {k}"}, {"role": "user", "content": "ok"}]
    return trajectory_from_messages(msgs, id="long")


def test_long_trajectory_is_truncated_with_warning(chatml_tokenizer):
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="dropped the first"):
        out = tokenize_trajectory(_long(150), chatml_tokenizer, max_length=128)
    assert out.dropped_steps > 0 and len(out.input_ids) <= 128
    assert out.step_ids.max() == 149  # original step ids survive truncation
    assert time.perf_counter() - t0 < 20


def _tokenize_10k(tok) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tokenize_trajectory(_long(10_000), tok, max_length=512)
    sys.exit(0 if out.dropped_steps > 9000 else 1)


@pytest.mark.slow
def test_ten_thousand_steps_tokenize_in_bounded_time(chatml_tokenizer):
    proc = mp.get_context("fork").Process(target=_tokenize_10k, args=(chatml_tokenizer,))
    proc.start()
    proc.join(60)
    alive = proc.is_alive()
    if alive:
        proc.kill()
        proc.join()
    assert not alive and proc.exitcode == 0


@pytest.mark.parametrize("content", ["{not json\n", '{"id": "a", "messages": []}\n', "[1]\n"])
def test_cli_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys, content):
    from trajinf.cli import main as cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    argv = ["trajinf", "score", "--model", str(tmp_path / "nomodel"), "--pool", str(bad),
            "--target", str(bad), "--out", str(tmp_path / "o")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    # one message; rich wraps it at the console width when stderr is not a terminal
    one = " ".join(line.strip() for line in err.splitlines())
    assert one.startswith("error:") and one.count("error:") == 1 and "Traceback" not in err
    assert "bad.jsonl:1" in one.replace(" ", "")
