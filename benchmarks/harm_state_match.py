"""Matched states: can a pool step be compared with the target's steps in the same state
(issue 13, ToolWorld)?

    python benchmarks/harm_state_match.py runs/h-tw/builtin base warm

A planted ToolWorld demo takes the wrong part (or key) for a cue read earlier in the episode.
A target-based check that needs no tuning is a nearest-neighbour one: at the pool step's
decision, retrieve the target steps whose state is closest (the reference model's last hidden
state before the chosen part or key, centred, cosine) and ask whether they chose the same item;
a planted step should disagree with its neighbours. That works only if the state representation
carries the cue. For a finished ``trajinf bench --harm --env builtin`` env directory and each
reference (``base``: the base agent, ``warm``: the last warm-up checkpoint), per family (repair:
symptom -> part, unlock: lock colour -> key) this prints:

- ``cue_acc_target``: how often the nearest target step has the pool step's cue (chance ~ 1/4);
- ``cue_acc_pool``: the same with the nearest other pool step, where the planted and expert demos
  of one task share their prefix (an upper bound inflated by those twins);
- ``auroc_k1`` / ``auroc_k3``: planted > expert AUROC of the disagreement with the k nearest
  target steps.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from trajinf.bench.harm import reference_dir
from trajinf.bench.perf import emit_result
from trajinf.data.tokenize import tokenize_pool
from trajinf.data.trajectories import load_pool
from trajinf.envs.evaluate import auroc
from trajinf.envs.families import KEY, PART
from trajinf.models.checkpoints import load_model


def cue_of(t) -> str | None:
    """The decision's cue of a repair (symptom) or unlock (lock colour) trajectory."""
    text = " ".join(m.get("content") or "" for m in t.messages if m["role"] in ("tool", "user"))
    if t.meta.get("family") == "repair":
        return next((s for s in PART if f" {s}." in text), None)
    m = re.search(r"has a (\w+) lock", text)
    return m.group(1) if m else None


def decision_states(model, tok, trajs) -> list[dict]:
    """One row per 'take <part or key>' step: the last hidden state before the item's first
    token, the item, the cue, family and kind (target, expert, planted, other)."""
    items = tokenize_pool(trajs, tok)
    out = []
    for t, it in zip(trajs, items, strict=True):
        fam, cue = t.meta.get("family"), cue_of(t)
        wanted = set(PART.values()) if fam == "repair" else {f"{c} key" for c in KEY}
        with torch.no_grad():
            h = model(torch.tensor([it.input_ids]), output_hidden_states=True).hidden_states[-1]
        am, sid = np.asarray(it.action_mask, bool), np.asarray(it.step_ids)
        acts = [m for m in t.messages if m["role"] == "assistant"]
        for k, m in enumerate(acts):
            f = m["tool_calls"][0]["function"]
            item = json.loads(f["arguments"]).get("item")
            if f["name"] != "take" or item not in wanted:
                continue
            word = item.split()[0]
            pos = [
                p for p in np.flatnonzero(am & (sid == k)) if word in tok.decode([it.input_ids[p]])
            ]
            if not pos:
                continue
            kind = t.source if t.source in ("target", "expert") else "other"
            out.append({"h": h[0, pos[0] - 1].numpy(), "item": item, "cue": cue, "family": fam,
                        "kind": "planted" if t.meta.get("planted") else kind})  # fmt: skip
    return out


def family_rows(rows: list[dict]) -> dict:
    x = np.stack([r["h"] for r in rows]).astype(np.float64)
    x -= x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cue = np.array([r["cue"] for r in rows])
    item = np.array([r["item"] for r in rows])
    kind = np.array([r["kind"] for r in rows])
    tgt = kind == "target"
    sim = x[~tgt] @ x[tgt].T
    own = x @ x.T
    np.fill_diagonal(own, -np.inf)
    pool_only = own[np.ix_(~tgt, ~tgt)]
    res = {
        "n_target": int(tgt.sum()),
        "n_pool": int((~tgt).sum()),
        "cue_acc_target": float(np.mean(cue[tgt][sim.argmax(1)] == cue[~tgt])),
        "cue_acc_pool": float(np.mean(cue[~tgt][pool_only.argmax(1)] == cue[~tgt])),
    }
    lab = kind[~tgt]
    both = (lab == "planted") | (lab == "expert")
    res.update(n_planted=int((lab == "planted").sum()), n_expert=int((lab == "expert").sum()))
    for k in (1, 3):
        top = np.argsort(-sim, 1)[:, :k]
        agree = np.array([np.mean(item[tgt][top[i]] == item[~tgt][i]) for i in range(len(top))])
        if (lab == "planted").any() and (lab == "expert").any():
            res[f"auroc_k{k}"] = auroc(-agree[both], (lab == "planted")[both])
    return res


def main(d: Path, refs: list[str]) -> dict:
    torch.set_num_threads(2)
    trajs = load_pool(d / "data" / "pool_mixed.jsonl") + load_pool(
        d / "data" / "target_demos.jsonl"
    )
    trajs = [t for t in trajs if t.meta.get("family") in ("repair", "unlock") and cue_of(t)]
    out: dict = {}
    for ref in refs:
        model, tok = load_model(reference_dir(d / "data", ref))
        model.eval()
        rows = decision_states(model, tok, trajs)
        for fam in ("repair", "unlock"):
            r = family_rows([x for x in rows if x["family"] == fam])
            out[f"{ref}/{fam}"] = r
            print(ref, fam, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
    return emit_result(out, None)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["base", "warm"])
