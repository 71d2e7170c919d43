"""One environment of ``trajinf bench``: data, scoring variants, detection, LDS, retrain cells."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from trajinf.atomic import write_json
from trajinf.bench.env_bench import (
    BenchConfig,
    append_jsonl,
    cell_key,
    plan_cells,
    read_cells,
    read_jsonl,
)
from trajinf.bench.harm import harm_report, harm_selection
from trajinf.bench.methods import BENCH_METHODS, Scored, run_variant
from trajinf.bench.metrics import bad_step_localization, lds, summarize_cells
from trajinf.bench.scenarios import build_bench_data
from trajinf.data.write import write_pool
from trajinf.envs import make_env
from trajinf.errors import TrajinfError
from trajinf.loop.steps import TASK_MATCHED, harmful_detection, select_for_method
from trajinf.selection.priors import step_prior, trajectory_prior
from trajinf.selection.select import select, zero_variance_filter


def run_env(plan, config, out: Path, *, progress=None, log=print) -> dict:
    """Everything ``trajinf bench`` measures in one environment; returns its results dict."""
    t_start = time.perf_counter()
    env = make_env(plan.env)
    data = build_bench_data(env, plan, out, names=config.scenarios, progress=progress, log=log)
    demo_cfg = plan.demo_config()
    epoch_s = _epoch_seconds(data.demo, data.scenarios, out)
    log(f"{plan.env}: one training epoch over the mixed pool takes {epoch_s:.1f} s")

    cells = plan_cells(plan, config)
    scored: dict[tuple[str, str], Scored] = {}
    scen_res: dict = {}
    for name, scn in data.scenarios.items():
        needed = {BENCH_METHODS[c["method"]].variant for c in cells if c["scenario"] == name}
        needed.discard(None)
        needed.add("inf")
        scen_res[name] = {"pool": scn.summary, "n_pool": len(scn.pool), "variants": {}}
        for v in sorted(needed):
            log(f"{plan.env}/{name}: scoring variant {v}")
            s = run_variant(
                v,
                scn,
                data.demo,
                out / name / "scores" / v,
                proj_dim=config.proj_dim,
                seed=plan.seed,
            )
            scored[(name, v)] = s
            scen_res[name]["variants"][v] = {
                "seconds": s.seconds,
                "cost_epochs": s.seconds / epoch_s,
                "harmful": harmful_detection(scn.pool, s.scores),
                "bad_step": bad_step_localization(scn.pool, s.steps),
                "top_sources": _top_sources(scn.pool, s.scores, config.headline),
                "target_share": target_share(
                    scn.pool, s.scores, config.headline, data.demo.target_families
                ),
                "harm": harm_report(
                    scn.pool,
                    s.scores,
                    s.steps,
                    s.harm_steps,
                    budget=config.headline,
                    families=data.demo.target_families,
                ),  # fmt: skip
            }
    for name, scn in data.scenarios.items():
        scen_res[name]["priors"] = _prior_report(scn, plan, config, env, log=log)
    mask_res = _mask_report(data, plan, out)
    lds_res = None
    if plan.lds_models and "mixed" in data.scenarios:
        lds_res = _lds(plan, config, data, scored, out, log=log, progress=progress)

    done = read_cells(out / "cells.jsonl")
    todo = [c for c in cells if cell_key(c) not in done]
    log(f"{plan.env}: {len(cells)} retrain cells, {len(todo)} to run")
    jobs, skipped = [], []
    for c in todo:
        try:
            jobs.append(_cell_job(c, plan, demo_cfg, data, scored, out, env))
        except TrajinfError as e:  # e.g. a prior undefined on every step of this env
            skipped.append({**c, "reason": str(e)})
    if skipped:
        reasons = sorted({(c["method"], c["reason"]) for c in skipped})
        log(f"{plan.env}: {len(skipped)} cells skipped: {reasons}")
    tick = progress(f"{plan.env}: retrain + eval", len(jobs)) if progress and jobs else None
    for row in _run_jobs(jobs, config.workers):
        append_jsonl(out / "cells.jsonl", row)
        done[cell_key(row)] = row
        if tick:
            tick(1)
    rows = [done[cell_key(c)] for c in cells if cell_key(c) in done]
    for r in rows:
        r["env"] = plan.env
    return {
        "env": plan.env,
        "target_families": data.demo.target_families,
        "base": data.demo.base_success,
        "epoch_seconds": epoch_s,
        "scenarios": scen_res,
        "lds": lds_res,
        "update_mask": mask_res,
        "skipped_cells": skipped,
        "summary": summarize_cells(rows),
        "cells": rows,
        "plan": asdict(plan),
        "runtime_s": time.perf_counter() - t_start,
    }


def _top_sources(pool, scores, budget: float) -> dict:
    """What the variant's top ``budget`` holds, by source (planted counted apart)."""
    k = max(1, math.ceil(budget * len(pool)))
    top = scores.sort_values("score", ascending=False, na_position="last")["id"].head(k)
    by_id = {t.id: t for t in pool}
    out: dict[str, int] = {}
    for i in top:
        t = by_id[str(i)]
        key = (
            "planted"
            if t.meta.get("planted")
            else ("one-bad-step" if "bad_step" in t.meta else t.source)
        )
        out[key] = out.get(key, 0) + 1
    return out


