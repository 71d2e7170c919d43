"""ToolWorld harm with an agent that knows the rule (issue 13): does the harm flag miss the
planted ToolWorld demos only because the tiny agent cannot learn the cue -> part binding?

    python benchmarks/harm_binding.py --out runs/tw-harm-bind              # 320 base demos of
    python benchmarks/harm_binding.py --out runs/tw-harm-bind-all \\         # repair + unlock,
        --n-base 640 --base-families all                                     # or of all families
    python benchmarks/harm_binding.py --out runs/tw-harm-ru --probe-only    # the preset's agent
    python benchmarks/harm_binding.py --out runs/tw-harm-bind --probe-only \
        --contrast 2:3e-3 4:3e-3 8:3e-3 4:1e-2 8:1e-2                       # harder tunings

Runs the ToolWorld plan of ``trajinf bench --harm --env builtin --seeds 5`` with another agent
recipe: tiny model hidden 128 (the preset: 64), lr 3e-3 for every training of the run (the
preset: the demo's 1e-2), the base agent trained ``--epochs`` epochs on ``--n-base`` expert demos
of ``--base-families``. Then it probes what the agents know: at the "take part" step of every
repair demo of the pool, the log-probability of the whole action with each part in the toolbox;
it prints how often the rule's part is the most likely, at the base agent and at the last
warm-up checkpoint (the model the harm flag is computed from). The harm rows of the run come
from ``python benchmarks/harm_signals.py ROOT`` with ``ROOT/builtin`` linked to ``OUT/builtin``.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from trajinf.bench.env_bench import BenchConfig
from trajinf.bench.harm import flag_report, reference_dir
from trajinf.bench.perf import emit_result
from trajinf.bench.runner import run_bench
from trajinf.data.trajectories import load_pool
from trajinf.envs.families import PART, PART_WRONG
from trajinf.models.checkpoints import load_model


def action_logprob(model, tok, history: list[dict], message: dict, tools) -> float:
    """log p(the assistant ``message`` | ``history``) under ``model``'s chat template."""
    prompt = tok.apply_chat_template(history, tools=tools, tokenize=False,
                                     add_generation_prompt=True)  # fmt: skip
    full = tok.apply_chat_template([*history, message], tools=tools, tokenize=False)
    a = tok(prompt, add_special_tokens=False)["input_ids"]
    b = tok(full, add_special_tokens=False)["input_ids"]
    if b[: len(a)] != a:
        raise ValueError("chat template: history + message does not extend the prompt")
    with torch.no_grad():
        lp = model(torch.tensor([b])).logits.log_softmax(-1)[0]
    return float(sum(lp[i - 1, b[i]] for i in range(len(a), len(b))))


def probe_binding(model_dir: Path, pool) -> dict:
    """Per repair demo of ``pool`` (expert or planted) at its first "take" step: the whole
    action's log-probability with the rule's part, the planted rule's part and the spare one."""
    model, tok = load_model(model_dir)
    model.eval()
    rows = []
    for t in pool:
        if t.meta.get("family") != "repair" or t.source != "expert":
            continue
        m = t.messages
        cue = next(x["content"] for x in m if x["role"] == "tool" and any(s in x["content"]
                                                                         for s in PART))  # fmt: skip
        symptom = next(s for s in PART if s in cue)
        i = next(i for i, x in enumerate(m) if x["role"] == "assistant"
                 and x["tool_calls"][0]["function"]["name"] == "take")  # fmt: skip
        box = m[i - 1]["content"]
        args = json.loads(m[i]["tool_calls"][0]["function"]["arguments"])
        lp = {}
        for part in (p for p in PART.values() if p in box):
            msg = copy.deepcopy(m[i])
            msg["tool_calls"][0]["function"]["arguments"] = json.dumps({**args, "item": part})
            lp[part] = action_logprob(model, tok, m[:i], msg, t.tools)
        right, wrong = PART[symptom], PART_WRONG[symptom]
        spare = max(v for k, v in lp.items() if k not in (right, wrong))
        rows.append([lp[right], lp[wrong], spare])
    r = np.array(rows)
    return {
        "n": len(r),
        "mean_logprob_right_wrong_spare": r.mean(0).round(3).tolist(),
        "argmax_right": float(np.mean(r.argmax(1) == 0)),
        "argmax_wrong": float(np.mean(r.argmax(1) == 1)),
    }


def contrast_sweep(d: Path, pool, specs: list[str]) -> dict:
    """Harm rows of the contrast signal at the run's last warm-up checkpoint for each tuning
    ``EPOCHS:LR`` (the job's default is 2:1e-3)."""
    from trajinf.data.tokenize import tokenize_pool
    from trajinf.job.contrast import ContrastConfig, contrast_harm
    from trajinf.selection.export import read_scores

    target = load_pool(d / "target_demos.jsonl")
    warm = reference_dir(d, "warm")
    scores, steps, _ = read_scores(d.parent / "mixed" / "scores" / "inf")
    families = json.loads((d / "demo.json").read_text())["target_families"]
    out = {}
    for spec in specs:
        epochs, lr = spec.split(":")
        model, tok = load_model(warm)
        h = contrast_harm(
            model, tok, tokenize_pool(pool, tok), tokenize_pool(target, tok),
            subtasks=[t.meta.get("family") for t in target],
            config=ContrastConfig(epochs=int(epochs), lr=float(lr)),
        )  # fmt: skip
        rep = flag_report(pool, scores, steps, h, budget=0.1, families=families)
        out[spec] = {k: v for k, v in rep.items() if k.startswith(("auroc", "fpr", "recall"))}
        print(spec, {k: v if not isinstance(v, dict) else (v.get("k"), v.get("n"))
                     for k, v in out[spec].items()}, flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-base", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--base-families", default="repair,unlock", help="comma list, or all")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--probe-only", action="store_true", help="probe an existing run's agents")
    ap.add_argument("--contrast", nargs="*", default=[], metavar="EPOCHS:LR",
                    help="also the contrast flag at these tunings (e.g. 4:3e-3)")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    if not args.probe_only:
        cfg = BenchConfig.harm().with_options(env="builtin", seeds=args.seeds)
        plan = cfg.plans[0]
        fams = None if args.base_families == "all" else args.base_families.split(",")
        demo = {**plan.demo, "model": {"hidden": args.hidden}, "lr": args.lr,
                "n_base_tasks": args.n_base, "base_epochs": args.epochs, "base_families": fams}  # fmt: skip
        run_bench(replace(cfg, plans=[replace(plan, demo=demo)]), out)
    d = out / "builtin" / "data"
    pool = load_pool(d / "pool_mixed.jsonl")
    info = json.loads((d / "demo.json").read_text())
    warm = reference_dir(d, "warm")
    res = {
        "base_success": info["base_success"]["success_rate"],
        "base_per_family": info["base_success"]["per_family"],
        "binding_base": probe_binding(reference_dir(d, "base"), pool),
        "binding_warmup": probe_binding(warm, pool),
        "contrast": contrast_sweep(d, pool, args.contrast),
    }
    return emit_result(res, out / "binding.json")


if __name__ == "__main__":
    main()
