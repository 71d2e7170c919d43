"""Rounds of the flood: rollout -> select -> fine-tune -> rollout again, one agent per method.

Every (seed, method) starts from the same cached agent (``agents.py``). Round 1's flood is
shared by all methods of a seed (same agent, same sampling seed); from round 2 on each method
samples its own flood with its own agent. Each round fine-tunes the method's current agent on
its selection for the same number of optimizer steps (``finetune_steps``, however many rollouts
were picked; with ``replay`` > 0 the base agent's own expert demos are mixed in, ``replay`` x the
pick's size, the same for every method) and evaluates it greedily on the fixed held-out test
tasks. Rows are appended to ``rounds.jsonl`` as they finish and each method's latest agent is kept on disk, so an
interrupted run resumes where it stopped; ``flood.json``, ``flood.md`` and ``flood.html`` (the
per-round plot) are rewritten at the end.

Reported per method and round: held-out success, *competence expansion* (success on the test
tasks the starting agent failed), the selection's size and success share, and the selection
step's cost in training-epoch units (its seconds over one epoch of fine-tuning on the round-1
flood; the rollouts are the same for every method and are not counted).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from trajinf.atomic import write_json
from trajinf.bench.agents import agent_demos, cached_agent
from trajinf.bench.env_bench import append_jsonl, read_jsonl
from trajinf.bench.flood import (
    NEEDS_SCORES,
    FloodConfig,
    evaluate_tasks,
    flood_summary,
    flood_tasks,
    roll_flood,
    score_flood,
    select_flood,
)

EXTENSIBLE = ("seeds", "rounds", "methods", "later_methods")


def _key(method: str, seed: int, rnd: int) -> str:
    return f"{method}|{seed}|{rnd}"


def _finetune(agent_dir: Path, chosen, config: FloodConfig, seed: int, out: Path) -> dict:
    """Fine-tune the agent at ``agent_dir`` on ``chosen`` for ~``finetune_steps`` steps and save
    it to ``out`` (written under a temporary name, then renamed)."""
    from trajinf.models.checkpoints import load_model
    from trajinf.train.sft import DEMO_TRAIN, train_sft

    model, tok = load_model(agent_dir)
    epochs = max(1, math.ceil(config.finetune_steps * DEMO_TRAIN.batch_size / max(1, len(chosen))))
    res = train_sft(
        model,
        tok,
        list(chosen),
        replace(DEMO_TRAIN, epochs=epochs, lr=config.finetune_lr, seed=seed, log_every=0),
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"steps": res.steps, "seconds": res.wall_time}


def _epoch_seconds(agent_dir: Path, pool, config: FloodConfig, out: Path) -> float:
    """Seconds of one fine-tuning epoch over ``pool`` (the cost unit), measured once."""
    from trajinf.models.checkpoints import load_model
    from trajinf.train.sft import DEMO_TRAIN, train_sft

    path = out / "epoch.json"
    if path.exists():
        return float(json.loads(path.read_text())["seconds"])
    model, tok = load_model(agent_dir)
    t0 = time.perf_counter()
    train_sft(model, tok, list(pool), replace(DEMO_TRAIN, epochs=1, log_every=0))
    s = time.perf_counter() - t0
    write_json({"seconds": s, "n_pool": len(pool)}, path)
    return s


def _pool(path: Path, make):
    """The flood pool at ``path`` (sampled by ``make()`` and written once)."""
    from trajinf.data.trajectories import load_pool
    from trajinf.data.write import write_pool

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_pool(make(), tmp)
        tmp.replace(path)
    return load_pool(path)


def run_flood(config: FloodConfig, out: str | Path, *, log=print, progress=None) -> dict:
    """All rounds of every (seed, method) in one environment; returns the results dict."""
    import torch

    from trajinf.data.trajectories import load_pool
    from trajinf.data.write import write_pool
    from trajinf.envs import make_env
    from trajinf.envs.early_experience import early_experience
    from trajinf.envs.policies import ExpertPolicy, PlantedHarmfulPolicy
    from trajinf.envs.rollout import rollout
    from trajinf.models.checkpoints import load_model

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # rows are keyed by (method, seed, round): more seeds, rounds or methods extend a run
    ident = {k: v for k, v in asdict(config).items() if k not in EXTENSIBLE}
    for name in ("planted", "length_penalty", "replay"):  # runs made before a field existed resume
        if not ident.get(name):
            ident.pop(name, None)
    stamp = json.dumps(ident, sort_keys=True, default=str)
    if (out / "config.json").exists() and (out / "config.json").read_text() != stamp:
        raise_changed(out)
    (out / "config.json").write_text(stamp)
    env = make_env(config.env)
    agent_dir, agent_info = cached_agent(config.agent, log=log)
    fams = agent_info["target_families"]
    train, test, demo_tasks = flood_tasks(env, config, fams)
    demos = rollout(env, demo_tasks, ExpertPolicy(), source="target", with_tools=False)
    experts = []
    if config.n_experts:
        n_max = max(0, (len(train) * config.k) // 9)  # keep self rollouts >= 90 %
        experts = rollout(
            env, train[: min(config.n_experts, n_max)], ExpertPolicy(), source="expert",
            with_tools=False,
        )  # fmt: skip
    # the base agent's own SFT data, replayed into every fine-tune
    sft_demos = agent_demos(env, config.agent, source="replay") if config.replay else []
    model, tok = load_model(agent_dir)
    base_eval = evaluate_tasks(env, model, tok, test)
    failed = {t for t, ok in base_eval.items() if not ok}
    base_rate = float(np.mean(list(base_eval.values())))
    log(
        f"flood {config.env}: agent success {base_rate:.3f} on {len(test)} test tasks of {fams}; "
        f"{len(train)} train tasks x {config.k} rollouts per round"
    )
    done = {_key(r["method"], r["seed"], r["round"]): r for r in read_jsonl(out / "rounds.jsonl")}
    total = config.seeds * sum(config.rounds_of(m) for m in config.methods)
    tick = progress(f"flood {config.env}: rounds", total) if progress else None
    epoch_s = None
    for seed in range(config.seeds):
        sdir = out / f"seed{seed}"
        shared = sdir / "r1"
        for method in config.methods:
            current = agent_dir
            for rnd in range(1, config.rounds_of(method) + 1):
                key = _key(method, seed, rnd)
                mdir = sdir / method.replace("|", "_").replace("*", "x")
                if key in done:
                    if method != "base":
                        current = mdir / f"agent-r{rnd}"
                    if tick:
                        tick(1)
                    continue
                t0 = time.perf_counter()
                rdir = shared if rnd == 1 else mdir / f"r{rnd}"
                sample_seed = config.seed + 7919 * (seed + 1) + rnd
                if method == "base" and rnd > 1:
                    row = {**done[_key(method, seed, 1)], "round": rnd, "seconds": 0.0}
                    append_jsonl(out / "rounds.jsonl", row)
                    done[key] = row
                    if tick:
                        tick(1)
                    continue

                def make(cur=current, rnd=rnd, sample_seed=sample_seed):
                    m, t = load_model(cur)
                    self_ = roll_flood(
                        env, m, t, train, k=config.k, temperature=config.temperature,
                        seed=sample_seed, prefix=f"r{rnd}", length_penalty=config.length_penalty,
                    )  # fmt: skip
                    planted = []
                    if config.planted:
                        rng = np.random.default_rng(sample_seed)
                        pick = [train[i] for i in rng.permutation(len(train))[: config.planted]]
                        planted = rollout(
                            env, pick, PlantedHarmfulPolicy(), source="self", seed=sample_seed,
                            id_prefix=f"r{rnd}-pl", with_tools=False,
                        )  # fmt: skip
                        planted = [t for t in planted if t.meta.get("planted")]
                    return experts + self_ + planted

                pool = _pool(rdir / "pool.jsonl", make)
                if epoch_s is None:
                    epoch_s = _epoch_seconds(agent_dir, pool, config, out)
                scored, sel_s = None, 0.0
                if method in NEEDS_SCORES:
                    scored = _scores(current, pool, demos, rdir / "scores", config, seed)
                    sel_s = scored.seconds
                t1 = time.perf_counter()
                ids, weights, info = select_flood(
                    method, pool, budget=config.budget, seed=config.seed + 1000 * (seed + 1) + rnd,
                    scored=scored, env=env,
                )  # fmt: skip
                sel_s += time.perf_counter() - t1
                by_id = {t.id: t for t in pool}
                chosen = [by_id[i] for i in ids]
                row = {
                    "env": config.env,
                    "method": method,
                    "seed": seed,
                    "round": rnd,
                    "pool": flood_summary(pool),
                    "n_selected": len(chosen),
                    "selected_success": sum(bool(t.success) for t in chosen) / max(1, len(chosen)),
                    "selected_tasks": len({t.task_id for t in chosen}),
                    "selected_planted": sum(bool(t.meta.get("planted")) for t in chosen),
                    "select_seconds": sel_s,
                    "cost_epochs": sel_s / epoch_s if epoch_s else None,
                    "info": info,
                }
                if method.endswith("+ee"):  # early experience from the picked successes
                    extra = early_experience(env, [t for t in chosen if t.success], k=1,
                                             seed=sample_seed)  # fmt: skip
                    # as many examples as picked trajectories (all of them drown the agent:
                    # 207 examples next to 13 successes took ToolWorld's agent to 0 success)
                    pick = np.random.default_rng(sample_seed).permutation(len(extra))
                    extra = [extra[i] for i in sorted(pick[: len(chosen)])]
                    row["n_early"] = len(extra)
                    chosen = chosen + extra
                if method == "base":
                    ev, ft = base_eval, {"steps": 0, "seconds": 0.0}
                else:
                    sel_path = mdir / f"selection-r{rnd}.jsonl"
                    sel_path.parent.mkdir(parents=True, exist_ok=True)
                    write_pool(chosen, sel_path, step_weights=weights)
                    nxt = mdir / f"agent-r{rnd}"
                    extra = []
                    if sft_demos:
                        extra = replay_demos(sft_demos, config.replay, len(chosen),
                                             seed=sample_seed)  # fmt: skip
                        row["n_replay"] = len(extra)
                    ft = _finetune(current, load_pool(sel_path) + extra, config,
                                   config.seed + 100 * seed + rnd, nxt)  # fmt: skip
                    m, t = load_model(nxt)
                    ev = evaluate_tasks(env, m, t, test)
                    current = nxt
                row.update(
                    success=float(np.mean(list(ev.values()))),
                    expansion=float(np.mean([ev[t] for t in failed])) if failed else None,
                    per_task=ev,
                    finetune_steps=ft["steps"],
                    seconds=time.perf_counter() - t0,
                )
                append_jsonl(out / "rounds.jsonl", row)
                done[key] = row
                log(
                    f"flood {config.env} seed {seed} {method} round {rnd}: success "
                    f"{row['success']:.3f}, expansion {row['expansion']}, picked "
                    f"{row['n_selected']} ({row['selected_success']:.2f} successful)"
                )
                if tick:
                    tick(1)
            _prune(sdir / method.replace("|", "_").replace("*", "x"), config.rounds)
    rows = [
        done[_key(m, s, r)]
        for s in range(config.seeds)
        for m in config.methods
        for r in range(1, config.rounds_of(m) + 1)
        if _key(m, s, r) in done
    ]
    res = {
        "env": config.env,
        "config": asdict(config),
        "agent": {**agent_info, "dir": str(agent_dir), "test_success": base_rate},
        "target_families": fams,
        "n_test": len(test),
        "n_base_failed": len(failed),
        "epoch_seconds": epoch_s,
        "summary": summarize_rounds(rows, against="rs"),
        "rows": rows,
        "runtime_s": time.perf_counter() - t_start,
        # the rows' own seconds: the whole run's compute, over resumed invocations too
        "rows_seconds": float(sum(r.get("seconds", 0.0) for r in rows)),
    }
    return res


def replay_demos(demos: list, replay: float, n_pick: int, *, seed: int) -> list:
    """``round(replay * n_pick)`` of ``demos`` (at most all of them), drawn without replacement
    with ``seed`` and kept in their order."""
    n = min(len(demos), round(replay * n_pick))
    keep = np.random.default_rng(seed).permutation(len(demos))[:n]
    return [demos[i] for i in sorted(keep)]


def raise_changed(out: Path) -> None:
    from trajinf.errors import TrajinfError

    raise TrajinfError(
        f"{out}: holds a flood run of another configuration (config.json differs); "
        "use another --out or remove it"
    )


def _prune(mdir: Path, rounds: int) -> None:
    """Keep only the last round's agent of a finished (seed, method)."""
    for r in range(1, rounds):
        shutil.rmtree(mdir / f"agent-r{r}", ignore_errors=True)