def target_share(pool, scores, budget: float, families) -> dict:
    """Share of target-family trajectories in the top ``budget`` by score, next to their share
    of the pool (what a random pick gets in expectation): does the ranking find the skill?"""
    fams = set(families)
    k = max(1, math.ceil(budget * len(pool)))
    top = scores.sort_values("score", ascending=False, na_position="last")["id"].head(k)
    on = {t.id for t in pool if t.meta.get("family") in fams}
    return {"top": sum(str(i) in on for i in top) / k, "pool": len(on) / max(1, len(pool))}


def _prior_report(scn, plan, config, env, *, log=print) -> dict:
    """Detection and localization of each step prior used by the scenario's methods."""
    names = sorted(
        {
            BENCH_METHODS[m].prior
            for m in sum(plan.grid.get(scn.name, ((), ())), ())
            if BENCH_METHODS[m].prior
        }
    )
    out = {}
    for name in names:
        t0 = time.perf_counter()
        v = prior_values(scn, name, env)
        steps = v.rename(columns={"value": "score"})
        traj = trajectory_prior(v).rename(columns={"value": "score"})
        out[name] = {
            "seconds": time.perf_counter() - t0,
            "defined_steps": float(np.isfinite(v["value"].to_numpy(float)).mean())
            if len(v)
            else 0.0,
            "bad_step": bad_step_localization(scn.pool, steps),
            "harmful": harmful_detection(scn.pool, traj),
            "top_sources": _top_sources(scn.pool, traj, config.headline),
        }
        log(f"{plan.env}/{scn.name}: prior {name}: {out[name]['bad_step']}")
    return out


def _mask_report(data, plan, out: Path) -> dict:
    """Sparsity of the update mask base -> warmup and its overlap with a second warmup run
    (another seed and random 10 % sample), at three thresholds (arXiv 2505.11711)."""
    import random

    from trajinf.gradients.masks import sparse_update_mask
    from trajinf.models.checkpoints import load_model
    from trajinf.selection.priors import mask_stats
    from trajinf.train.sft import DEMO_TRAIN, train_sft

    path = out / "update_mask.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = plan.demo_config()
    pool = data.demo.pool
    warm_set = random.Random(plan.seed + 1).sample(
        pool, max(2, round(cfg.warmup_fraction * len(pool)))
    )
    base, tok = load_model(data.demo.base_dir)
    other, _ = load_model(data.demo.base_dir)
    train_sft(
        other, tok, warm_set, replace(DEMO_TRAIN, epochs=cfg.warmup_checkpoints, seed=plan.seed + 1)
    )
    warm, _ = load_model(data.demo.warm_dir)
    res = {}
    for thr in (1e-5, 1e-4, 1e-3):
        res[f"{thr:g}"] = mask_stats(
            sparse_update_mask(base, warm, thr), sparse_update_mask(base, other, thr)
        )
    write_json(res, path)
    return res


def _epoch_seconds(demo, scenarios, out: Path) -> float:
    """Wall time of one training epoch of the base agent over the mixed pool (cost unit)."""
    from trajinf.models.checkpoints import load_model
    from trajinf.train.sft import DEMO_TRAIN, train_sft

    path = out / "epoch.json"
    if path.exists():
        return float(json.loads(path.read_text())["seconds"])
    pool = scenarios["mixed"].pool if "mixed" in scenarios else next(iter(scenarios.values())).pool
    model, tok = load_model(demo.base_dir)
    t0 = time.perf_counter()
    train_sft(model, tok, pool, replace(DEMO_TRAIN, epochs=1))
    seconds = time.perf_counter() - t0
    write_json({"seconds": seconds, "n_pool": len(pool)}, path)
    return seconds


