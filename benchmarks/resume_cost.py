"""Resume cost of a SIGKILLed scoring job (docs/benchmarks.md, "Resume cost").

Builds a tiny model and a pool of ToolWorld rollouts (expert + noisy), then

1. runs the scoring job uninterrupted in a fresh process into ``WORK/full`` (wall time T);
2. runs it into ``WORK/killed``, SIGKILLs it once it has used ``--kill-at`` of the first run's
   CPU time (robust to other load on the machine), and reruns it into the same directory
   (time R of the rerun);
3. reports R / T (CPU and wall), the timings of each phase, what the killed run had finished (pool shards,
   cached tokens), and checks that every output table is byte-identical to the uninterrupted
   run's.

Usage: ``python benchmarks/resume_cost.py --work /tmp/resume --n-tasks 700`` (one core:
``taskset -c 0`` and ``OMP_NUM_THREADS=1``; about 5 minutes for 2,800 trajectories).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

OUTPUTS = ("scores.parquet", "step_scores.parquet", "statistics.parquet")


def build(work: Path, n_tasks: int) -> None:
    """``work/pool.jsonl`` (2 * n_tasks rollouts), ``work/target.jsonl`` (20) and an untrained
    tiny model in ``work/model`` (the tests' tiny job, larger)."""
    import torch

    from trajinf.data.write import write_pool
    from trajinf.envs import make_env
    from trajinf.envs.policies import ExpertPolicy, NoisyExpertPolicy
    from trajinf.envs.rollout import rollout
    from trajinf.models.tiny import tiny_model, tokenizer_corpus, train_tokenizer

    torch.manual_seed(0)
    env = make_env("builtin")
    tasks = env.tasks("train", n_tasks, 0)
    pool = rollout(env, tasks, ExpertPolicy(), source="expert", with_tools=False) + rollout(
        env, tasks, NoisyExpertPolicy(0.5), source="noisy", with_tools=False
    )
    target = rollout(env, env.tasks("test", 20, 1), ExpertPolicy(), source="t", with_tools=False)
    work.mkdir(parents=True, exist_ok=True)
    write_pool(pool, work / "pool.jsonl")
    write_pool(target, work / "target.jsonl")
    tok = train_tokenizer(tokenizer_corpus(pool + target), vocab_size=400)
    model = tiny_model(tok, hidden=64, layers=2, heads=2, seed=0)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")


def job_config(shard_items: int):
    from trajinf.job.config import build_job_config

    cfg = build_job_config(proj_dim=256)
    cfg.shard_items = shard_items
    cfg.device = "cpu"
    return cfg


def run_job(work: Path, out: Path, shard_items: int) -> None:
    """The scoring job (what a rerun of ``trajinf score`` does), in this process."""
    import torch

    from trajinf.job.run import score_pool

    torch.set_num_threads(1)
    score_pool(
        work / "model", work / "pool.jsonl", work / "target.jsonl", out,
        config=job_config(shard_items),
    )  # fmt: skip


def child(work: Path, out: Path, shard_items: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--work", str(work), "--shard-items", str(shard_items),
           "--run", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_timed(proc: subprocess.Popen, t0: float) -> tuple[float, float, int]:
    """(wall s since t0, CPU s (user + sys), exit status) of a child, via wait4."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, proc.returncode


def timed_run(work: Path, out: Path, shard_items: int) -> tuple[float, float]:
    """(wall s, CPU s) of one scoring job in a fresh process."""
    t0 = time.perf_counter()
    wall, cpu, code = wait_timed(child(work, out, shard_items), t0)
    if code != 0:
        raise SystemExit(f"scoring job into {out} failed with code {code}")
    return wall, cpu


def cpu_seconds(pid: int) -> float:
    """CPU time (user + sys) a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def finished(out: Path) -> dict:
    """What a (killed) job directory holds."""
    return {
        "pool_shards": len(list(out.glob("store/pool/ckpt-0/features-*.npy"))),
        "target_shards": len(list(out.glob("store/target/ckpt-0/features-*.npy"))),
        "cache": sorted(str(p.relative_to(out)) for p in out.glob("cache/**/*") if p.is_file()),
        "files": sorted(p.name for p in out.iterdir() if p.is_file()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n-tasks", type=int, default=700, help="pool = 2 x n-tasks rollouts")
    ap.add_argument("--shard-items", type=int, default=128)
    ap.add_argument("--kill-at", type=float, default=0.6, help="fraction of T")
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # child: run the job only
    args = ap.parse_args()
    if args.run is not None:
        run_job(args.work, args.run, args.shard_items)
        return
    if not (args.work / "model").exists():
        build(args.work, args.n_tasks)
    for name in ("full", "killed"):
        subprocess.run(["rm", "-rf", str(args.work / name)], check=True)
    n_pool = sum(1 for _ in (args.work / "pool.jsonl").open())
    t_full, cpu_full = timed_run(args.work, args.work / "full", args.shard_items)

    # the kill lands at --kill-at of the uninterrupted run's CPU time, so other load on the
    # machine does not move it (wall time is reported too)
    t0 = time.perf_counter()
    proc = child(args.work, args.work / "killed", args.shard_items)
    while proc.poll() is None and cpu_seconds(proc.pid) < args.kill_at * cpu_full:
        time.sleep(0.05)
    if proc.poll() is not None:
        raise SystemExit("the job finished before the kill; raise --n-tasks or lower --kill-at")
    cpu_at_kill = cpu_seconds(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    wall_killed, _, _ = wait_timed(proc, t0)
    left = finished(args.work / "killed")
    t_rerun, cpu_rerun = timed_run(args.work, args.work / "killed", args.shard_items)

    same = {
        f: (args.work / "full" / f).read_bytes() == (args.work / "killed" / f).read_bytes()
        for f in OUTPUTS
    }
    jobs = [json.loads((args.work / d / "job.json").read_text()) for d in ("full", "killed")]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"affinity {len(os.sched_getaffinity(0))}",
        "n_pool": n_pool,
        "shard_items": args.shard_items,
        "kill_at": args.kill_at,
        "T_wall_s": round(t_full, 1),
        "T_cpu_s": round(cpu_full, 1),
        "killed_after_cpu_s": round(cpu_at_kill, 1),
        "killed_after_wall_s": round(wall_killed, 1),
        "R_wall_s": round(t_rerun, 1),
        "R_cpu_s": round(cpu_rerun, 1),
        "R_over_T_wall": round(t_rerun / t_full, 3),
        "R_over_T_cpu": round(cpu_rerun / cpu_full, 3),
        "at_kill": left,
        "timings_full": {k: round(v, 2) for k, v in jobs[0]["timings"].items()},
        "timings_rerun": {k: round(v, 2) for k, v in jobs[1]["timings"].items()},
        "identical": same,
    }
    print(json.dumps(result, indent=1))
    (args.work / "resume_cost.json").write_text(json.dumps(result, indent=1))
    if not all(same.values()):
        raise SystemExit(f"resumed outputs differ from the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
