"""logix-ai (LoGra) adapter. logix-ai 0.1.1 declares Python < 3.11; its pure-Python wheel is
installed with --ignore-requires-python and works here.

LoGra = ``add_lora`` (random-initialized encoder/decoder around a zero bottleneck: a
Kronecker random projection of each tracked Linear's gradient, rank r -> r*r features per
module), gradients logged per train item, forward/backward covariances for a K-FAC
preconditioner in the projected space. API used: ``LogIX(project, config)``, ``watch``,
``add_lora``, ``setup({"grad": ["log"], "forward": ["covariance"], "backward":
["covariance"]})``, ``with run(data_id=...): loss.backward()``, ``finalize``,
``build_log_dataloader``, ``get_log``, ``compute_influence_all``. Scores are gradient inner
products (positive = helpful), our convention.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from peer_common import (
    MethodResult,
    PeerSetup,
    Stopwatch,
    loader,
    summed_action_loss,
    tensor_dataset,
)


def run(setup: PeerSetup, workdir: Path) -> list[tuple[str, MethodResult]]:
    """LoGra with K-FAC preconditioning, and the same logs scored without preconditioning."""
    from logix import LogIX
    from logix.config import LoRAConfig

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "logix.yaml"
    cfg.write_text(f"root_dir: {workdir}\n")
    rank = max(2, math.isqrt(setup.proj_dim // len(setup.modules)))
    model = setup.fresh_model()
    train_ids = list(setup.train.ids)
    sw = Stopwatch()
    with sw("fit"):
        run_ = LogIX(project="logra", config=str(cfg))
        run_.watch(model, name_filter=list(setup.modules))
        run_.add_lora(lora_config=LoRAConfig(rank=rank))
        run_.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
        run_.save(True)
        start = 0
        for ids, mask in loader(tensor_dataset(setup.train), setup.batch_size):
            batch_ids = train_ids[start : start + ids.shape[0]]
            start += ids.shape[0]
            with run_(data_id=batch_ids):
                model.zero_grad(set_to_none=True)
                summed_action_loss(model, ids, mask).backward()
        run_.finalize()
    out: list[tuple[str, MethodResult]] = []
    for precondition in (True, False):
        sw_s = Stopwatch()
        with sw_s("score"):
            log_loader = run_.build_log_dataloader(batch_size=64)
            run_.setup({"grad": ["log"]})
            run_.eval()
            rows = []
            for q in range(len(setup.query)):
                ids = torch.from_numpy(setup.query.input_ids[q : q + 1])
                mask = torch.from_numpy(setup.query.action_mask[q : q + 1])
                with run_(data_id=[setup.query.ids[q]]):
                    model.zero_grad(set_to_none=True)
                    summed_action_loss(model, ids, mask).backward()
                result = run_.compute_influence_all(
                    run_.get_log(), log_loader, precondition=precondition
                )
                order = {tid: j for j, tid in enumerate(result["tgt_ids"])}
                infl = result["influence"].detach().double().cpu().numpy()[0]
                rows.append(np.array([infl[order[t]] for t in train_ids]))
        scores = np.stack(rows, axis=1)  # [n_train, n_query]
        name = "logix LoGra (K-FAC)" if precondition else "logix LoGra (no precond.)"
        out.append(
            (
                name,
                MethodResult(
                    scores,
                    sw.seconds["fit"],
                    sw_s.seconds["score"],
                    {"lora_rank": rank, "dim": rank * rank * len(setup.modules)},
                ),
            )
        )
    return out
