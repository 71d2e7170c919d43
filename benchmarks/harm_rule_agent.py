"""Does a tiny agent that has learnt one ToolWorld family find the planted demos of it by its own
surprise (issue 13)?

    python benchmarks/harm_rule_agent.py --family unlock --n-demos 640 --epochs 30

Trains a tiny agent (``--hidden``, ``--layers``, lr ``--lr``, the demo's schedule otherwise) on
``--n-demos`` expert demos of one family, measures its greedy success on 40 test tasks of that
family, and scores 30 held-out expert demos and the planted demos of the same tasks by the
``logprob`` harm signal at the trained agent (a step's value is its least likely action token;
the harm is the lowest step, ``min``, or its drop below the other steps, ``drop``). Prints the
AUROC planted > expert.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from trajinf.bench.perf import emit_result
from trajinf.data.tokenize import tokenize_pool
from trajinf.envs import make_env
from trajinf.envs.evaluate import auroc, evaluate_policy
from trajinf.envs.model_policy import ModelPolicy
from trajinf.envs.policies import ExpertPolicy, PlantedHarmfulPolicy
from trajinf.envs.rollout import rollout
from trajinf.job.contrast import logprob_values
from trajinf.models.tiny import tiny_model, tokenizer_corpus, train_tokenizer
from trajinf.scoring.calibration import step_drops
from trajinf.train.sft import DEMO_TRAIN, train_sft


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default="unlock")
    ap.add_argument("--n-demos", type=int, default=640)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the result JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    env, kw = make_env("builtin"), dict(seed=0, with_tools=False)
    tasks = [t for t in env.tasks("train", 12 * a.n_demos, 0) if t.family == a.family]
    demos = rollout(env, tasks[: a.n_demos], ExpertPolicy(), source="base", **kw)
    held = tasks[a.n_demos : a.n_demos + 30]
    expert = rollout(env, held, ExpertPolicy(), source="expert", **kw)
    planted = rollout(env, held, PlantedHarmfulPolicy(), source="expert", id_prefix="p", **kw)
    planted = [t for t in planted if t.meta.get("planted")]
    tok = train_tokenizer(tokenizer_corpus(demos + expert + planted), vocab_size=1024)
    model = tiny_model(tok, hidden=a.hidden, layers=a.layers, heads=4, seed=0)
    t0 = time.perf_counter()
    train_sft(model, tok, demos, replace(DEMO_TRAIN, epochs=a.epochs, lr=a.lr))
    seconds = time.perf_counter() - t0
    model.eval()
    policy = ModelPolicy(model, tok, mode="rank", temperature=0.0)
    success = evaluate_policy(env, policy, split="test", n_tasks=40, seed=0,
                              families=[a.family], with_tools=False).to_dict()  # fmt: skip
    items = tokenize_pool(expert + planted, tok)
    values, owner, _ = logprob_values(model, tok, items, 8192)
    labels = [0] * len(expert) + [1] * len(planted)
    res = {**vars(a), "train_seconds": seconds, "success": success["success_rate"],
           "n_expert": len(expert), "n_planted": len(planted)}  # fmt: skip
    for stat in ("min", "drop"):
        res[f"auroc_{stat}"] = auroc(step_drops(values, owner, len(items), stat)[1], labels)
    return emit_result(res, a.out)


if __name__ == "__main__":
    main()
