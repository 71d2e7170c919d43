"""What scoring reads: its config (:class:`ScoreConfig`), the pool rows behind a reader
(:class:`PoolSource`, from a store or from arrays), a store's trajectory rows streamed shard by
shard (:func:`store_trajectory_rows`, :func:`store_ids`: what streaming top-k reads instead of a
``PoolSource``), and the ordered thread map that scores blocks of rows in parallel."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from trajinf.errors import TrajinfError, check_fields
from trajinf.scoring.preconditioners import SCORING_PRECONDITIONERS
from trajinf.store.feature_store import FeatureStore

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class ScoreConfig:
    """How pool items are scored against a target (every field's help is in its metadata;
    the CLI options of ``trajinf score`` are built from it). Invalid values raise
    :class:`~trajinf.errors.ConfigError` on construction."""

    metric: Literal["cosine", "inner"] = field(
        default="cosine", metadata={"help": "Similarity of pool and target features."}
    )
    aggregate: Literal["max", "mean"] = field(
        default="max", metadata={"help": "Across target subtasks (mean within a subtask)."}
    )
    remove_mean: bool = field(
        default=False, metadata={"help": "Subtract the pool's mean trajectory feature first."}
    )
    target_mode: Literal["subtask", "success_minus_failure", "advantage"] = field(
        default="subtask",
        metadata={
            "help": "Target direction: subtask means, success minus failure, or group "
            "advantages (see docs)."
        },
    )
    preconditioner: Literal[SCORING_PRECONDITIONERS] = field(  # type: ignore[valid-type]
        default="none",
        metadata={
            "help": "Preconditioner of the target directions: none, gram (damped inverse pool "
            "Gram) or kfac (per-layer K-FAC factors of the pool, factorized mode; saved in "
            "OUT/kfac/).",
            "flag": "scoring_preconditioner",
        },
    )
    gram_damping: float = field(
        default=1e-3,
        metadata={"help": "Gram damping: lambda = gram_damping * trace(F) / D.", "min": 0},
    )
    kfac_damping: float = field(
        default=0.1,
        metadata={"help": "K-FAC damping: lambda = kfac_damping * trace(factor) / k.", "min": 0},
    )
    chunk_rows: int = field(
        default=65536, metadata={"help": "Pool rows scored per block (memory knob).", "min": 1}
    )
    # target items columns (store tables, not options): subtasks (falls back to task_id) and
    # rollout groups (advantage mode)
    subtask_column: str = field(default="subtask", metadata={"cli": False})
    group_column: str = field(default="task_id", metadata={"cli": False})
    workers: int = field(
        default=1,
        metadata={
            # numpy matmul releases the GIL; blocks and the order their sums are added in do
            # not depend on it, and memory grows to ~2 * workers blocks
            "help": "Threads scoring blocks of pool rows in parallel (scores identical to 1).",
            "min": 1,
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class PoolSource:
    """Pool rows behind a reader: ``read(ckpt, rows int64 [n]) -> float32 [n, D]``.

    Trajectory i lives at row ``traj_rows[i]``; step k at ``step_rows[k]`` belongs to
    trajectory ``step_owner[k]`` and carries ``step_share[k]`` of its action tokens.
    """

    read: Callable[[int, np.ndarray], np.ndarray]
    n_ckpt: int
    dim: int
    lr: list[float]
    ids: np.ndarray
    traj_rows: np.ndarray
    finite: np.ndarray
    step_rows: np.ndarray
    step_owner: np.ndarray
    step_index: np.ndarray
    step_share: np.ndarray = field(init=False)
    step_tokens: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.traj_rows)
        k = len(self.step_rows)
        tok = np.ones(k) if self.step_tokens is None else np.asarray(self.step_tokens, float)
        total = np.bincount(self.step_owner, weights=tok, minlength=n)
        count = np.bincount(self.step_owner, minlength=n).astype(float)
        # Items whose steps carry no action tokens split evenly, so shares still sum to one.
        even = total[self.step_owner] <= 0
        share = np.where(even, 0.0, tok / np.where(even, 1.0, total[self.step_owner]))
        share[even] = 1.0 / count[self.step_owner][even]
        self.step_share = share.astype(np.float32)

    @classmethod
    def from_store(cls, store: FeatureStore) -> PoolSource:
        """Pool rows of a store: ``step == -1`` rows are trajectories, the rest their steps."""
        it = store.items
        traj = it[it["step"] == -1].drop_duplicates("id")
        owner = pd.Index(traj["id"]).get_indexer(it["id"])  # -1: step of no trajectory
        steps = it[(it["step"] >= 0).to_numpy() & (owner >= 0)]
        owner = owner[(it["step"] >= 0).to_numpy() & (owner >= 0)]
        return cls(
            read=lambda c, rows: store.features(c, rows),
            n_ckpt=store.n_checkpoints,
            dim=store.dim,
            lr=store.learning_rates,
            ids=traj["id"].to_numpy(dtype=object),
            traj_rows=traj["row"].to_numpy(np.int64),
            finite=traj["finite"].to_numpy(bool),
            step_rows=steps["row"].to_numpy(np.int64),
            step_owner=owner.astype(np.int64),
            step_index=steps["step"].to_numpy(np.int64),
            step_tokens=steps["n_action_tokens"].to_numpy(np.float64),
        )

    @classmethod
    def from_arrays(
        cls,
        traj: np.ndarray | Sequence[np.ndarray],
        *,
        steps: np.ndarray | Sequence[np.ndarray] | None = None,
        step_owner: np.ndarray | None = None,
        step_index: np.ndarray | None = None,
        step_tokens: np.ndarray | None = None,
        ids: Sequence[str] | None = None,
        finite: np.ndarray | None = None,
        lr: Sequence[float] | None = None,
    ) -> PoolSource:
        """In-memory pool: ``traj`` [N, D] (or one per checkpoint), ``steps`` [K, D] (or one per
        checkpoint) with ``step_owner`` int [K] indexing traj rows."""
        tr = per_checkpoint(traj)
        n, d = tr[0].shape
        if steps is None:
            st = [np.zeros((0, d), np.float32) for _ in tr]
            step_owner = np.zeros(0, np.int64)
        else:
            st = per_checkpoint(steps)
        k = len(st[0])
        owner = np.asarray(step_owner, np.int64)
        index = np.asarray(step_index, np.int64) if step_index is not None else _ranks(owner)
        allrows = [np.concatenate([t, s]) for t, s in zip(tr, st, strict=True)]
        return cls(
            read=lambda c, rows: allrows[c][rows],
            n_ckpt=len(tr),
            dim=d,
            lr=list(lr) if lr is not None else [1.0] * len(tr),
            ids=np.asarray(ids if ids is not None else [str(i) for i in range(n)], dtype=object),
            traj_rows=np.arange(n, dtype=np.int64),
            finite=np.ones(n, bool) if finite is None else np.asarray(finite, bool),
            step_rows=np.arange(n, n + k, dtype=np.int64),
            step_owner=owner,
            step_index=index,
            step_tokens=step_tokens,
        )


def per_checkpoint(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """[N, D] -> one checkpoint; [C, N, D] or a list of [N, D] -> one array per checkpoint."""
    if isinstance(x, np.ndarray) and x.ndim == 2:
        return [x.astype(np.float32, copy=False)]
    return [np.asarray(a, np.float32) for a in x]


def _ranks(owner: np.ndarray) -> np.ndarray:
    """Position of each step within its owner, in order of appearance."""
    return pd.Series(owner).groupby(owner).cumcount().to_numpy(np.int64)


def _shards_by_row(store: FeatureStore) -> list[tuple[int, int, int]]:
    """(shard, first row, end row) of every recorded shard, in row order."""
    spans = {
        int(e["shard"]): (int(e["rows"][0]), int(e["rows"][1])) for e in store.manifest["shards"]
    }
    return sorted(((s, lo, hi) for s, (lo, hi) in spans.items()), key=lambda t: t[1])


def store_trajectory_rows(
    store: FeatureStore, block_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows int64 [n], finite bool [n])`` of the store's trajectory rows (``step == -1``) in
    row order, in blocks of ``block_rows`` trajectories (the last one shorter): the blocks of
    :func:`trajinf.scoring.scores.traj_blocks` over :meth:`PoolSource.from_store` when trajectory ids
    are unique. Reads one shard's ``step`` column and row flags at a time, so memory is one
    shard's few bytes per row plus one block, whatever the store's size."""
    if store.is_view:
        raise TrajinfError("store_trajectory_rows: a store view's rows are in its items table")
    ckpts: dict[int, list[int]] = {}
    for e in store.manifest["shards"]:
        ckpts.setdefault(int(e["shard"]), []).append(int(e["ckpt"]))
    pend: list[tuple[np.ndarray, np.ndarray]] = []
    have = 0
    for shard, lo, _ in _shards_by_row(store):
        step = store.shard_items(shard, ["step"]).column("step").to_numpy(zero_copy_only=False)
        local = np.flatnonzero(step == -1)
        finite = np.ones(len(local), bool)
        for c in ckpts[shard]:  # as FeatureStore.items: finite at every recorded checkpoint
            finite &= store.row_info(c, shard)["finite"][local]
        pend.append((lo + local.astype(np.int64), finite))
        have += len(local)
        if have >= block_rows:
            rows, fin = np.concatenate([r for r, _ in pend]), np.concatenate([f for _, f in pend])
            full = have - have % block_rows
            for a in range(0, full, block_rows):
                yield rows[a : a + block_rows], fin[a : a + block_rows]
            pend, have = [(rows[full:], fin[full:])], have - full
    if have:
        yield np.concatenate([r for r, _ in pend]), np.concatenate([f for _, f in pend])


