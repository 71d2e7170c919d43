"""Chat templates that drop the agent's actions are refused; tool-aware ones pass; --chat-template
names and files; --model resolution errors (no real model needed here: see test_models_real)."""

from __future__ import annotations

import copy

import pytest
import torch

from trajinf.data.chat_templates import CHAT_TEMPLATES, CHATML_TOOL_TEMPLATE, resolve_chat_template
from trajinf.data.template_check import check_chat_template, check_template_for, lost_parts
from trajinf.data.tokenize import tokenize_pool, tokenize_trajectory
from trajinf.data.trajectories import load_pool, trajectory_from_messages
from trajinf.errors import TemplateError, TrajinfError
from trajinf.models import load as model_load
from trajinf.models.checkpoints import load_model, tokenizer_fingerprint
from trajinf.models.tiny import tiny_model

# SmolLM2-135M-Instruct's own template, verbatim: only message['content'] is rendered
CONTENT_ONLY = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# renders tool calls but drops every tool result
NO_RESULTS = CHATML_TOOL_TEMPLATE.replace(
    "'<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response>",
    "'<|im_start|>user\\n<tool_response>\\n' + '\\n</tool_response>",
)


def _with_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_content_only_template_is_refused_with_model_lost_parts_and_fix(chatml_tokenizer):
    tok = _with_template(chatml_tokenizer, CONTENT_ONLY)
    tok.name_or_path = "my-org/my-model"
    assert lost_parts(tok) == ["the assistant's tool-call name", "the tool-call arguments"]
    with pytest.raises(TemplateError) as e:
        check_chat_template(tok)
    msg = str(e.value)
    assert "\n" not in msg
    assert "my-org/my-model" in msg and "tool-call name" in msg
    assert "--chat-template chatml-tools" in msg


def test_template_dropping_tool_results_is_refused(chatml_tokenizer):
    assert NO_RESULTS != CHATML_TOOL_TEMPLATE
    tok = _with_template(chatml_tokenizer, NO_RESULTS)
    assert lost_parts(tok) == ["the tool result's content"]
    # data without tool results does not need them
    check_chat_template(tok, tool_results=False)
    with pytest.raises(TemplateError, match="tool result"):
        check_chat_template(tok)


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_tool_aware_templates_pass(name, chatml_tokenizer):
    tok = _with_template(chatml_tokenizer, CHAT_TEMPLATES[name])
    assert lost_parts(tok) == []
    check_chat_template(tok)


def test_tokenize_pool_refuses_before_scoring_empty_actions(
    tmp_path, chatml_tokenizer, tool_pool_records, write_jsonl
):
    pool = load_pool(write_jsonl(tmp_path, tool_pool_records))
    bad = _with_template(chatml_tokenizer, CONTENT_ONLY)
    with pytest.raises(TemplateError, match="tool-call name"):
        tokenize_pool(pool, bad)
    # the per-trajectory check catches it too when the probe is bypassed
    with_call = next(t for t in pool if any(m.get("tool_calls") for m in t.messages))
    with pytest.raises(TemplateError, match="without its tool call"):
        tokenize_trajectory(with_call, bad)
    # a pool of plain-text actions does not need a tool-aware template
    plain = [
        trajectory_from_messages(
            [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": "take coin"},
                {"role": "user", "content": "ok"},
                {"role": "assistant", "content": "open door"},
            ],
            id="plain",
        )
    ]
    check_template_for(bad, plain)
    (item,) = tokenize_pool(plain, bad)
    assert item.n_steps == 2 and item.action_mask.sum() > 0
    # with the tool-aware template every tool call is inside its action span
    good = tokenize_pool(pool, chatml_tokenizer)
    for traj, it in zip(pool, good, strict=True):
        text = chatml_tokenizer.decode(it.input_ids[it.action_mask])
        for m in traj.messages:
            for call in m.get("tool_calls") or ():
                assert call["function"]["name"] in text


