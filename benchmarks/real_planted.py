"""Planted cases with a real pretrained model: do helpful demonstrations score above planted
harmful ones (demos wrong at one decision point, labelled successful)?

ToolWorld (the built-in env, actions are tool calls): pool = expert demos (helpful) and planted
harmful demos of the target families; target = expert demos of other tasks of those families.
Scored by `score_pool` with the pretrained model (no warmup checkpoints: plain gradients) once
with its own chat template (refused when it drops tool calls) and once with --chat-template
chatml-tools. Reports AUROC(score: helpful > planted).

    python benchmarks/real_planted.py --out planted.json
    python benchmarks/real_planted.py --contrast-only --harm-lr 1e-5 --harm-lr 1e-4

``--contrast-only``: only the contrast harm signal (trajinf.job.contrast: tune the pretrained
model on the target, per-token log-prob change of the pool's actions), with chatml-tools, at
each ``--harm-lr``: AUROC(harm: planted > helpful), the calibrated flag's FPR on the helpful
demos and recall on the planted ones, localization of the planted step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from trajinf.bench.perf import emit_result
from trajinf.envs import make_env
from trajinf.envs.evaluate import auroc
from trajinf.envs.policies import ExpertPolicy, PlantedHarmfulPolicy
from trajinf.envs.rollout import rollout
from trajinf.errors import TemplateError
from trajinf.job.config import build_job_config
from trajinf.job.run import score_pool


def build(n_pool: int, n_target: int, seed: int):
    env = make_env("builtin")
    fams = list(env.families)[: max(1, len(env.families) // 2)]
    tasks = [t for t in env.tasks("train", 8 * (n_pool + n_target), seed) if t.family in fams]
    target_tasks, pool_tasks = tasks[:n_target], tasks[n_target : n_target + n_pool]
    kw = dict(seed=seed, with_tools=False)
    target = rollout(env, target_tasks, ExpertPolicy(), source="target", **kw)
    helpful = rollout(env, pool_tasks, ExpertPolicy(), source="expert", **kw)
    planted = rollout(
        env, pool_tasks, PlantedHarmfulPolicy(), source="expert", id_prefix="demo", **kw
    )
    planted = [t for t in planted if t.meta.get("planted")]
    return helpful + planted, target, fams


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-pool", type=int, default=12, help="pool tasks (one helpful + one planted)")
    ap.add_argument("--n-target", type=int, default=6)
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--batch-tokens", type=int, default=2048, help="8192 takes ~15 GB here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contrast-only", action="store_true")
    ap.add_argument("--harm-lr", type=float, action="append", default=None)
    ap.add_argument("--harm-epochs", type=int, default=2)
    ap.add_argument(
        "--warmup-fraction", type=float, default=0.0,
        help="--contrast-only: first tune the reference 1 epoch on this random fraction of the "
        "pool (the job's pool warm-up), lr --warmup-lr",
    )  # fmt: skip
    ap.add_argument("--warmup-lr", type=float, default=1e-4)
    ap.add_argument("--harm-lora", action="store_true",
                    help="--contrast-only: tune LoRA adapters instead of all weights")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pool, target, fams = build(args.n_pool, args.n_target, args.seed)
    labels = [not t.meta.get("planted") for t in pool]
    out: dict = {"args": vars(args), "families": fams, "n_helpful": sum(labels)}
    out["n_planted"] = len(pool) - out["n_helpful"]
    if args.contrast_only:
        out["contrast"] = contrast_rows(args, pool, target)
        return emit_result(out, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        for name, template in (("own template", None), ("chatml-tools", "chatml-tools")):
            cfg = build_job_config(
                proj_dim=args.proj_dim,
                subtask_field="family",
                seed=args.seed,
                chat_template=template,
                max_length=None,
                batch_tokens=args.batch_tokens,
            )
            t0 = time.perf_counter()
            try:
                res = score_pool(
                    args.model, pool, target, Path(tmp) / name.replace(" ", "-"), config=cfg
                )
            except TemplateError as e:
                out[name] = {"refused": str(e)}
                continue
            by_id = res.trajectories.set_index("id")["score"]
            scores = [float(by_id[t.id]) for t in pool]
            out[name] = {
                "auroc_helpful_over_planted": auroc(scores, labels),
                "seconds": time.perf_counter() - t0,
            }
    return emit_result(out, args.out)


def contrast_rows(args, pool, target) -> dict:
    """The contrast harm rows of the pretrained model at each --harm-lr (chatml-tools)."""
    from trajinf.data.tokenize import tokenize_pool
    from trajinf.job.contrast import ContrastConfig, contrast_harm
    from trajinf.models.checkpoints import load_model
    from trajinf.scoring.calibration import flag_rate

    model, tok = load_model(args.model, chat_template="chatml-tools")
    p_tok, t_tok = tokenize_pool(pool, tok), tokenize_pool(target, tok)
    if args.warmup_fraction > 0:  # the job's reference is a warm-up checkpoint that saw the pool
        import random

        from trajinf.train.sft import TrainConfig, train_sft

        k = max(2, round(args.warmup_fraction * len(pool)))
        warm = random.Random(args.seed).sample(list(p_tok), k)
        t0 = time.perf_counter()
        cfg = TrainConfig(epochs=1, lr=args.warmup_lr, seed=args.seed,
                          batch_tokens=args.batch_tokens, log_every=0)  # fmt: skip
        train_sft(model, tok, warm, cfg)
        print(f"warm-up on {k} pool trajectories: {time.perf_counter() - t0:.0f} s", flush=True)
    planted = [bool(t.meta.get("planted")) for t in pool]
    rows = {}
    for lr in args.harm_lr or [1e-3]:
        t0 = time.perf_counter()
        cfg = ContrastConfig(
            epochs=args.harm_epochs, lr=lr, folds=3, batch_tokens=args.batch_tokens,
            lora=args.harm_lora,
        )  # fmt: skip
        h = contrast_harm(model, tok, p_tok, t_tok, subtasks=[t.meta["family"] for t in target],
                          config=cfg)  # fmt: skip
        tr = h.trajectories.set_index("id").loc[[t.id for t in pool]]
        flags = tr["harmful"].to_numpy(bool)
        hits = [int(tr.at[t.id, "worst_step"]) in set(t.meta["planted_steps"])
                for t, p in zip(pool, planted, strict=True) if p]  # fmt: skip
        rows[str(lr)] = {
            "auroc_planted_over_helpful": auroc(tr["harm"].to_numpy(float), planted),
            "fpr_helpful": flag_rate(flags[[not p for p in planted]]),
            "recall_planted": flag_rate(flags[planted]),
            "planted_step_top1": sum(hits) / max(1, len(hits)),
            "threshold": h.info["threshold"],
            "seconds": time.perf_counter() - t0,
        }
        print(lr, {k: v for k, v in rows[str(lr)].items() if k != "fpr_helpful"}, flush=True)
    return rows


if __name__ == "__main__":
    main()