def store_ids(store: FeatureStore, rows: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(ids object [len(rows)], unique)``: the ids of trajectory ``rows`` of a store, and
    whether none of them also belongs to an earlier trajectory row (``PoolSource.from_store``
    keeps only the first row of a repeated id). Reads the ``id`` and ``step`` columns of one
    shard at a time, up to the last of ``rows``."""
    rows = np.asarray(rows, np.int64)
    ids = np.empty(len(rows), dtype=object)
    if not len(rows):
        return ids, True
    last = int(rows.max())
    spans = [t for t in _shards_by_row(store) if t[1] <= last]
    for shard, lo, hi in spans:
        sel = np.flatnonzero((rows >= lo) & (rows < hi))
        if len(sel):
            col = store.shard_items(shard, ["id"]).column("id")
            ids[sel] = col.take(pa.array(rows[sel] - lo)).to_pylist()
    first = dict(zip(ids.tolist(), rows.tolist(), strict=True))
    if len(first) < len(rows):
        return ids, False  # an id twice among the rows asked for
    wanted = pa.array(list(first), pa.string())
    for shard, lo, _ in spans:
        t = store.shard_items(shard, ["id", "step"])
        hit = pc.and_(pc.is_in(t.column("id").cast(pa.string()), value_set=wanted),
                      pc.equal(t.column("step"), -1))  # fmt: skip
        hit = pc.fill_null(hit, False).to_numpy(zero_copy_only=False)
        for local in np.flatnonzero(hit):
            id_ = t.column("id")[int(local)].as_py()
            if lo + int(local) < first[id_]:
                return ids, False
    return ids, True


def nonfinite_ids(store: FeatureStore) -> list[str]:
    """Ids of the store's trajectory rows that are not finite, in row order (as
    ``pipeline_steps.nonfinite_ids``), from a scan of the rows files: no per-row table."""
    if store.is_view:
        it = store.items
        return [str(i) for i in it[(it["step"] == -1) & ~it["finite"]].sort_values("row")["id"]]
    bad = [r[~f] for r, f in store_trajectory_rows(store, 1 << 16)]
    rows = np.concatenate(bad) if bad else np.zeros(0, np.int64)
    return [str(i) for i in store_ids(store, rows)[0]]


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, *, window: int | None = None
) -> Iterator[R]:
    """``fn`` over ``items``, results in input order; with ``workers > 1`` on a thread pool
    with at most ``window`` (default ``2 * workers``) results computed ahead, so memory stays
    bounded while numpy releases the GIL inside each call."""
    if workers <= 1:
        yield from map(fn, items)
        return
    ahead = window or 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trajinf-score") as ex:
        pending: deque = deque()
        for it in items:
            pending.append(ex.submit(fn, it))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
