"""Where a process sits in a ``torchrun`` job: rank context, process group, local launcher.

Process groups use gloo on CPU and nccl when ranks extract on GPUs; ranks only exchange one
flag per all-reduce (features never travel over the network). Everything also works with
``world == 1`` (no process group).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from trajinf.errors import TrajinfError


@dataclass(frozen=True)
class RankContext:
    """Where this process sits in a (possibly one-process) extraction job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (world == 1)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that merges and scores."""
        return self.rank == 0

    def shards(self, n_shards: int) -> list[int]:
        """The shard indices this rank extracts: ``s % world == rank`` (deterministic)."""
        return [s for s in range(n_shards) if s % self.world == self.rank]

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group)."""
        if self.backend is not None:
            import torch.distributed as dist

            dist.barrier()

    def device(self) -> str:
        """The torch device this rank extracts on: ``cuda:LOCAL_RANK`` with nccl, else cpu."""
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"

    def all_ok(self, ok: bool) -> bool:
        """True if ``ok`` on every rank, so one rank's error stops the others at a barrier
        instead of leaving them waiting forever."""
        if self.backend is None:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if ok else 1], device=self.device())
        dist.all_reduce(flag)
        return int(flag.item()) == 0


def rank_context(
    backend: str | None = None, *, timeout_s: float = 1800.0, init_method: str | None = None
) -> RankContext:
    """The rank of this process from the ``torchrun`` environment (RANK, WORLD_SIZE,
    LOCAL_RANK); joins the default process group when WORLD_SIZE > 1.

    ``backend`` None picks nccl when CUDA is available, else gloo. ``init_method`` None
    rendezvous through ``MASTER_ADDR``/``MASTER_PORT`` (what torchrun sets); pass
    ``"file:///shared/path"`` to rendezvous through a file instead (no port to pick).
    ``timeout_s`` bounds every collective, so a rank slowed down by a loaded machine waits
    rather than fails.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return RankContext()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    import torch
    import torch.distributed as dist

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise TrajinfError(f"--backend must be gloo or nccl, got '{backend}'")
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    return RankContext(rank=rank, world=world, local_rank=local, backend=backend)


def shutdown(ctx: RankContext) -> None:
    """Leave the process group joined by :func:`rank_context` (no-op for one process).

    On the normal path every rank first waits at a barrier, so they leave together: a rank
    that tore down its gloo connections while a slower one was still using them could make
    that rank's transport thread throw outside Python (terminate -> SIGABRT). While an
    exception propagates (called from ``finally``) there is no barrier, as the other ranks
    may be gone."""
    if ctx.backend is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            if sys.exc_info()[0] is None:
                dist.barrier()
            dist.destroy_process_group()


def launch(args: Sequence[str], nproc: int, *, torchrun_args: Sequence[str] = ()) -> int:
    """Run ``python -m trajinf ARGS`` on ``nproc`` local processes via ``torchrun
    --standalone`` and return its exit code (multi-node: call torchrun yourself)."""
    if nproc < 1:
        raise TrajinfError(f"--nproc must be >= 1, got {nproc}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *torchrun_args,
        "-m",
        "trajinf",
        *args,
    ]
    env = dict(os.environ)
    # torchrun would otherwise set 1 thread per worker with a warning; share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