def test_resolve_chat_template_names_files_and_errors(tmp_path):
    assert resolve_chat_template("chatml-tools") == CHATML_TOOL_TEMPLATE
    f = tmp_path / "t.jinja"
    f.write_text(CONTENT_ONLY)
    assert resolve_chat_template(str(f)) == CONTENT_ONLY
    with pytest.raises(TrajinfError, match="chatml-tools"):
        resolve_chat_template("no-such-template")
    (tmp_path / "empty.jinja").write_text("  ")
    with pytest.raises(TrajinfError, match="empty"):
        resolve_chat_template(str(tmp_path / "empty.jinja"))


def test_load_model_chat_template_changes_tokenizer_fingerprint(tmp_path, chatml_tokenizer):
    tok = _with_template(chatml_tokenizer, CONTENT_ONLY)
    model = tiny_model(tok, layers=1, hidden=16, heads=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    _, own = load_model(tmp_path / "m")
    _, forced = load_model(tmp_path / "m", chat_template="chatml-tools")
    assert own.chat_template == CONTENT_ONLY
    assert forced.chat_template == CHATML_TOOL_TEMPLATE
    assert tokenizer_fingerprint(own) != tokenizer_fingerprint(forced)
    bf16, _ = load_model(tmp_path / "m", dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert model_load.load_tokenizer(tmp_path / "m", chat_template="llama3-tools").chat_template


def test_model_spec_errors_are_one_line(tmp_path, monkeypatch):
    def one_line(exc_info, *parts):
        msg = str(exc_info.value)
        assert "\n" not in msg
        for p in parts:
            assert p in msg, msg

    with pytest.raises(TrajinfError) as e:
        model_load.resolve_model_dir(tmp_path / "nope")
    one_line(e, "nope", "smollm2-135m")
    with pytest.raises(TrajinfError) as e:
        model_load.resolve_model_dir(tmp_path / "missing.gguf")
    one_line(e, "no such GGUF file")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(TrajinfError) as e:
        model_load.resolve_model_dir(tmp_path / "file.txt")
    one_line(e, "not a model directory")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrajinfError) as e:
        model_load.resolve_model_dir("some-org/not-cached-model")
    one_line(e, "some-org/not-cached-model", "never downloads")
    alias = model_load.ModelAlias("no_such_pkg_zq7", "no-such-pkg==1.0", "m.gguf", "test")
    monkeypatch.setitem(model_load.MODEL_ALIASES, "fake-model", alias)
    with pytest.raises(TrajinfError) as e:
        model_load.resolve_model_dir("fake-model")
    one_line(e, "pip install 'trajinf[real]'", "no-such-pkg==1.0")


def test_dtype_names():
    assert model_load.resolve_dtype(None) == torch.float32
    assert model_load.resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(TrajinfError, match="fp16 needs a GPU"):
        model_load.resolve_dtype("fp16", "cpu")
    with pytest.raises(TrajinfError, match="fp32, bf16, fp16"):
        model_load.resolve_dtype("int8")


def test_score_refuses_dropping_template_and_records_the_override(tmp_path, make_tiny_job):
    import json

    from typer.testing import CliRunner

    from trajinf.cli.main import app
    from trajinf.models.load import load_tokenizer

    (tmp_path / "job").mkdir()
    job = make_tiny_job(tmp_path / "job", n_tasks=4)
    tok = load_tokenizer(job / "model")
    tok.chat_template = CONTENT_ONLY  # a model whose own template drops tool calls
    tok.save_pretrained(job / "model")
    args = ["score", "--model", str(job / "model"), "--pool", str(job / "pool.jsonl")]
    args += ["--target", str(job / "target.jsonl"), "--proj-dim", "64", "--seed", "0"]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s0")])
    assert isinstance(refused.exception, TemplateError), refused.output
    assert "--chat-template chatml-tools" in str(refused.exception)
    ok = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "s1"), "--chat-template", "chatml-tools"]
    )
    assert ok.exit_code == 0, ok.output
    manifest = json.loads((tmp_path / "s1" / "store" / "pool" / "manifest.json").read_text())
    assert manifest["fingerprint"]["chat_template"] == "chatml-tools"
