"""Extraction speed vs. plain training on a ~30M-parameter Llama-style model (CPU by default).

Times, in one run and with the same length-bucketed batches:
  (a) a plain training forward + backward (weight gradients) over the pool's tokens,
  (b) factorized per-step extraction (`extract_features`, mode="factorized"), with the
      step split(s) chosen by --step-split ("position": one backward per batch; "loss": each
      step's own-loss gradient, one backward per step slot),
  (c) LESS-mode extraction on a LoRA-wrapped copy (on a subset; normalized per token),
and prints / writes JSON with tokens/s and the ratios b/a, c/a (time per token).

    python benchmarks/extract_speed.py --out /tmp/extract_speed.json
    python benchmarks/extract_speed.py --step-split both --less-items 0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trajinf.checkpoints import wrap_lora
from trajinf.gradients import ExtractionConfig, extract_features, feature_dim
from trajinf.gradients.batching import item_steps, make_batch, model_logits, plan_batches, token_nll
from trajinf.tokenize import TokenizedTrajectory


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


def time_training(model, items, batch_tokens: int) -> float:
    """Seconds for forward + backward (with weight gradients) over all items."""
    model.zero_grad(set_to_none=True)
    steps = [item_steps(it, "mean") for it in items]
    device = next(model.parameters()).device
    start = time.perf_counter()
    for group in plan_batches([len(it.input_ids) for it in items], batch_tokens):
        batch = make_batch([items[i] for i in group], [steps[i] for i in group], device)
        logits, _ = model_logits(model, batch, embeds_requires_grad=False)
        loss = (token_nll(logits, batch.input_ids) * batch.token_weight).sum()
        del logits
        loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def time_extraction(model, items, config) -> float:
    start = time.perf_counter()
    for _ in extract_features(model, items, config):
        pass
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument(
        "--step-split",
        choices=["position", "loss", "both"],
        default="position",
        help="which factorized step split(s) to time in (b)",
    )
    ap.add_argument("--less-items", type=int, default=8, help="LESS runs on this many items")
    ap.add_argument("--less-proj-dim", type=int, default=8192)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for (a) and (b)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=max(2048, args.tokens),
    )
    model = LlamaForCausalLM(config).float().to(args.device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    pool = synthetic_pool(args.items, args.tokens, args.steps, args.vocab, seed=0)
    n_tokens = sum(len(it.input_ids) for it in pool)
    splits = ["position", "loss"] if args.step_split == "both" else [args.step_split]
    facts = {
        split: ExtractionConfig(
            proj_dim=args.proj_dim, batch_tokens=args.batch_tokens, step_split=split
        )
        for split in splits
    }

    time_training(model, pool[:2], args.batch_tokens)  # warm-up (allocator, kernels)
    train_runs: list[float] = []
    fact_runs: dict[str, list[float]] = {split: [] for split in splits}
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit all
        train_runs.append(time_training(model, pool, args.batch_tokens))
        for split in splits:
            fact_runs[split].append(time_extraction(model, pool, facts[split]))
    train_s = min(train_runs)
    fact_s = {split: min(runs) for split, runs in fact_runs.items()}

    less_s, less_tokens = float("nan"), 0
    if args.less_items > 0:  # --less-items 0 skips (c)
        lora = wrap_lora(copy.deepcopy(model), rank=args.lora_rank).eval()
        less = ExtractionConfig(
            mode="less", proj_dim=args.less_proj_dim, batch_tokens=args.batch_tokens
        )
        subset = pool[: args.less_items]
        less_tokens = sum(len(it.input_ids) for it in subset)
        less_s = time_extraction(lora, subset, less)

    per_tok = lambda s, n: s / n  # noqa: E731
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": args.device,
            "load_avg_1m": os.getloadavg()[0],
        },
        "model": {
            "params": n_params,
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
        },
        "pool": {
            "items": args.items,
            "tokens_per_item": args.tokens,
            "steps": args.steps,
            "tokens": n_tokens,
            "batch_tokens": args.batch_tokens,
        },
        "a_train_fwd_bwd": {
            "seconds": train_s,
            "runs": train_runs,
            "tokens_per_s": n_tokens / train_s,
        },
        **{
            ("b_factorized" if split == "position" else "b_factorized_loss_split"): {
                "step_split": split,
                "seconds": fact_s[split],
                "runs": fact_runs[split],
                "tokens_per_s": n_tokens / fact_s[split],
                "dim": feature_dim(model, facts[split]),
            }
            for split in splits
        },
        "c_less_lora": {
            "seconds": less_s,
            "tokens": less_tokens,
            "tokens_per_s": less_tokens / less_s if less_tokens else None,
            "dim": args.less_proj_dim,
            "lora_rank": args.lora_rank,
        },
        **{
            ("ratio_b_over_a" if split == "position" else "ratio_b_loss_over_a"): fact_s[split]
            / train_s
            for split in splits
        },
        **(
            {"ratio_b_loss_over_b_position": fact_s["loss"] / fact_s["position"]}
            if len(splits) == 2
            else {}
        ),
        "ratio_c_over_a": per_tok(less_s, less_tokens) / per_tok(train_s, n_tokens)
        if less_tokens
        else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