def prior_values(scn, name: str, env) -> object:
    """Per-step values (id, step, value) of step prior ``name`` on the scenario's pool, cached
    on the scenario (the values belong to its pool)."""
    if name not in scn.priors:
        scn.priors[name] = step_prior(name, scn.pool, env=env)
    return scn.priors[name]


def _select(method: str, scn, scored, budget: float, seed: int, env=None):
    m = BENCH_METHODS[method]
    s = scored.get((scn.name, m.variant or "inf"))
    values = None
    if m.prior:
        values = prior_values(scn, m.prior, env)
        if m.combine:
            from trajinf.selection.priors import combine_steps

            values = combine_steps(s.steps, values, how=m.combine)
    pool = scn.pool
    info: dict = {}
    if m.options.get("zero_variance"):
        frame, info = zero_variance_filter(pool)
        keep = set(frame["id"])
        pool = [t for t in pool if t.id in keep]
    early = m.options.get("early")
    if early:
        return _select_early(m, early, scn, s, budget, seed)
    if m.options.get("harm"):  # keep / drop / repair by the calibrated harm flag (issue 13)
        return harm_selection(scn.pool, s, budget, m.options["harm"])
    if m.select in TASK_MATCHED:
        fams = sorted({str(t.meta["family"]) for t in scn.target if t.meta.get("family")})
        return select_for_method(m.select, scn.pool, fams, budget=budget, seed=seed)
    # the budget is a fraction of the whole pool, whatever a filter removed first
    fraction = 1.0 if m.full else min(1.0, budget * len(scn.pool) / max(1, len(pool)))
    sel = select(
        m.select,
        pool,
        fraction=fraction,
        scores=s.scores if s else None,
        step_scores=s.steps if s else None,
        statistics=s.statistics if s else None,
        drop_harmful=bool(m.options.get("drop_harmful")),
        step_weights=bool(m.options.get("step_weights")),
        seed=seed,
        step_values=values,
    )
    sel.info["filter"] = info
    return sel


def _select_early(m, early: str, scn, s, budget: float, seed: int):
    """Influence top ``budget`` of the non-early-experience items, plus none / all / the
    influence top ``budget`` of the early-experience items."""
    from trajinf.bench.scenarios import EE_SOURCES

    base = [t for t in scn.pool if t.source not in EE_SOURCES]
    ee = [t for t in scn.pool if t.source in EE_SOURCES]
    kw = dict(scores=s.scores, step_scores=s.steps, statistics=s.statistics, seed=seed)
    sel = select("influence", base, fraction=budget, **kw)
    if early == "all":
        sel.ids += [t.id for t in ee]
    elif early == "selected" and ee:
        sel.ids += select("influence", ee, fraction=budget, **kw).ids
    sel.info["early"] = {"mode": early, "n_early_pool": len(ee)}
    return sel


