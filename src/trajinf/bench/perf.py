"""Extraction speed and scaling behind ``trajinf bench perf`` (and benchmarks/extract_speed.py).

Everything here times, in one process and on the same length-bucketed batches, (a) a plain
training forward + backward (weight gradients) over a synthetic pool's tokens, (b) trajinf's
factorized per-step extraction and (c) LESS-mode extraction on a LoRA-wrapped copy, so the
ratios b/a and c/a are measured under the same load. Models are Llama-style, built from
configs (never downloaded); the pool is random tokens with agent-like step structure (a prompt,
then steps whose first third is the action).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trajinf.atomic import write_json
from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.gradients.batching import item_steps, make_batch, model_logits, plan_batches, token_nll
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.extract import extract_features, feature_dim
from trajinf.gradients.loss import ActionNLL
from trajinf.models.lora import wrap_lora

Log = Callable[[str], None]


def synthetic_pool(
    n: int, length: int, n_steps: int, vocab: int, seed: int
) -> list[TokenizedTrajectory]:
    """n items of `length` tokens: a 10% prompt, then n_steps (action ~1/3, observation ~2/3)."""
    rng = np.random.default_rng(seed)
    items = []
    prompt = length // 10
    span = (length - prompt) // n_steps
    for i in range(n):
        ids = rng.integers(0, vocab, length)
        step_ids = np.full(length, -1, np.int32)
        action = np.zeros(length, bool)
        for s in range(n_steps):
            lo = prompt + s * span
            hi = lo + max(2, span // 3)
            step_ids[lo:hi] = s
            action[lo + 1 : hi] = True  # the first span token is the generation prompt
        items.append(TokenizedTrajectory(f"b{i}", ids, action, step_ids, n_steps))
    return items


def llama(hidden: int, layers: int, vocab: int, max_tokens: int, seed: int = 0) -> LlamaForCausalLM:
    """A Llama-style causal LM from a config (head dim 64 when possible), fp32, eval mode."""
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(2048, max_tokens),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float().eval()


def time_training(model: torch.nn.Module, items: Sequence, batch_tokens: int) -> float:
    """Seconds for forward + backward (with weight gradients) over all items."""
    model.zero_grad(set_to_none=True)
    steps = [item_steps(it, ActionNLL()) for it in items]
    device = next(model.parameters()).device
    sync(device)
    start = time.perf_counter()
    for group in plan_batches([len(it.input_ids) for it in items], batch_tokens):
        batch = make_batch([items[i] for i in group], [steps[i] for i in group], device)
        logits, _ = model_logits(model, batch, embeds_requires_grad=False)
        loss = (token_nll(logits, batch.input_ids) * batch.token_weight).sum()
        del logits
        loss.backward()
    sync(device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def time_extraction(model: torch.nn.Module, items: Sequence, config: ExtractionConfig) -> float:
    """Seconds to extract (and discard) the features of all items."""
    device = next(model.parameters()).device
    sync(device)
    start = time.perf_counter()
    for _ in extract_features(model, items, config):
        pass
    sync(device)
    return time.perf_counter() - start


def emit_result(result: dict, path: str | Path | None) -> dict:
    """The benchmark scripts' output: ``result`` printed as JSON and, with ``path``, written
    there atomically (:func:`trajinf.atomic.write_json`)."""
    print(json.dumps(result, indent=2, default=str))
    if path:
        write_json(result, Path(path))
    return result


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer without this
    measures launches, not work)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict:
    """CPU, cores, threads, versions and load: stored with every result."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m": os.getloadavg()[0],
    }


@dataclass
class ExtractSpec:
    """Sizes of one extraction-speed measurement (defaults: the 33.5M Llama of docs)."""

    hidden: int = 512
    layers: int = 8
    vocab: int = 8000
    items: int = 64
    tokens: int = 512
    steps: int = 8
    batch_tokens: int = 8192
    proj_dim: int = 8192
    step_splits: list[str] = field(default_factory=lambda: ["position"])
    less_items: int = 8  # 0 skips (c)
    less_proj_dim: int = 8192
    lora_rank: int = 8
    repeats: int = 2  # best of N for (a) and (b), interleaved