def _scores(agent_dir: Path, pool, demos, out: Path, config: FloodConfig, seed: int):
    """Flood scores of ``pool`` under the agent at ``agent_dir`` (cached in ``out``)."""
    from trajinf.bench.flood import FloodScores

    meta = out / "flood_scores.json"
    m = json.loads(meta.read_text()) if meta.exists() else None
    if m is not None and (m.get("harm", True) or not config.needs_harm):
        import pandas as pd

        scores = {k: pd.read_parquet(out / f"scores_{k}.parquet") for k in m["modes"]}
        steps = {k: pd.read_parquet(out / f"steps_{k}.parquet") for k in m["modes"]}
        stats = pd.read_parquet(out / "statistics.parquet")
        return FloodScores(scores, steps, stats, m["seconds"])
    from trajinf.atomic import write_parquet

    harm = config.needs_harm
    s = score_flood(agent_dir, pool, demos, out, proj_dim=config.proj_dim, seed=seed, harm=harm)
    for k in s.scores:
        write_parquet(s.scores[k], out / f"scores_{k}.parquet")
        write_parquet(s.steps[k], out / f"steps_{k}.parquet")
    write_json({"modes": list(s.scores), "seconds": s.seconds, "harm": harm}, meta)
    return s


def summarize_rounds(rows: list[dict], *, against: str = "rs") -> dict:
    """Per method and round: success and expansion mean / std / per seed, selection cost, and
    paired t-tests of success (and expansion) against ``against`` over the shared seeds."""
    from trajinf.loop.steps import paired_tests

    out: dict = {}
    by: dict[tuple[str, int], dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["method"], r["round"]), {})[r["seed"]] = r
    rounds = sorted({k[1] for k in by})
    for rnd in rounds:
        res: dict = {"methods": {}}
        seeds_of = {m: d for (m, rr), d in by.items() if rr == rnd}
        for m, d in seeds_of.items():
            seeds = sorted(d)
            succ = [d[s]["success"] for s in seeds]
            exp = [d[s]["expansion"] for s in seeds if d[s]["expansion"] is not None]
            res["methods"][m] = {
                "success_mean": float(np.mean(succ)),
                "success_std": float(np.std(succ, ddof=1)) if len(succ) > 1 else 0.0,
                "success_per_seed": succ,
                "expansion_mean": float(np.mean(exp)) if exp else None,
                "n_selected_mean": float(np.mean([d[s]["n_selected"] for s in seeds])),
                "selected_success_mean": float(np.mean([d[s]["selected_success"] for s in seeds])),
                "cost_epochs_mean": float(np.mean([d[s]["cost_epochs"] or 0.0 for s in seeds])),
                "seeds": seeds,
            }
        if against in seeds_of:
            shared = sorted(set.intersection(*(set(d) for d in seeds_of.values())))
            per = {m: [d[s]["success"] for s in shared] for m, d in seeds_of.items()}
            res["paired_vs_" + against] = paired_tests(per, against=(against,))
            per_e = {
                m: [d[s]["expansion"] for s in shared]
                for m, d in seeds_of.items()
                if all(d[s]["expansion"] is not None for s in shared)
            }
            res["paired_expansion_vs_" + against] = paired_tests(per_e, against=(against,))
        out[str(rnd)] = res
    return out


def run_flood_bench(configs: list[FloodConfig], out: str | Path, *, log=print, progress=None):
    """Every environment's flood under ``out/<env>``; ``out/flood.json``, ``flood.md`` and
    ``flood.html`` (the per-round plot) rewritten after each environment."""
    from trajinf.bench.flood_report import write_flood_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"envs": {}}
    t0 = time.perf_counter()
    for cfg in configs:
        res = run_flood(cfg, out / cfg.env, log=log, progress=progress)
        results["envs"][cfg.env] = res
        results["runtime_s"] = time.perf_counter() - t0
        write_json(results, out / "flood.json")
        write_flood_report(results, out)
    return results
