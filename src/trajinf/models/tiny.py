"""Tiny tokenizers and models built locally (no downloads), for tests, demos and benchmarks."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from trajinf.data.chat_templates import CHATML_TOOL_TEMPLATE

# Special tokens, end-of-turn (eos), pad and bos per template family, keyed by a marker string
# that identifies the family inside the template text.
_PROFILES: dict[str, dict] = {
    "<|im_start|>": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "bos": None,
        # Qwen2.5 keeps these as single (non-special) tokens, so tool calls tokenize compactly.
        "added": ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
    },
    "<|start_header_id|>": {
        "specials": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
            "<|finetune_right_pad_id|>",
        ],
        "eos": "<|eot_id|>",
        "pad": "<|finetune_right_pad_id|>",
        "bos": "<|begin_of_text|>",
        "added": [],
    },
}

#: A small built-in corpus of agent-like text (observations, actions, tool-call JSON).
DEFAULT_CORPUS: list[str] = [
    "You are an agent in a text world. Use the tools to reach the goal.",
    "Goal: put a clean apple in the fridge. You are in the kitchen.",
    "You are in the kitchen. You see a fridge, a stove, a sink and a table.",
    "You open the fridge. The fridge is empty.",
    "You take the apple from the table. You are carrying: an apple.",
    "You wash the apple in the sink. The apple is clean.",
    "You put the apple in the fridge. Task complete!",
    "Nothing happens. That is not a valid action.",
    "go north",
    "go south",
    "open fridge",
    "take apple from table",
    "look around",
    "inventory",
    '{"name": "open", "arguments": {"target": "fridge"}}',
    '{"name": "take", "arguments": {"item": "apple", "source": "table"}}',
    '{"name": "go", "arguments": {"direction": "north"}}',
    '{"name": "search", "parameters": {"query": "weather in Paris"}}',
    "The search returned 3 results. The first result says it is sunny, 21 degrees.",
    "Thought: I should check the cupboard first, then the drawer.",
    "You are in the hallway. Exits: north, east. A key lies on the floor.",
    "Score: 1/3. Moves: 12. Reward: 0.5",
    "Le chat est sur la table. Der Apfel ist rot. りんごは赤い。 苹果是红色的。",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "SELECT name FROM items WHERE location = 'fridge';",
    "Step 1: open the door. Step 2: walk to the kitchen. Step 3: cook the egg.",
]

if TYPE_CHECKING:
    from trajinf.data.schema import Trajectory


def _profile(template: str) -> dict:
    for marker, prof in _PROFILES.items():
        if marker in template:
            return prof
    # Unknown template: every <|...|> marker it prints becomes a special token.
    found = list(dict.fromkeys(re.findall(r"<\|[A-Za-z0-9_]+\|>", template)))
    return {
        "specials": [*found, "<|pad|>"],
        "eos": None,
        "pad": "<|pad|>",
        "bos": None,
        "added": [],
    }


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    template: str = CHATML_TOOL_TEMPLATE,
    special_tokens: Sequence[str] | None = None,
    *,
    eos_token: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and attach ``template`` as its chat template.

    Byte-level BPE encodes any unicode string. The template family (ChatML or Llama 3, detected
    from the template text) decides the special tokens, the pad token and the eos token, which is
    the end-of-turn token (``<|im_end|>`` / ``<|eot_id|>``). ``special_tokens`` adds more special
    tokens; ``eos_token`` overrides the eos (required for an unknown template family without
    ``<|...|>`` markers). The result saves with ``save_pretrained`` and loads back with
    ``AutoTokenizer.from_pretrained`` including the chat template.
    """
    prof = _profile(template)
    specials = list(dict.fromkeys([*prof["specials"], *(special_tokens or [])]))
    eos = eos_token or prof["eos"] or (specials[-2] if len(specials) > 1 else None)
    if eos is None:
        raise ValueError("train_tokenizer: cannot infer the end-of-turn token; pass eos_token=")
    if eos not in specials:
        specials.append(eos)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets exact (tokenize.py maps char spans to tokens through them).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if prof["added"]:
        tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in prof["added"]])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=prof["pad"],
        bos_token=prof["bos"],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    fast.chat_template = template
    return fast


def tiny_model(
    tokenizer_or_vocab_size: PreTrainedTokenizerBase | int,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 2048,
    seed: int = 0,
    *,
    kv_heads: int | None = None,
) -> PreTrainedModel:
    """A randomly initialized causal LM built from a config (fp32, eager attention, no download).

    ``arch`` is ``"llama"``, ``"qwen2"`` or ``"gpt2"``. The vocabulary size is ``len(tokenizer)``
    (added tokens included) and the pad/bos/eos ids are copied from the tokenizer. Init is seeded
    with ``seed`` without touching the global torch RNG. Dropout is 0 everywhere, so the returned
    model (left in train mode) computes the same function in train and eval mode. Logits are
    ``[B, T, vocab]``.
    """
    if isinstance(tokenizer_or_vocab_size, int):
        vocab, pad, bos, eos = tokenizer_or_vocab_size, None, None, None
    else:
        t = tokenizer_or_vocab_size
        vocab, pad, bos, eos = len(t), t.pad_token_id, t.bos_token_id, t.eos_token_id
    inter = intermediate or 4 * hidden
    ids = {"pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos}
    if arch in ("llama", "qwen2"):
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads,
            max_position_embeddings=max_positions,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **ids,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=inter,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    else:
        raise ValueError(f"tiny_model: unknown arch {arch!r} (expected llama, qwen2 or gpt2)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.float32
        )
    model.train()
    return model


def tokenizer_corpus(trajs: Sequence[Trajectory]) -> list[str]:
    """Texts a tokenizer learns from: message contents and tool calls as the template shows them."""
    import json

    out = []
    for t in trajs:
        for m in t.messages:
            out.append(m.get("content") or "")
            for c in m.get("tool_calls") or []:
                fn = c["function"]
                out.append(
                    json.dumps({"name": fn["name"], "arguments": json.loads(fn["arguments"])})
                )
        for tool in t.tools or []:
            out.append(json.dumps(tool))
    return out
