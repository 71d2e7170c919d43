"""Which harm signal and which scoring preconditioner detect planted harm (issue 13)?

Recomputes the harm score and calibrated flag of a finished ``trajinf bench --harm`` run for
every (variant, signal, statistic) from its stores, and prints the harm rows of each
(``trajinf.bench.harm.harm_report``): planted vs known-good AUROC, the flag's FPR on known-good
demos and recall on planted ones (exact 95 % intervals), localization top-1.

    python benchmarks/harm_signals.py runs/bench-harm            # both envs, inf + inf-kfac-cos
    python benchmarks/harm_signals.py runs/bench-harm --contrast-only

It also measures the ``contrast`` signal (:mod:`trajinf.job.contrast`, the job's default) and
the ``logprob`` signal (the reference's own log-probabilities, no tuning) from the run's pool,
target demos and models, at three references: the run's last warm-up checkpoint (the model the
bench scores with), a warm-up on held-out demos, and the base agent (no warm-up). With
``--contrast-only`` only these rows are computed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from trajinf.bench.env_bench import BenchConfig
from trajinf.bench.harm import flag_report, reference_dir
from trajinf.bench.methods import job_config
from trajinf.data.trajectories import load_pool
from trajinf.job.kfac import load_kfac
from trajinf.scoring.calibration import store_harm
from trajinf.scoring.directions import directions_from_stores
from trajinf.selection.export import read_scores
from trajinf.store.feature_store import FeatureStore


def scoped(h, pool, families):
    """The bench's harm scope (``--harm-scope subtask``, family subtasks): trajectories of
    families the target does not show are not assessed."""
    from trajinf.job.harm import scope_harm
    from trajinf.job.inputs import subtask_labels

    return scope_harm(h, dict(zip((t.id for t in pool), subtask_labels(pool, "family"),
                                  strict=True)), families)  # fmt: skip


def ekfac_precondition(vectors, factors, eig: list, damping: float = 0.1):
    """EK-FAC in the projected space: per layer, F -> Q_G [(Q_G^T F Q_A) / (L + lambda)] Q_A^T
    with Q_A, Q_G the eigenbases of the K-FAC factors and L the corrected eigenvalues (mean
    squared coordinates of the pool's per-trajectory features in that basis, ``eig``),
    lambda = damping * mean(L)."""
    v = np.asarray(vectors, np.float64)
    out = np.empty_like(v)
    k = next(iter(factors.values()))[0].shape[0]
    for i, (qa, qg, lam) in enumerate(eig):
        sl = slice(i * k * k, (i + 1) * k * k)
        f = v[:, sl].reshape(len(v), k, k)
        rot = np.einsum("ij,mjk,kl->mil", qg.T, f, qa)
        rot /= lam + damping * lam.mean()
        out[:, sl] = np.einsum("ij,mjk,kl->mil", qg, rot, qa.T).reshape(len(v), -1)
    return out.astype(np.float32)


def ekfac_eigen(factors, pool_features: np.ndarray) -> list:
    """Per layer (Q_A, Q_G, corrected eigenvalues [k, k]) from pool features [N, D]."""
    k = next(iter(factors.values()))[0].shape[0]
    res = []
    for i, (a, g) in enumerate(factors.values()):
        qa = np.linalg.eigh((a + a.T) / 2)[1]
        qg = np.linalg.eigh((g + g.T) / 2)[1]
        f = pool_features[:, i * k * k : (i + 1) * k * k].astype(np.float64).reshape(-1, k, k)
        rot = np.einsum("ij,mjk,kl->mil", qg.T, f, qa)
        res.append((qa, qg, (rot**2).mean(0)))
    return res


def ekfac_rows(root: Path, plan, cfg, data, scn) -> dict:
    """Harm (alignment) and the influence ranking with EK-FAC-preconditioned directions, from
    the inf-kfac-cos run's stores and K-FAC factors (planted share of the top budget)."""
    from trajinf.scoring.calibration import calibration_scores, harm_flags, subset_source
    from trajinf.scoring.directions import prepare_directions, target_directions, target_inputs
    from trajinf.scoring.scores import score_tables
    from trajinf.scoring.source import PoolSource, ScoreConfig

    sdir = root / plan.env / "mixed" / "scores" / "inf-kfac-cos"
    pool = FeatureStore.open(sdir / "store" / "pool")
    target = FeatureStore.open(sdir / "store" / "target")
    calib_dir = sdir / "calib" / "store" / "pool"
    calib = FeatureStore.open(calib_dir) if calib_dir.exists() else target
    src = PoolSource.from_store(pool)
    conf = ScoreConfig(subtask_column="family")
    inputs = target_inputs(target, conf, None)
    ts = []
    for c in range(pool.n_checkpoints):
        factors = load_kfac(sdir / "kfac" / f"ckpt-{c}.npz")[0]
        eig = ekfac_eigen(factors, src.read(c, src.traj_rows[src.finite]))
        ts.append(ekfac_precondition(inputs["target"][c], factors, eig))
    dirs = prepare_directions(
        src, target_directions(ts, conf, subtasks=inputs["subtasks"], lr=pool.learning_rates), conf
    )
    res = score_tables(src, dirs, conf)
    csrc = PoolSource.from_store(calib)
    pos = pd.Index(csrc.ids.astype(str)).get_indexer(
        target.items.query("step == -1 and finite")["id"].astype(str)
    )
    cal = calibration_scores(subset_source(csrc, pos), ts, conf, pool=src, signal="alignment",
                             subtasks=inputs["subtasks"], lr=pool.learning_rates)  # fmt: skip
    h = scoped(harm_flags(src, dirs, conf, cal, alpha=0.05, signal="alignment"), scn.pool,
               data.demo.target_families)  # fmt: skip
    return flag_report(scn.pool, res.trajectories, res.steps, h, budget=cfg.headline,
                       families=data.demo.target_families)  # fmt: skip


def heldout_warmup(d: Path, pool, target, families, per_family: int = 8) -> Path:
    """The issue's second warm-up choice: the base agent trained like the pool warm-up (2
    epochs, the demo's recipe) on expert demos of the target families from tasks in neither the
    pool nor the target (``per_family`` each), cached under ``data/models/warmup-heldout``."""
    from dataclasses import replace

    from trajinf.envs import make_env
    from trajinf.envs.policies import ExpertPolicy
    from trajinf.envs.rollout import rollout
    from trajinf.models.checkpoints import load_model
    from trajinf.train.sft import DEMO_TRAIN, train_sft

    out = d / "data" / "models" / "warmup-heldout"
    if (out / "config.json").exists():
        return out
    env = make_env(d.name)
    used = {str(t.task_id) for t in [*pool, *target]}
    tasks = [t for t in env.tasks("train", 400, 4242) if str(t.id) not in used]
    chosen = [t for f in families for t in [t for t in tasks if t.family == f][:per_family]]
    tools = any(m.get("tool_calls") for t in pool for m in t.messages)
    demos = rollout(env, chosen, ExpertPolicy(), source="expert", with_tools=tools,
                    id_prefix="heldout")  # fmt: skip
    model, tok = load_model(d / "data" / "models" / "base")
    train_sft(model, tok, demos, replace(DEMO_TRAIN, epochs=2, seed=0, log_every=0))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"{d.name}: held-out warm-up on {len(demos)} demos of {families}", flush=True)
    return out


