"""A confirmatory flood run on fresh tasks and seeds (issue 15): an env's flood preset with
another task seed, more seeds, and the methods the first run singled out, so a round-1 lead
found there is tested where it was not found.

    python benchmarks/flood_confirm.py --out runs/flood-confirm2 --seed 200 --seeds 10
    python benchmarks/flood_confirm.py --out runs/flood-confirm3 --seed 300 \
        --methods base,rs,rs-inf,rs-harm
    python benchmarks/flood_confirm.py --env twx --out runs/flood-twx-confirm --seed 200 \
        --seeds 5 --n-test 60 --methods base,rs,inf-adv|succ/task,rs-inf

Prints and writes (OUT/flood.md, OUT/flood.json) the same tables as `trajinf bench --scenarios
flood`; resumable (rows are kept in OUT/ENV/rounds.jsonl).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from trajinf.bench.flood import flood_preset
from trajinf.bench.rounds import run_flood_bench

METHODS = ("base", "rs", "rs-budget", "rs+ee", "rs-rare", "random", "inf-adv|succ",
           "inf-adv|succ/task")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--env", default="builtin", help="builtin (ToolWorld) or twx")
    ap.add_argument("--n-test", type=int, default=None, help="test tasks drawn (preset's: None)")
    ap.add_argument("--seed", type=int, default=200, help="task seed (the preset's is 0)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list")
    ap.add_argument("--planted", type=int, default=0, help="wrong-reason successes per round")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning lr (preset's: None)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (preset's: None)")
    ap.add_argument(
        "--later",
        default=None,
        help="comma list of the methods that go past round 1 (default: all)",
    )
    ap.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        help="reward = success - this x steps (the outcome targets see detours)",
    )
    ap.add_argument("--k", type=int, default=None, help="rollouts per task (preset's: None)")
    ap.add_argument(
        "--replay", type=float, default=0.0,
        help="the base agent's SFT demos mixed into each fine-tune, x the pick's size",
    )  # fmt: skip
    args = ap.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    cfg = replace(flood_preset(args.env), seed=args.seed, seeds=args.seeds, rounds=args.rounds,
                  methods=methods, later_methods=None, planted=args.planted)  # fmt: skip
    if args.n_test:
        cfg = replace(cfg, n_test_tasks=args.n_test)
    if args.lr:
        cfg = replace(cfg, finetune_lr=args.lr)
    if args.steps:
        cfg = replace(cfg, finetune_steps=args.steps)
    if args.k:
        cfg = replace(cfg, k=args.k)
    if args.length_penalty:
        cfg = replace(cfg, length_penalty=args.length_penalty)
    if args.replay:
        cfg = replace(cfg, replay=args.replay)
    if args.later:
        cfg = replace(cfg, later_methods=tuple(m for m in args.later.split(",") if m))
    return run_flood_bench([cfg], args.out)


if __name__ == "__main__":
    main()
