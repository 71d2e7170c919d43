"""Locally trained tokenizers and config-built tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from trajinf.data.chat_templates import CHATML_TOOL_TEMPLATE, END_OF_TURN, LLAMA3_TOOL_TEMPLATE
from trajinf.models.tiny import DEFAULT_CORPUS, tiny_model, train_tokenizer

MSGS = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "héllo ✓ 你好"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "open", "arguments": '{"target": "fridge"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "opened"},
    {"role": "assistant", "content": "done"},
]  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "open", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("name", ["chatml_tokenizer", "llama3_tokenizer"])
def test_tokenizer_specials_and_unicode(name, request):
    tok = request.getfixturevalue(name)
    template = CHATML_TOOL_TEMPLATE if name == "chatml_tokenizer" else LLAMA3_TOOL_TEMPLATE
    assert tok.is_fast and tok.chat_template == template
    assert tok.eos_token == END_OF_TURN[template] and tok.pad_token is not None
    assert tok.pad_token_id != tok.eos_token_id
    for special in tok.all_special_tokens:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    text = "Ünïcödé 🤖 τεστ\t\n  spaces — ∑ 😀 \x00"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE: nothing is unknown


def test_template_render_and_save_load(chatml_tokenizer, llama3_tokenizer, tmp_path):
    for i, tok in enumerate([chatml_tokenizer, llama3_tokenizer]):
        text = tok.apply_chat_template(MSGS, tools=TOOLS, tokenize=False)
        assert '"name": "open"' in text and "opened" in text and "sys" in text
        d = tmp_path / str(i)
        tok.save_pretrained(d)
        back = AutoTokenizer.from_pretrained(d)
        assert back.chat_template == tok.chat_template
        assert back.apply_chat_template(MSGS, tools=TOOLS, tokenize=False) == text
        assert (
            back(text, add_special_tokens=False)["input_ids"]
            == tok(text, add_special_tokens=False)["input_ids"]
        )
        assert (back.eos_token, back.pad_token) == (tok.eos_token, tok.pad_token)


def test_chatml_tool_render_matches_qwen_layout(chatml_tokenizer):
    text = chatml_tokenizer.apply_chat_template(
        MSGS[1:], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>user\nhéllo ✓ 你好<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "open", "arguments": {"target": "fridge"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nopened\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\ndone<|im_end|>\n<|im_start|>assistant\n"
    )


def test_templates_are_prefix_stable(chatml_tokenizer, llama3_tokenizer):
    for tok in (chatml_tokenizer, llama3_tokenizer):
        renders = [
            tok.apply_chat_template(MSGS[:i], tools=TOOLS, tokenize=False) for i in range(1, 6)
        ]
        assert all(b.startswith(a) for a, b in zip(renders, renders[1:], strict=False))


def test_custom_template_needs_or_finds_eos():
    tpl = "{% for m in messages %}<|turn|>{{ m.content }}<|done|>{% endfor %}"
    tok = train_tokenizer(DEFAULT_CORPUS[:4], vocab_size=300, template=tpl, eos_token="<|done|>")
    assert (
        tok.eos_token == "<|done|>"
        and len(tok("<|turn|>", add_special_tokens=False)["input_ids"]) == 1
    )
    with pytest.raises(ValueError, match="eos_token"):
        train_tokenizer(DEFAULT_CORPUS[:4], vocab_size=300, template="{{ messages }}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_model(arch, chatml_tokenizer):
    state = torch.random.get_rng_state()
    model = tiny_model(chatml_tokenizer, arch=arch, hidden=32, layers=2, heads=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert model.config.vocab_size == len(chatml_tokenizer)
    assert model.config.pad_token_id == chatml_tokenizer.pad_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.tensor([chatml_tokenizer("open fridge", add_special_tokens=False)["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(chatml_tokenizer))
    assert torch.equal(logits, model.eval()(input_ids=ids).logits)  # no dropout
    same = tiny_model(chatml_tokenizer, arch=arch, hidden=32, layers=2, heads=4)
    other = tiny_model(chatml_tokenizer, arch=arch, hidden=32, layers=2, heads=4, seed=1)
    for (n, a), b in zip(model.named_parameters(), same.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert any(
        not torch.equal(a, c) for a, c in zip(model.parameters(), other.parameters(), strict=True)
    )


def test_tiny_model_from_vocab_size_and_bad_arch():
    model = tiny_model(100, arch="llama", hidden=16, layers=1, heads=2, intermediate=24)
    assert model.config.vocab_size == 100 and model.config.intermediate_size == 24
    with pytest.raises(ValueError, match="arch"):
        tiny_model(100, arch="mamba")
