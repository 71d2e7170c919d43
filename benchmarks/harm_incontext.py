"""Does a pretrained model that reads the target in context know the rule a planted demo breaks
(issue 13, ToolWorld)?

    python benchmarks/harm_incontext.py --families repair,unlock --n-target 8 --n-pool 20

ToolWorld's planted demos follow a wrong rule at a decision point (a lamp that sparks gets a seal
instead of a fuse; a red lock gets the blue key). The tiny agents of ``trajinf bench --harm`` do
not learn the rule from the target (docs/benchmarks.md, "Harm detection and repair"), so no
signal that reads them can see the planted step. This asks whether SmolLM2-135M-Instruct (the
bundled pretrained model) does, with the target's expert demos as few-shot examples in its
context (no tuning): per family, ``--n-target`` expert demos are rendered as plain text ("> take
fuse from case" for an action, the observation on its own line) and put before each pool demo
(``--n-pool`` expert demos and the planted demos of the same tasks). Each action token's
log-probability is read with the examples in context ("icl"), without them ("zero"), and their
difference ("delta"); a step's value is its lowest token, and the trajectory's harm is its lowest
step ("min") or that step's drop below the median of its steps ("drop"). Prints, per family and
signal, AUROC planted > expert and the planted-step top-1 of the located step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from trajinf.bench.perf import emit_result
from trajinf.data.schema import Trajectory
from trajinf.envs import make_env
from trajinf.envs.evaluate import auroc
from trajinf.envs.families import GRAMMAR
from trajinf.envs.policies import ExpertPolicy, PlantedHarmfulPolicy
from trajinf.envs.rollout import rollout
from trajinf.models.load import load_tokenizer, resolve_model_dir


def render(t: Trajectory) -> list[tuple[str, bool]]:
    """(line, is_action) of a ToolWorld trajectory after its system prompt."""
    out = []
    for m in t.messages[1:]:
        if m["role"] == "assistant":
            out.append(("> " + GRAMMAR.from_message(m), True))
        else:
            out.append((m["content"], False))
    return out


def prefix_cache(model, prefix: list[int]):
    """(cache, last logits) of ``prefix``: the examples run once, every pool demo reuses them."""
    with torch.no_grad():
        out = model(torch.tensor([prefix]), use_cache=True)
    return out.past_key_values, out.logits[0, -1]


def step_logprobs(model, tok, lines, prefix: list[int], cache=None) -> list[np.ndarray]:
    """Per action step, the log-probabilities of its tokens after ``prefix`` (token ids);
    ``cache``: :func:`prefix_cache` of that prefix (the same numbers, without rerunning it)."""
    ids, spans = [], []
    for text, is_action in lines:
        piece = tok(text + "\n", add_special_tokens=False)["input_ids"]
        if is_action:
            spans.append((len(ids), len(ids) + len(piece) - 1))  # without the newline
        ids += piece
    x = torch.tensor([ids])
    with torch.no_grad():
        if cache is None:
            logits = model(torch.tensor([list(prefix) + ids])).logits[0, len(prefix) - 1 : -1]
        else:
            past, last = cache
            n = past.get_seq_length()
            logits = torch.cat([last[None], model(x, past_key_values=past).logits[0, :-1]])
            past.crop(n - past.get_seq_length())  # back to the prefix alone for the next demo
    lp = torch.log_softmax(logits.float(), -1)
    tok_lp = lp.gather(1, x[0, :, None])[:, 0].numpy()
    return [tok_lp[a:b] for a, b in spans]


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--families", default="repair,unlock")
    ap.add_argument("--n-target", type=int, default=8)
    ap.add_argument("--n-pool", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the result JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    path = resolve_model_dir(a.model)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    env = make_env("builtin")
    tasks = env.tasks("train", 400, a.seed)
    kw = dict(seed=a.seed, with_tools=False)
    result: dict = {"model": a.model, "n_target": a.n_target, "families": {}}
    for fam in a.families.split(","):
        ft = [t for t in tasks if t.family == fam]
        # the pool comes first, so every --n-target scores the same pool
        pool_tasks = ft[: a.n_pool]
        target = rollout(env, ft[a.n_pool : a.n_pool + a.n_target], ExpertPolicy(),
                         source="target", **kw)  # fmt: skip
        expert = rollout(env, pool_tasks, ExpertPolicy(), source="expert", **kw)
        planted = rollout(env, pool_tasks, PlantedHarmfulPolicy(), source="expert",
                          id_prefix="planted", **kw)  # fmt: skip
        planted = [t for t in planted if t.meta.get("planted")]
        shots = "\n\n".join("\n".join(line for line, _ in render(t)) for t in target)
        icl = tok(f"Examples of solved episodes:\n\n{shots}\n\nNew episode:\n",
                  add_special_tokens=False)["input_ids"]  # fmt: skip
        zero = tok("New episode:\n", add_special_tokens=False)["input_ids"]
        icl_cache, zero_cache = prefix_cache(model, icl), prefix_cache(model, zero)
        t0 = time.perf_counter()
        vals: dict[str, list] = {"expert": [], "planted": []}
        for kind, trajs in (("expert", expert), ("planted", planted)):
            for t in trajs:
                lines = render(t)
                w = step_logprobs(model, tok, lines, icl, icl_cache)
                z = step_logprobs(model, tok, lines, zero, zero_cache)
                steps = {
                    "icl": [x.min() for x in w],
                    "zero": [x.min() for x in z],
                    "delta": [(x - y).min() for x, y in zip(w, z, strict=True)],
                }
                vals[kind].append((steps, set(t.meta.get("planted_steps") or [])))
        row: dict = {"n_expert": len(expert), "n_planted": len(planted),
                     "prefix_tokens": len(icl), "seconds": time.perf_counter() - t0}  # fmt: skip
        for sig in ("icl", "zero", "delta"):
            for stat in ("min", "drop"):

                def harm(steps, sig=sig, stat=stat):
                    v = np.asarray(steps[sig])
                    return -(v.min() - (np.median(v) if stat == "drop" else 0.0))

                p = [harm(s) for s, _ in vals["planted"]]
                g = [harm(s) for s, _ in vals["expert"]]
                row[f"{sig}_{stat}_auroc"] = auroc(p + g, [1] * len(p) + [0] * len(g))
            row[f"{sig}_planted_step_top1"] = float(
                np.mean([int(np.argmin(s[sig])) in bad for s, bad in vals["planted"]])
            )
        result["families"][fam] = row
        print(fam, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)  # fmt: skip
    emit_result(result, a.out)
    return result


if __name__ == "__main__":
    main()