def measure_extraction(spec: ExtractSpec, device: str = "cpu") -> dict:
    """Time (a) train fwd+bwd, (b) factorized extraction per step split, (c) LESS mode, in one
    run; returns tokens/s and the ratios b/a and c/a (LESS normalized per token)."""
    torch.manual_seed(0)
    model = llama(spec.hidden, spec.layers, spec.vocab, spec.tokens).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    pool = synthetic_pool(spec.items, spec.tokens, spec.steps, spec.vocab, seed=0)
    n_tokens = sum(len(it.input_ids) for it in pool)
    facts = {
        split: ExtractionConfig(
            proj_dim=spec.proj_dim, batch_tokens=spec.batch_tokens, step_split=split
        )
        for split in spec.step_splits
    }
    time_training(model, pool[:2], spec.batch_tokens)  # warm-up (allocator, kernels)
    train_runs: list[float] = []
    fact_runs: dict[str, list[float]] = {s: [] for s in spec.step_splits}
    for _ in range(spec.repeats):  # interleaved, so load changes on a shared machine hit all
        train_runs.append(time_training(model, pool, spec.batch_tokens))
        for split, cfg in facts.items():
            fact_runs[split].append(time_extraction(model, pool, cfg))
    train_s = min(train_runs)
    fact_s = {s: min(r) for s, r in fact_runs.items()}

    less_s, less_tokens = float("nan"), 0
    if spec.less_items > 0:
        lora = wrap_lora(copy.deepcopy(model), rank=spec.lora_rank).eval()
        less = ExtractionConfig(
            mode="less", proj_dim=spec.less_proj_dim, batch_tokens=spec.batch_tokens
        )
        subset = pool[: spec.less_items]
        less_tokens = sum(len(it.input_ids) for it in subset)
        less_s = time_extraction(lora, subset, less)

    out: dict = {
        "spec": asdict(spec),
        "model": {"params": n_params, "hidden": spec.hidden, "layers": spec.layers},
        "tokens": n_tokens,
        "a_train_fwd_bwd": {"seconds": train_s, "runs": train_runs, "tokens_per_s": n_tokens / train_s},
    }  # fmt: skip
    for split in spec.step_splits:
        key = "b_factorized" if split == "position" else "b_factorized_loss_split"
        out[key] = {
            "step_split": split,
            "seconds": fact_s[split],
            "runs": fact_runs[split],
            "tokens_per_s": n_tokens / fact_s[split],
            "dim": feature_dim(model, facts[split]),
        }
        ratio_key = "ratio_b_over_a" if split == "position" else "ratio_b_loss_over_a"
        out[ratio_key] = fact_s[split] / train_s
    if len(spec.step_splits) == 2:
        out["ratio_b_loss_over_b_position"] = fact_s["loss"] / fact_s["position"]
    out["c_less_lora"] = {
        "seconds": less_s,
        "tokens": less_tokens,
        "tokens_per_s": less_tokens / less_s if less_tokens else None,
        "dim": spec.less_proj_dim,
        "lora_rank": spec.lora_rank,
    }
    out["ratio_c_over_a"] = (less_s / less_tokens) / (train_s / n_tokens) if less_tokens else None
    return out


def _point(hidden: int, layers: int, vocab: int, items: int, tokens: int, repeats: int) -> dict:
    """One scaling point: best-of-``repeats`` train fwd+bwd and factorized extraction."""
    spec = ExtractSpec(
        hidden=hidden, layers=layers, vocab=vocab, items=items, tokens=tokens,
        steps=8, batch_tokens=max(8192, tokens), proj_dim=8192, less_items=0, repeats=repeats,
    )  # fmt: skip
    r = measure_extraction(spec)
    return {
        "hidden": hidden,
        "layers": layers,
        "params": r["model"]["params"],
        "items": items,
        "tokens_per_item": tokens,
        "train_s": r["a_train_fwd_bwd"]["seconds"],
        "factorized_s": r["b_factorized"]["seconds"],
        "train_tokens_per_s": r["a_train_fwd_bwd"]["tokens_per_s"],
        "factorized_tokens_per_s": r["b_factorized"]["tokens_per_s"],
        "ratio": r["ratio_b_over_a"],
    }


@dataclass
class ScalingSpec:
    """Grids of the scaling curves (sized for a 2-core CPU; larger pools are extrapolated)."""

    pool_items: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    pool_tokens: int = 256
    seq_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    seq_tokens_total: int = 8192  # items per length = total // length (at least 1)
    widths: list[int] = field(default_factory=lambda: [128, 256, 512])
    width_items: int = 8
    width_tokens: int = 256
    hidden: int = 128  # model of the pool-size and length curves
    layers: int = 4
    vocab: int = 4000
    repeats: int = 2
    extrapolate_items: list[int] = field(default_factory=lambda: [1_000, 10_000, 100_000])


def scaling_curves(spec: ScalingSpec, log: Log = print) -> dict:
    """Train fwd+bwd vs factorized extraction over pool size, sequence length and width.

    Pool-size points are measured; the 1k-100k item times are a least-squares line through
    them (marked ``extrapolated``), as extraction is one pass over the pool.
    """
    pool = []
    for n in spec.pool_items:
        log(f"perf: scaling pool {n} items")
        pool.append(_point(spec.hidden, spec.layers, spec.vocab, n, spec.pool_tokens, spec.repeats))
    xs = np.array([p["items"] for p in pool], float)
    fit = {}
    for key in ("train_s", "factorized_s"):
        slope, icpt = np.polyfit(xs, [p[key] for p in pool], 1)
        fit[key] = {"seconds_per_item": float(slope), "intercept_s": float(icpt)}
    extrap = [
        {
            "items": n,
            "train_s": fit["train_s"]["seconds_per_item"] * n,
            "factorized_s": fit["factorized_s"]["seconds_per_item"] * n,
            "extrapolated": True,
        }
        for n in spec.extrapolate_items
    ]
    length = []
    for t in spec.seq_lengths:
        log(f"perf: scaling sequence length {t}")
        items = max(1, spec.seq_tokens_total // t)
        length.append(_point(spec.hidden, spec.layers, spec.vocab, items, t, spec.repeats))
    width = []
    for h in spec.widths:
        log(f"perf: scaling width {h}")
        width.append(
            _point(h, spec.layers, spec.vocab, spec.width_items, spec.width_tokens, spec.repeats)
        )
    return {
        "spec": asdict(spec),
        "pool_size": pool,
        "pool_size_fit": fit,
        "pool_size_extrapolated": extrap,
        "seq_length": length,
        "width": width,
    }
