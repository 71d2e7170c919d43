"""Extraction vs. a training step on a real pretrained model (SmolLM2-135M-Instruct by default).

Times, on the same synthetic length-bucketed pool (trajinf.bench.perf's timing functions):
  full:  a training forward + backward with weight gradients vs factorized per-step extraction
         over every Linear in the blocks;
  lora:  the same on a LoRA-wrapped copy (models.lora: attention + MLP, rank 8): training
         computes only the adapters' gradients, extraction tracks only the adapters.
Runs are interleaved and the best of --repeats kept, so load changes on a shared machine hit
both sides. Prints JSON (tokens/s, ratios extraction / training).

    python benchmarks/real_model.py --threads 1 --items 4 --tokens 512 --out real.json

On a GPU (``--device cuda``), ``--config-only DIR`` builds the model from ``DIR/config.json``
with random weights: the timing of a forward/backward does not depend on the weights, and a
config travels where a 500 MB checkpoint cannot. ``--dtype bf16`` times bf16 weights (features
stay fp32).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from trajinf.bench.perf import (
    emit_result,
    machine_info,
    synthetic_pool,
    time_extraction,
    time_training,
)
from trajinf.gradients.config import ExtractionConfig
from trajinf.models.checkpoints import load_model
from trajinf.models.lora import wrap_lora


def measure(model, pool, cfg: ExtractionConfig, batch_tokens: int, repeats: int) -> dict:
    n_tokens = sum(len(it.input_ids) for it in pool)
    time_training(model, pool[:1], batch_tokens)  # warm-up
    train, extract = [], []
    for _ in range(repeats):
        train.append(time_training(model, pool, batch_tokens))
        extract.append(time_extraction(model, pool, cfg))
    a, b = min(train), min(extract)
    return {
        "tokens": n_tokens,
        "train_fwd_bwd": {"seconds": a, "runs": train, "tokens_per_s": n_tokens / a},
        "factorized_extraction": {"seconds": b, "runs": extract, "tokens_per_s": n_tokens / b},
        "ratio_extraction_over_training": b / a,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--config-only", default=None, help="random weights from DIR/config.json")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    if args.config_only:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config_only))
        args.model = f"{args.config_only} (architecture only, random weights)"
    else:
        model, _tok = load_model(args.model)
    model = model.to(device=args.device, dtype=dtype)
    load_s = time.perf_counter() - t0
    model.eval()
    vocab = model.config.vocab_size
    pool = synthetic_pool(args.items, args.tokens, args.steps, vocab, seed=0)
    cfg = ExtractionConfig(proj_dim=args.proj_dim, batch_tokens=args.batch_tokens)
    out = {
        "model": args.model,
        "params": sum(p.numel() for p in model.parameters()),
        "load_s": load_s,
        "args": vars(args),
        "machine": machine_info(args.device),
        "full": measure(model, pool, cfg, args.batch_tokens, args.repeats),
    }
    lora = wrap_lora(copy.deepcopy(model), rank=args.lora_rank).eval()
    out["lora"] = measure(lora, pool, cfg, args.batch_tokens, args.repeats)
    return emit_result(out, args.out)


if __name__ == "__main__":
    main()
