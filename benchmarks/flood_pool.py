"""Pool one flood method's paired difference to a baseline over several flood runs (issue 15).

Each run (an OUT directory of `trajinf bench --scenarios flood` or `flood_confirm.py`, with
OUT/<env>/rounds.jsonl) is a task set; its seeds pair the method with the baseline. The seeds of
all runs are pooled into one paired t-test per round (`trajinf.loop.steps.paired_tests`):

    python benchmarks/flood_pool.py runs/flood-s9-tw-r0 runs/flood-s9c-tw-r0 runs/flood-s9h-tw-b \
        --method "inf-adv|succ/task" --against rs

A run given as ``DIR_A,DIR_B`` reads the method's rows from DIR_A and the baseline's from DIR_B
(two processes of one task set, side by side: their round-1 pools are the same).

Prints a markdown table (per round: each run's mean difference, the pooled difference, p, seeds
ahead / behind) and writes it as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from trajinf.bench.env_bench import read_jsonl
from trajinf.loop.steps import paired_tests


def _rows(run: Path) -> list[dict]:
    files = sorted(run.glob("*/rounds.jsonl"))
    if len(files) != 1:
        raise SystemExit(f"{run}: expected one <env>/rounds.jsonl, found {len(files)}")
    return read_jsonl(files[0])


def pooled(runs: list[Path | str], method: str, against: str) -> dict:
    """{round: {"runs": {run: mean diff}, "mean_diff", "p_value", "n", "n_ahead", "n_behind"}}.
    A run ``"A,B"`` takes the method's rows from A and the baseline's from B."""
    per: dict[int, dict[str, list]] = {}
    for run in map(str, runs):
        first, _, second = run.partition(",")
        rows = [r for r in _rows(Path(first)) if r["method"] == method]
        rows += [r for r in _rows(Path(second or first)) if r["method"] == against]
        by = {(r["method"], r["round"], r["seed"]): r["success"] for r in rows}
        for rnd in sorted({r["round"] for r in rows if r["method"] == method}):
            seeds = sorted(
                s for (m, rr, s) in by if m == method and rr == rnd and (against, rnd, s) in by
            )
            d = per.setdefault(rnd, {"a": [], "b": [], "runs": {}})
            a = [by[(method, rnd, s)] for s in seeds]
            b = [by[(against, rnd, s)] for s in seeds]
            d["a"] += a
            d["b"] += b
            d["runs"][run] = float(np.mean(np.subtract(a, b))) if seeds else None
    out = {}
    for rnd, d in sorted(per.items()):
        diff = np.subtract(d["a"], d["b"])
        t = paired_tests({method: d["a"], against: d["b"]}, against=(against,))
        # paired_tests needs 2 seeds; with fewer the difference is still what it is
        none = {"mean_diff": float(diff.mean()) if len(diff) else 0.0, "p_value": None}
        t = t.get(f"{method} vs {against}", {**none, "n": len(diff)})
        out[rnd] = {
            "runs": d["runs"],
            **t,
            "n_ahead": int((diff > 0).sum()),
            "n_behind": int((diff < 0).sum()),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="flood output directories (or DIR_A,DIR_B pairs)")
    ap.add_argument("--method", required=True)
    ap.add_argument("--against", default="rs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    res = pooled(args.runs, args.method, args.against)
    names = [",".join(Path(x).name for x in r.split(",")) for r in args.runs]
    print(f"| after round | {' | '.join(names)} | pooled | p | n | seeds ahead / behind |")
    print("|---" * (len(names) + 5) + "|")
    for rnd, r in res.items():
        cells = [
            "" if r["runs"].get(x) is None else f"{100 * r['runs'][x]:+.1f}" for x in args.runs
        ]
        p = "–" if r["p_value"] is None else f"{r['p_value']:.3f}"
        print(
            f"| {rnd} | {' | '.join(cells)} | {100 * r['mean_diff']:+.1f} | {p} | {r['n']} | "
            f"{r['n_ahead']} / {r['n_behind']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
