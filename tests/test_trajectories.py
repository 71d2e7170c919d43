"""Loaders, validation and lossless write-back of trajectory pools."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trajinf.data.schema import Trajectory
from trajinf.data.trajectories import field_value, load_pool, trajectory_from_messages
from trajinf.data.write import write_pool
from trajinf.errors import TrajectoryFormatError

DATA = Path(__file__).parent / "data"


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_load_openai_sample():
    pool = load_pool(DATA / "pool_openai.jsonl")
    assert [t.id for t in pool] == ["o-1", "o-2"]
    t = pool[0]
    assert (t.task_id, t.source, t.success, t.reward) == ("cook-0001", "expert", True, 1.0)
    assert t.extra == {"annotator": "bob"} and t.meta == {"family": "cook"}
    assert t.origin == (str(DATA / "pool_openai.jsonl"), 1) and t.format == "openai"
    call = t.messages[2]
    assert call["content"] == "" and call["note"] == "kept"
    # dict arguments are accepted and serialized to the OpenAI JSON-string form
    assert call["tool_calls"][0]["function"]["arguments"] == '{"target": "fridge"}'
    assert [(s.index, s.action, s.consequences) for s in t.steps()] == [(0, 2, [3]), (1, 4, [])]
    assert t.tools[0]["function"]["name"] == "open"


def test_load_sharegpt_jsonl():
    a, b = load_pool(DATA / "pool_sharegpt.jsonl")
    assert a.format == "sharegpt" and a.extra == {"license": "cc-by"}
    assert [m["role"] for m in a.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert a.messages[0]["content"] == "You are an agent."
    call = a.messages[2]["tool_calls"][0]
    assert call["id"] == "call_0" and call["function"]["name"] == "go"
    assert json.loads(call["function"]["arguments"]) == {"direction": "north"}
    assert a.messages[3] == {
        "role": "tool",
        "tool_call_id": "call_0",
        "content": "You see a key.",
    }
    assert a.tools[0]["function"]["name"] == "go"  # LLaMA-Factory JSON-string tools are parsed
    assert len(b.steps()) == 2 and b.tools is None


def test_json_list_without_ids_generates_ids_once():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pool = load_pool(DATA / "pool_sharegpt.json")
    assert [t.id for t in pool] == ["pool_sharegpt-000001", "pool_sharegpt-000002"]
    assert sum("generated" in str(x.message) for x in w) == 1
    assert pool[0].messages[0] == {"role": "system", "content": "Be brief."}


def test_hf_dataset_rows(tool_pool_records, write_jsonl, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(tool_pool_records)
    from_ds = load_pool(ds)
    from_file = load_pool(write_jsonl(tmp_path, tool_pool_records))
    assert [t.id for t in from_ds] == [t.id for t in from_file]
    for a, b in zip(from_ds, from_file, strict=True):
        # Arrow fills missing struct fields with None; those must not leak into messages
        assert a.messages == b.messages and a.tools == b.tools and a.meta == b.meta
    assert from_ds[2].origin == ("<dataset>", 3)
    sg = datasets.Dataset.from_list(_lines(DATA / "pool_sharegpt.jsonl")[1:])
    assert load_pool(sg)[0].messages[1] == {"role": "assistant", "content": "look"}


def test_round_trip_is_lossless(tmp_path):
    for name in ("pool_openai.jsonl", "pool_sharegpt.jsonl"):
        out = tmp_path / name
        pool = load_pool(DATA / name)
        write_pool(pool, out)
        assert _lines(out) == _lines(DATA / name)  # unknown fields, null content, dict args kept
        again = load_pool(out)
        assert [(t.id, t.messages, t.extra, t.tools) for t in again] == [
            (t.id, t.messages, t.extra, t.tools) for t in pool
        ]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_write_generated_ids_and_json_list(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pool = load_pool(DATA / "pool_sharegpt.json")
    write_pool(pool, tmp_path / "out.json")
    recs = json.loads((tmp_path / "out.json").read_text())
    assert [r["id"] for r in recs] == [t.id for t in pool]
    assert (
        recs[0]["conversations"]
        == json.loads((DATA / "pool_sharegpt.json").read_text())[0]["conversations"]
    )


def test_step_weights_land_on_kth_assistant(tmp_path):
    pool = load_pool(DATA / "pool_openai.jsonl") + load_pool(DATA / "pool_sharegpt.jsonl")
    out = tmp_path / "w.jsonl"
    write_pool(pool, out, step_weights={"o-1": [0.0, 2.5], "s-1": [0.25, 1]})
    o1, o2, s1, s2 = _lines(out)
    assert [m.get("weight") for m in o1["messages"]] == [None, None, 0.0, None, 2.5]
    assert all("weight" not in m for m in o2["messages"])
    assert [c.get("weight") for c in s1["conversations"]] == [None, 0.25, None, 1.0]
    reloaded = {t.id: t for t in load_pool(out)}
    assert [reloaded["s-1"].messages[i].get("weight") for i in (2, 4)] == [0.25, 1.0]
    with pytest.raises(ValueError, match="o-2"):
        write_pool(pool, out, step_weights={"o-2": [1.0]})


def test_edits_are_written(tmp_path):
    o1 = load_pool(DATA / "pool_openai.jsonl")[0]
    s1 = load_pool(DATA / "pool_sharegpt.jsonl")[0]
    o1.success, o1.extra["annotator"] = False, "carol"
    o1.messages[-1] = {"role": "assistant", "content": "changed"}
    s1.messages[-1] = {"role": "assistant", "content": "drop key"}
    write_pool([o1, s1], tmp_path / "e.jsonl")
    a, b = load_pool(tmp_path / "e.jsonl")
    assert a.success is False and a.extra["annotator"] == "carol"
    assert a.messages[-1]["content"] == "changed" and a.messages[2]["note"] == "kept"
    assert b.format == "sharegpt" and b.messages == s1.messages


def test_field_value():
    t = Trajectory(id="x", messages=[], task_id="cook-1", meta={"family": "cook", "d": {"k": 1}},
                   extra={"split": "train"})  # fmt: skip
    assert field_value(t, "task_id") == "cook-1"
    assert field_value(t, "split") == "train"
    assert field_value(t, "family") == "cook"
    assert field_value(t, "meta.family") == "cook" and field_value(t, "meta.d.k") == 1
    assert field_value(t, "source") is None and field_value(t, "nope") is None


def test_trajectory_from_messages():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    t = trajectory_from_messages(msgs, task_id="a-1", family="a")
    assert t.id.startswith("traj-") and t.task_id == "a-1" and t.extra == {"family": "a"}
    assert trajectory_from_messages(msgs).id == t.id  # content hash: deterministic
    with pytest.raises(TrajectoryFormatError) as e:
        trajectory_from_messages([{"role": "user", "content": "hi"}])
    assert e.value.field == "messages"


def _ok(rid: str = "ok") -> dict:
    return {
        "id": rid,
        "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
    }


def _msgs(*msgs) -> dict:
    return {"id": "bad", "messages": list(msgs)}


U = {"role": "user", "content": "u"}
A = {"role": "assistant", "content": "a"}


def _call(cid="c1", args='{"x": 1}'):
    fn = {"name": "f", "arguments": args}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": cid, "type": "function", "function": fn}],
    }


BAD = [
    ('{"id": "bad", "messages": [', None),
    (_msgs(U, {"role": "robot", "content": "x"}), "messages[1].role"),
    (_msgs(U, A, {"role": "tool", "tool_call_id": "nope", "content": "r"}), "messages[2].tool_call_id"),
    (_msgs(U, _call(), {"role": "tool", "tool_call_id": "c1", "content": "r"}, _call()),
     "messages[3].tool_calls[0].id"),
    (_msgs(), "messages"),
    ({"id": "bad", "messages": "hello"}, "messages"),
    (_msgs(U, U), "messages"),
    (_msgs({"role": "user", "content": 5}, A), "messages[0].content"),
    (_msgs(U, {"role": "assistant", "content": None}), "messages[1].content"),
    (_msgs(U, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}), "messages[1].content"),
    (_msgs(U, {"role": "assistant", "content": "", "tool_calls": {"id": "c"}}), "messages[1].tool_calls"),
    (_msgs(U, _call(args=3)), "messages[1].tool_calls[0].function.arguments"),
    (_msgs(U, {**A, "weight": "high"}), "messages[1].weight"),
    (_msgs(U, {**A, "weight": None}), "messages[1].weight"),
    ({**_ok("bad"), "success": "yes"}, "success"),
    ({**_ok("bad"), "reward": "1"}, "reward"),
    ({"id": "bad", "conversations": [{"from": "human", "value": "u"}, {"from": "bot", "value": "a"}]},
     "conversations[1].from"),
    ({"id": "bad", "conversations": [{"from": "human", "value": "u"}, {"from": "observation", "value": "r"}]},
     "conversations[1]"),
    ({"id": "bad", "conversations": [{"from": "human", "value": "u"}, {"from": "function_call", "value": "{x"}]},
     "conversations[1].value"),
    ({"id": "bad", "conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]},
     "conversations[0].value"),
    ('[1, 2]', None),
    ({"id": "bad", "text": "neither format"}, None),
    (_ok("ok"), "id"),  # duplicate of line 1
    ({"messages": _ok()["messages"]}, "id"),  # missing id while others have one
]  # fmt: skip


@pytest.mark.parametrize("bad,field", BAD)
def test_bad_input_names_line_and_field(bad, field, tmp_path, write_jsonl):
    # line 1 valid, line 2 blank (physical lines still count), line 3 bad
    path = write_jsonl(tmp_path, [_ok(), "", bad])
    with pytest.raises(TrajectoryFormatError) as e:
        load_pool(path)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 3, field)
    assert f"{path}:3" in str(e.value)
    if field == "id" and "messages" in bad and "id" in bad:
        assert "line 1" in str(e.value)  # a duplicate names both lines


def test_not_utf8_and_missing_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(json.dumps(_ok()).encode() + b"\n\xff\xfe\n")
    with pytest.raises(TrajectoryFormatError) as e:
        load_pool(p)
    assert e.value.line == 2
    with pytest.raises(TrajectoryFormatError):
        load_pool(tmp_path / "missing.jsonl")


def test_warns_when_subtask_field_absent(tmp_path, write_jsonl, tool_pool_records):
    path = write_jsonl(tmp_path, tool_pool_records)
    with pytest.warns(UserWarning, match="skill"):
        load_pool(path, subtask_field="skill")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_pool(path, subtask_field="family")) == 6


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=20,
)
_keys = st.sampled_from(["id", "messages", "conversations", "role", "content", "from", "value",
                         "tool_calls", "tool_call_id", "function", "name", "arguments", "weight"])  # fmt: skip
_structured = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=5)
    | st.sampled_from(
        ["user", "assistant", "tool", "gpt", "human", "function_call", "observation"]
    ),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_keys, kids, max_size=5),
    max_leaves=25,
)
_BASE = {
    "id": "m",
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        _call(),
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
        {"role": "assistant", "content": "a", "weight": 1.0},
    ],
}
_PATHS = [(), ("id",), ("tools",), ("tools", 0), ("messages",), ("messages", 0), ("messages", 1, "role"),
          ("messages", 2), ("messages", 2, "tool_calls"), ("messages", 2, "tool_calls", 0),
          ("messages", 2, "tool_calls", 0, "id"), ("messages", 2, "tool_calls", 0, "function"),
          ("messages", 2, "tool_calls", 0, "function", "arguments"), ("messages", 3, "tool_call_id"),
          ("messages", 4, "content"), ("messages", 4, "weight"), ("meta",), ("success",)]  # fmt: skip


def _mutate(path_value) -> str:
    """A valid record with the value at one path replaced by random JSON."""
    path, value = path_value
    rec = json.loads(json.dumps(_BASE))
    if not path:
        return json.dumps(value)
    node = rec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(rec)


_line = (
    st.tuples(st.sampled_from(_PATHS), _json).map(_mutate)
    | _json.map(json.dumps)
    | _structured.map(json.dumps)
    | st.text(max_size=30)
    | st.binary(max_size=30).map(lambda b: b.decode("latin-1"))
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_line, min_size=1, max_size=4))
def test_loader_raises_only_format_errors(lines):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "g.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                pool = load_pool(path)
            except TrajectoryFormatError:
                return
        for t in pool:  # anything accepted is a usable trajectory
            assert any(m["role"] == "assistant" for m in t.messages)
            assert all(isinstance(m["content"], str) for m in t.messages)
