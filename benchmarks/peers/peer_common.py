"""Shared pieces of the peer adapters: the setup every method sees, datasets, the loss, timing.

Every adapter scores the SAME full-data model (a fresh deep copy, since libraries wrap modules
or flip ``requires_grad``) on the SAME train pool and queries, with the same loss: the mean
action-token loss of each item (benchmarks/lds.py ``action_loss``). Scores are returned as
float64 [n_train, n_query] with the convention positive = the train item lowers the query loss.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

_LDS_PATH = Path(__file__).resolve().parents[1] / "lds.py"


def load_lds_module():
    """Import benchmarks/lds.py by path (benchmarks is not a package)."""
    name = "trajinf_bench_lds"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _LDS_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


lds = load_lds_module()


@dataclass
class PeerSetup:
    """What every method gets. ``model`` is the trained full-data model (never mutated: use
    :meth:`fresh_model`); ``modules`` are the block Linear module names all methods track."""

    model: torch.nn.Module
    train: object  # lds.SeqData
    query: object  # lds.SeqData
    modules: list[str]
    proj_dim: int = 2048
    batch_size: int = 16

    def fresh_model(self) -> torch.nn.Module:
        """A deep copy of the full-data model in eval mode with every parameter trainable."""
        m = copy.deepcopy(self.model)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    @property
    def weight_names(self) -> list[str]:
        """Parameter names ``{module}.weight`` of the tracked modules."""
        return [f"{m}.weight" for m in self.modules]


@dataclass
class MethodResult:
    """Scores float64 [n_train, n_query] plus the wall seconds of the two stages."""

    scores: np.ndarray
    fit_seconds: float
    score_seconds: float
    info: dict = field(default_factory=dict)


class Stopwatch:
    """Accumulates wall time of named stages: ``with sw("fit"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


class DictDataset(torch.utils.data.Dataset):
    """Items as dicts: ``input_ids`` int64 [T], ``action_mask`` bool [T], and ``labels`` int64
    [T] (input_ids with -100 outside actions, for libraries that call ``model(**batch).loss``)."""

    def __init__(self, data) -> None:
        self.ids = torch.from_numpy(data.input_ids)
        self.mask = torch.from_numpy(data.action_mask)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].masked_fill(~self.mask[i], -100)
        return {"input_ids": self.ids[i], "action_mask": self.mask[i], "labels": labels}


def tensor_dataset(data) -> torch.utils.data.TensorDataset:
    """Items as tuples ``(input_ids int64 [T], action_mask bool [T])``."""
    return torch.utils.data.TensorDataset(
        torch.from_numpy(data.input_ids), torch.from_numpy(data.action_mask)
    )


def summed_action_loss(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor):
    """Sum over the batch of per-item mean action losses (so hook-based per-sample gradients
    are exactly the per-item gradients). ``input_ids`` [B, T] or [T]; returns a scalar."""
    if input_ids.dim() == 1:
        input_ids, mask = input_ids[None], mask[None]
    return lds.action_loss(model, input_ids, mask.bool()).sum()


def functional_action_loss(model: torch.nn.Module) -> Callable:
    """``f(params, (input_ids, action_mask))`` in ``torch.func`` style for one item
    (shape [T] or [1, T]): its mean action loss (a scalar)."""

    def f(params, data):
        input_ids, mask = data
        if input_ids.dim() == 1:
            input_ids, mask = input_ids[None], mask[None]

        logits = torch.func.functional_call(model, params, args=(), kwargs={"input_ids": input_ids})
        return _loss_from_logits(logits.logits, input_ids, mask.bool()).sum()

    return f


def _loss_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor):
    """Per-item mean action loss from logits [B, T, V] -> [B]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = -logp.gather(-1, input_ids[:, 1:, None])[..., 0]
    m = mask[:, 1:].to(tok.dtype)
    return (tok * m).sum(1) / m.sum(1).clamp_min(1.0)


def loader(dataset, batch_size: int, collate=None) -> torch.utils.data.DataLoader:
    """Unshuffled loader (attribution libraries map rows back to dataset order)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate
    )


def as_train_by_query(scores, n_train: int, n_query: int) -> np.ndarray:
    """Any score matrix as float64 [n_train, n_query] (libraries return either orientation)."""
    s = scores.detach().cpu().double().numpy() if torch.is_tensor(scores) else np.asarray(scores)
    s = s.astype(np.float64)
    if s.shape == (n_train, n_query):
        return s
    if s.shape == (n_query, n_train):
        return s.T.copy()
    raise ValueError(f"score shape {s.shape} is neither ({n_train}, {n_query}) nor transposed")
