"""Does a model's own surprise at a step find planted harm, with no tuning at all (issue 13)?

    python benchmarks/harm_surprise.py runs/tw-harm-bind-all/builtin base warm
    python benchmarks/harm_surprise.py runs/bench-harm-contrast/twx base warm

For a finished ``trajinf bench --harm`` env directory (or one of ``benchmarks/harm_binding.py``):
each action token's log-probability under a reference model (``base``: the base agent,
``warm``: the last warm-up checkpoint), raw or minus the median log-probability of the same
token id over every action token of the pool ("norm": a device name the agent copies badly is
hard everywhere; a part that is right in most demos and wrong in a planted one is hard only
there); a step's value is its lowest token, the trajectory's harm score is its largest drop
(``statistic`` drop: below the median of its other steps; min: the lowest step). Prints the
planted vs known-good AUROC (all, within the planted families, per planted family) and the
planted-step top-1 of the worst step. Exploration: no calibrated flag (the contrast signal,
``--harm-signal contrast``, is the library's).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from trajinf.bench.harm import reference_dir
from trajinf.bench.perf import emit_result
from trajinf.data.tokenize import tokenize_pool
from trajinf.data.trajectories import load_pool
from trajinf.envs.evaluate import auroc
from trajinf.job.contrast import action_logprobs, step_minima
from trajinf.models.checkpoints import load_model
from trajinf.scoring.calibration import step_drops
from trajinf.train.sft import pad_id


def token_medians(items, logprobs) -> dict[int, float]:
    """Median log-probability of every token id over the pool's action tokens."""
    ids = np.concatenate(
        [np.asarray(it.input_ids)[np.asarray(it.action_mask, bool)] for it in items]
    )
    lp = np.concatenate(
        [x[np.asarray(it.action_mask, bool)] for it, x in zip(items, logprobs, strict=True)]
    )
    return {int(t): float(np.median(lp[ids == t])) for t in np.unique(ids)}


def step_values(items, logprobs, medians: dict[int, float] | None):
    """(values [K], owner [K], step [K]): the lowest (normalized) action-token log-prob per
    step (:func:`trajinf.job.contrast.step_minima` of the log-probs, minus each token id's
    median with ``medians``)."""
    if medians is not None:
        logprobs = [
            np.asarray(x, np.float64) - np.array([medians.get(int(t), 0.0) if m else 0.0
                                                  for t, m in zip(it.input_ids, it.action_mask,
                                                                  strict=True)])
            for it, x in zip(items, logprobs, strict=True)
        ]  # fmt: skip
    return step_minima(items, [np.zeros_like(x) for x in logprobs], logprobs)


def main(d: Path, refs: list[str]) -> dict:
    torch.set_num_threads(1)
    pool = load_pool(d / "data" / "pool_mixed.jsonl")
    planted = np.array([bool(t.meta.get("planted")) for t in pool])
    good = np.array([t.source == "expert" and not t.meta.get("planted") for t in pool])
    fam = np.array([t.meta.get("family") for t in pool])
    both = planted | good
    pfams = sorted({f for f, p in zip(fam, planted, strict=True) if p})
    out: dict = {}
    for ref in refs:
        model, tok = load_model(reference_dir(d / "data", ref))
        items = tokenize_pool(pool, tok)
        lp = action_logprobs(model, items, pad_id(tok))
        med = token_medians(items, lp)
        for norm in (False, True):
            vals, owner, steps = step_values(items, lp, med if norm else None)
            for stat in ("drop", "min"):
                _, harm, worst = step_drops(vals, owner, len(items), stat)
                hits = [steps[worst[i]] in (pool[i].meta.get("planted_steps") or [])
                        for i in np.where(planted)[0] if worst[i] >= 0]  # fmt: skip
                row = {
                    "auroc": auroc(harm[both], planted[both]),
                    "auroc_same_family": auroc(
                        harm[both & np.isin(fam, pfams)], planted[both & np.isin(fam, pfams)]
                    ),  # fmt: skip
                    "per_family": {
                        f: auroc(harm[both & (fam == f)], planted[both & (fam == f)]) for f in pfams
                    },  # fmt: skip
                    "planted_step_top1": float(np.mean(hits)) if hits else None,
                }
                key = f"{d.name}|{ref}|{'norm' if norm else 'raw'}|{stat}"
                out[key] = row
                fams = " ".join(f"{f} {v:.3f}" for f, v in row["per_family"].items())
                print(f"{key:32s} AUROC {row['auroc']:.3f} (same family "
                      f"{row['auroc_same_family']:.3f}; {fams}) planted-step top-1 "
                      f"{row['planted_step_top1']:.2f}", flush=True)  # fmt: skip
    return emit_result(out, d / "harm_surprise.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["base", "warm"])