def contrast_rows(d: Path, pool, families, budget: float) -> dict:
    """Harm rows of the contrast signal at the warm-up checkpoint and at the base agent, with
    the job's default settings (:class:`trajinf.job.config.ScoreJobConfig`)."""
    from trajinf.data.tokenize import tokenize_pool
    from trajinf.job.config import ScoreJobConfig
    from trajinf.job.contrast import contrast_harm, logprob_harm
    from trajinf.job.harm import contrast_config
    from trajinf.models.checkpoints import load_model

    jc = ScoreJobConfig()
    target = load_pool(d / "data" / "target_demos.jsonl")
    refs = {"warm": reference_dir(d / "data", "warm"),
            "heldout": heldout_warmup(d, pool, target, families),
            "base": reference_dir(d / "data", "base")}  # fmt: skip
    # selection shares: the default influence scores of the run, each reference's flag and plan
    scores, steps, _ = read_scores(d / "mixed" / "scores" / "inf")
    out = {}
    for name, ref in refs.items():
        model, tok = load_model(ref)
        pool_tok, target_tok = tokenize_pool(pool, tok), tokenize_pool(target, tok)
        results = {
            ("contrast", name): contrast_harm(
                model, tok, pool_tok, target_tok,
                subtasks=[t.meta.get("family") for t in target], config=contrast_config(jc),
                alpha=jc.harmful_alpha,
            ),
            ("logprob", name): logprob_harm(model, tok, pool_tok, target_tok,
                                            alpha=jc.harmful_alpha),
        }  # fmt: skip
        for key, h in results.items():
            h = scoped(h, pool, families)
            rep = flag_report(pool, scores, steps, h, budget=budget, families=families)
            out[key] = {**rep, "threshold": h.info["threshold"], "method": h.info["method"]}
    return out


