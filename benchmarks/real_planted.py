"""Planted cases with a real pretrained model: do helpful demonstrations score above planted
harmful ones (demos wrong at one decision point, labelled successful)?

ToolWorld (the built-in env, actions are tool calls): pool = expert demos (helpful) and planted
harmful demos of the target families; target = expert demos of other tasks of those families.
Scored by `score_pool` with the pretrained model (no warmup checkpoints: plain gradients) once
with its own chat template (refused when it drops tool calls) and once with --chat-template
chatml-tools. Reports AUROC(score: helpful > planted).

    python benchmarks/real_planted.py --out planted.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

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
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pool, target, fams = build(args.n_pool, args.n_target, args.seed)
    labels = [not t.meta.get("planted") for t in pool]
    out: dict = {"args": vars(args), "families": fams, "n_helpful": sum(labels)}
    out["n_planted"] = len(pool) - out["n_helpful"]
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
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return out


if __name__ == "__main__":
    main()
