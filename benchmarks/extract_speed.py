"""Extraction speed vs. plain training on a ~30M-parameter Llama-style model (CPU by default).

Times, in one run and with the same length-bucketed batches:
  (a) a plain training forward + backward (weight gradients) over the pool's tokens,
  (b) factorized per-step extraction (`extract_features`, mode="factorized"), with the
      step split(s) chosen by --step-split ("position": one backward per batch; "loss": each
      step's own-loss gradient, one backward per step slot),
  (c) LESS-mode extraction on a LoRA-wrapped copy (on a subset; normalized per token),
and prints / writes JSON with tokens/s and the ratios b/a, c/a (time per token).

The measuring code is `trajinf.bench.perf` (also behind `trajinf bench perf`); this script only
exposes its knobs.

    python benchmarks/extract_speed.py --out /tmp/extract_speed.json
    python benchmarks/extract_speed.py --step-split both --less-items 0
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from trajinf.bench.perf import ExtractSpec, emit_result, machine_info, measure_extraction


def main(argv: list[str] | None = None) -> dict:
    """Parse the knobs, measure, print (and optionally write) the JSON result."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = ExtractSpec()
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--vocab", type=int, default=d.vocab)
    ap.add_argument("--items", type=int, default=d.items)
    ap.add_argument("--tokens", type=int, default=d.tokens)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
    ap.add_argument("--proj-dim", type=int, default=d.proj_dim)
    ap.add_argument(
        "--step-split",
        choices=["position", "loss", "both"],
        default="position",
        help="which factorized step split(s) to time in (b)",
    )
    ap.add_argument("--less-items", type=int, default=d.less_items, help="LESS on this many items")
    ap.add_argument("--less-proj-dim", type=int, default=d.less_proj_dim)
    ap.add_argument("--lora-rank", type=int, default=d.lora_rank)
    ap.add_argument("--repeats", type=int, default=d.repeats, help="best of N for (a) and (b)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ExtractSpec(
        hidden=args.hidden, layers=args.layers, vocab=args.vocab, items=args.items,
        tokens=args.tokens, steps=args.steps, batch_tokens=args.batch_tokens,
        proj_dim=args.proj_dim,
        step_splits=["position", "loss"] if args.step_split == "both" else [args.step_split],
        less_items=args.less_items, less_proj_dim=args.less_proj_dim, lora_rank=args.lora_rank,
        repeats=args.repeats,
    )  # fmt: skip
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine_info(args.device),
        **measure_extraction(spec, device=args.device),
    }
    return emit_result(result, args.out)


if __name__ == "__main__":
    main()