def main(root: Path, variants=("inf", "inf-kfac-cos"), ekfac: bool = True) -> dict:
    torch.set_num_threads(1)
    cfg = BenchConfig.harm()
    out: dict = {}
    for plan in cfg.plans:
        d = root / plan.env
        if not (d / "data" / "done").exists():
            continue
        # the run's files as they are (build_bench_data would rebuild on a config change)
        scn = SimpleNamespace(pool=load_pool(d / "data" / "pool_mixed.jsonl"))
        info = json.loads((d / "data" / "demo.json").read_text())
        data = SimpleNamespace(
            demo=SimpleNamespace(target_families=info["target_families"], base_dir=None,
                                 warm_dir=None)
        )  # fmt: skip
        rows = contrast_rows(d, scn.pool, info["target_families"], cfg.headline)
        for (signal, ref), rep in rows.items():
            key = f"{plan.env}|{signal}@{ref}|{signal}|drop"
            out[key] = rep
            print(_line(key, rep), flush=True)
        for v in variants:
            sdir = d / "mixed" / "scores" / v
            if not (sdir / "scores.parquet").exists():
                continue
            jc = job_config(v, proj_dim=cfg.proj_dim, seed=plan.seed, demo=data.demo)
            pool = FeatureStore.open(sdir / "store" / "pool")
            target = FeatureStore.open(sdir / "store" / "target")
            calib_dir = sdir / "calib" / "store" / "pool"
            calib = FeatureStore.open(calib_dir) if calib_dir.exists() else target
            kfac = None
            if jc.scoring.preconditioner == "kfac":
                kfac = [load_kfac(sdir / "kfac" / f"ckpt-{c}.npz")[0]
                        for c in range(pool.n_checkpoints)]  # fmt: skip
            dirs = directions_from_stores(pool, target, jc.scoring, kfac=kfac)
            scores, steps, _ = read_scores(sdir)
            for signal in ("surprise", "alignment"):
                for stat in ("drop", "min"):
                    h = store_harm(pool, target, calib, dirs, jc.scoring, alpha=0.05,
                                   statistic=stat, signal=signal, kfac=kfac)  # fmt: skip
                    h = scoped(h, scn.pool, data.demo.target_families)
                    rep = flag_report(scn.pool, scores, steps, h, budget=cfg.headline,
                                      families=data.demo.target_families)  # fmt: skip
                    key = f"{plan.env}|{v}|{signal}|{stat}"
                    out[key] = {**rep, "threshold": h.info["threshold"],
                                "method": h.info["method"]}  # fmt: skip
                    print(_line(key, rep), flush=True)
        if ekfac and (d / "mixed" / "scores" / "inf-kfac-cos" / "kfac").exists():
            rep = ekfac_rows(root, plan, cfg, data, scn)
            out[f"{plan.env}|inf-ekfac-cos|alignment|drop"] = rep
            print(_line(f"{plan.env}|inf-ekfac-cos|alignment|drop", rep), flush=True)
    return out


def _line(key: str, r: dict) -> str:
    f, rc, loc = r["fpr_known_good"], r["recall_planted"], r["localization"]
    return (
        f"{key:40s} AUROC {r.get('auroc_planted_vs_good', float('nan')):.3f} "
        f"(same family {r.get('auroc_planted_vs_good_same_family', float('nan')):.3f}, "
        f"assessed {r.get('auroc_planted_vs_good_assessed', float('nan')):.3f}; "
        f"{r.get('n_unassessed', 0)} unassessed)  "
        f"FPR {f['k']}/{f['n']} [{f['ci_exact'][0]:.2f}, {f['ci_exact'][1]:.2f}]  "
        f"recall {rc['k']}/{rc['n']} [{rc['ci_exact'][0]:.2f}, {rc['ci_exact'][1]:.2f}]  "
        f"loc one-bad {loc['one_bad_step']['top1']:.2f} (chance "
        f"{loc['one_bad_step']['chance']:.2f}) planted {loc['planted']['top1']:.2f}  "
        f"planted share keep/drop/repair {r['planted_share_top']['keep']:.3f}/"
        f"{r['planted_share_top']['drop']:.3f}/{r['planted_share_top']['repair']:.3f}"
    )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    only = "--contrast-only" in sys.argv  # the contrast rows, merged into an existing JSON
    root = Path(args[0] if args else "runs/bench-harm")
    res = main(root, variants=() if only else ("inf", "inf-kfac-cos"), ekfac=not only)
    path = root / "harm_signals.json"
    if only and path.exists():
        res = {**json.loads(path.read_text()), **res}
    path.write_text(json.dumps(res, indent=1, default=str))