def _cell_job(cell: dict, plan, demo_cfg, data, scored, out: Path, env=None) -> dict:
    scn = data.scenarios[cell["scenario"]]
    seed = plan.seed + 1000 * (cell["seed"] + 1)
    sel = _select(cell["method"], scn, scored, cell["budget"], seed, env)
    by_id = {t.id: t for t in scn.pool}
    path = (
        out
        / cell["scenario"]
        / "selections"
        / f"{cell['method']}-{cell['budget']:g}-{cell['seed']}.jsonl"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pool([by_id[i] for i in sel.ids], path, step_weights=sel.step_weights)
    return {
        "cell": cell,
        "selection": str(path),
        "seed": seed,
        "env": plan.env,
        "base_dir": str(data.demo.base_dir),
        "families": list(data.demo.target_families),
        "demo": asdict(demo_cfg),
        "n_selected": len(sel.ids),
        "n_weighted_zero": sum(w.count(0.0) for w in (sel.step_weights or {}).values()),
    }


def _run_jobs(jobs: list[dict], workers: int):
    """Yield finished cells; ``workers`` > 1 runs them in spawned processes (1 thread each)."""
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            yield run_cell(j)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
        futures = [ex.submit(run_cell, j) for j in jobs]
        for f in as_completed(futures):
            yield f.result()


def run_cell(job: dict) -> dict:
    """Fine-tune the base agent on one selection and evaluate it (runs in a worker process):
    :func:`trajinf.loop.steps.retrain_cell`, with the bench's cell fields around it."""
    from trajinf.loop.steps import retrain_cell

    cell = job["cell"]
    res = retrain_cell(
        {**job, "config": job["demo"], "method": cell["method"], "seed_index": cell["seed"]}
    )
    return {
        **cell,
        "n_selected": job["n_selected"],
        "n_weighted_zero": job["n_weighted_zero"],
        **{k: res[k] for k in ("success_rate", "step_agreement", "per_family", "seconds")},
    }


def _lds(plan, config, data, scored, out: Path, *, log=print, progress=None) -> dict:
    """Train ``plan.lds_models`` agents on random 50 % subsets of the mixed pool; LDS of every
    scoring variant and score-based baseline against their target loss per target family."""
    from trajinf.bench.metrics import target_losses
    from trajinf.models.checkpoints import load_model
    from trajinf.train.sft import DEMO_TRAIN, train_sft

    scn = data.scenarios["mixed"]
    ids = [t.id for t in scn.pool]
    n = len(ids)
    path = out / "lds.jsonl"
    rows = {r["m"]: r for r in read_jsonl(path)}
    rng = np.random.default_rng(plan.seed + 7)
    masks = np.zeros((plan.lds_models, n), dtype=bool)
    for m in range(plan.lds_models):
        masks[m, rng.permutation(n)[: n // 2]] = True
    steps = plan.demo_config().finetune_steps
    tick = progress(f"{plan.env}: LDS subset models", plan.lds_models) if progress else None
    for m in range(plan.lds_models):
        if m not in rows:
            model, tok = load_model(data.demo.base_dir)
            chosen = [t for t, keep in zip(scn.pool, masks[m], strict=True) if keep]
            epochs = max(1, math.ceil(steps * DEMO_TRAIN.batch_size / len(chosen)))
            train_sft(model, tok, chosen, replace(DEMO_TRAIN, epochs=epochs, seed=plan.seed + m))
            rows[m] = {"m": m, "losses": target_losses(model, tok, scn.target)}
            append_jsonl(path, rows[m])
        if tick:
            tick(1)
    queries = sorted(rows[0]["losses"])
    losses = np.array([[rows[m]["losses"][q] for q in queries] for m in range(plan.lds_models)])
    out_res: dict = {"n_models": plan.lds_models, "queries": queries, "methods": {}}
    for (name, v), s in scored.items():
        if name != "mixed":
            continue
        table = s.scores.set_index(s.scores["id"].astype(str)).loc[ids]
        cols = [f"score_{q}" if f"score_{q}" in table else "score" for q in queries]
        values = table[cols].to_numpy(float)
        r, se, per = lds(masks, losses, values)
        out_res["methods"][v] = {"lds": r, "se": se, "per_query": per}
        if v == "inf" and s.statistics is not None:
            st = s.statistics.set_index(s.statistics["id"].astype(str)).loc[ids]
            for col, label in (
                ("rds", "rds"),
                ("loss", "loss"),
                ("grad_norm", "gradnorm"),
                ("length", "length"),
            ):
                if col in st:
                    r, se, per = lds(masks, losses, st[col].to_numpy(float))
                    out_res["methods"][label] = {"lds": r, "se": se, "per_query": per}
    log(
        f"{plan.env}: LDS "
        + ", ".join(f"{k} {v['lds']:.3f}" for k, v in out_res["methods"].items())
    )
    return out_res


def run_bench(
    config: BenchConfig,
    out: str | Path,
    *,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every environment plan; write ``out/bench.json`` and ``out/bench.html``."""
    import torch

    from trajinf.bench.env_report import markdown_tables, write_bench_report

    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": asdict(config), "envs": {}, "cells": []}
    t0 = time.perf_counter()
    for plan in config.plans:
        env_out = out / plan.env
        env_out.mkdir(parents=True, exist_ok=True)
        res = run_env(plan, config, env_out, progress=progress, log=log)
        results["envs"][plan.env] = res
        results["cells"] += res["cells"]
        results["runtime_s"] = time.perf_counter() - t0
        write_json(results, out / "bench.json")
        write_bench_report(results, out / "bench.html")
        (out / "bench.md").write_text(markdown_tables(results))
    return results
