"""The pretrained agent's speed in an environment: the model policy with and without the KV
cache carried across steps (ModelPolicy(reuse_cache=True)), on the same greedy episodes.

Reports wall and CPU seconds of each (CPU time is less sensitive to other load on a shared
machine), steps taken, success, and whether both chose the same actions.

    python benchmarks/real_agent_speed.py --env twx --n-tasks 4 --max-steps 10
"""

from __future__ import annotations

import argparse
import time

import torch

from trajinf.bench.perf import emit_result
from trajinf.envs import make_env
from trajinf.envs.model_policy import ModelPolicy
from trajinf.envs.rollout import rollout
from trajinf.models.checkpoints import load_model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chat-template", default="chatml-tools")
    ap.add_argument("--env", default="twx")
    ap.add_argument("--n-tasks", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, chat_template=args.chat_template)
    env = make_env(args.env)
    tasks = env.tasks("test", args.n_tasks, 0)
    out: dict = {"args": vars(args)}
    actions = {}
    for name, reuse in (("kv_cache_across_steps", True), ("prompt_per_step", False)):
        policy = ModelPolicy(model, tok, mode="rank", temperature=0.0, reuse_cache=reuse)
        w0, c0 = time.perf_counter(), time.process_time()
        trajs = rollout(
            env, tasks, policy, source="eval", seed=0, with_tools=False, max_steps=args.max_steps
        )
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        steps = sum(len(t.steps()) for t in trajs)
        actions[name] = [
            [m.get("content") for m in t.messages if m["role"] == "assistant"] for t in trajs
        ]
        out[name] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "steps": steps,
            "cpu_s_per_step": cpu / max(1, steps),
            "success": sum(bool(t.success) for t in trajs) / len(trajs),
        }
    out["same_actions"] = actions["kv_cache_across_steps"] == actions["prompt_per_step"]
    out["cpu_speedup"] = out["prompt_per_step"]["cpu_s"] / out["kv_cache_across_steps"]["cpu_s"]
    return emit_result(out, args.out)


if __name__ == "__main__":
    main()
