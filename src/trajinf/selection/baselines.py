"""Statistics for the baseline selectors: RDS+ embeddings, loss, gradient norm, length.

RDS+ (Ivison et al. 2025) ranks pool items by the cosine between mean last-layer hidden states
of pool and target items; loss / gradnorm / length rank by the store's per-item loss, the norm
of the stored trajectory feature, and the number of action tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError
from trajinf.store.feature_store import FeatureStore


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its LM head (so no [B, T, vocab] logits are computed)."""
    if hasattr(model, "get_base_model"):  # peft wrapper
        model = model.get_base_model()
    base = getattr(model, "base_model", model)
    return base if base is not None else model


def _batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Length-sorted batches whose padded size (count x longest) stays within the budget."""
    order = np.argsort(-lengths, kind="stable")
    out, cur = [], []
    for i in order:
        # sorted descending, so the first item of a batch is its longest
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) + 1) * longest > batch_tokens:
            out.append(np.asarray(cur))
            cur = []
        cur.append(i)
    if cur:
        out.append(np.asarray(cur))
    return out


def hidden_state_embeddings(
    model: torch.nn.Module, items: Sequence[TokenizedTrajectory], batch_tokens: int = 8192
) -> np.ndarray:
    """Mean over all (non-pad) tokens of the last-layer hidden states: float32 [N, H].

    Items are length-bucketed and right-padded with an attention mask; with causal attention,
    real tokens never see padding, so an item's embedding does not depend on its batch.
    """
    if not items:
        raise TrajinfError("hidden_state_embeddings: no items")
    backbone = _backbone(model)
    device = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", None) or 0
    lengths = np.array([len(it.input_ids) for it in items])
    out: np.ndarray | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in _batches(lengths, batch_tokens):
                t = int(lengths[batch].max()) if len(batch) else 0
                ids = torch.full((len(batch), max(t, 1)), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(batch):
                    n = lengths[i]
                    ids[r, :n] = torch.as_tensor(items[i].input_ids, dtype=torch.long)
                    mask[r, :n] = 1
                ids, mask = ids.to(device), mask.to(device)
                hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(torch.float32)
                mean = (hidden.to(torch.float32) * m).sum(1) / m.sum(1).clamp_min(1.0)
                if out is None:
                    out = np.zeros((len(items), mean.shape[-1]), np.float32)
                out[batch] = mean.cpu().numpy()
    finally:
        model.train(was_training)
    assert out is not None
    return out


def rds_scores(
    pool_emb: np.ndarray,
    target_emb: np.ndarray,
    target_subtasks: Sequence[str] | None = None,
    *,
    aggregate: str = "max",
    chunk_rows: int = 65536,
) -> np.ndarray:
    """RDS+ score float32 [N]: cosine of pool [N, H] with target [M, H] embeddings, averaged
    within each target subtask, then max (or mean) over subtasks."""
    if aggregate not in ("max", "mean"):
        raise TrajinfError(f"rds_scores: aggregate must be max or mean, got {aggregate!r}")

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(n > 0, n, 1.0)

    t = unit(target_emb)
    labels = np.asarray(["all"] * len(t) if target_subtasks is None else list(target_subtasks))
    names = sorted(set(labels.tolist()))
    # mean of cosines == cosine with the mean of unit targets (divided by nothing else)
    dirs = np.stack([t[labels == s].mean(0) for s in names])  # [S, H]
    out = np.empty(len(pool_emb), np.float32)
    for a in range(0, len(pool_emb), chunk_rows):
        per = unit(pool_emb[a : a + chunk_rows]) @ dirs.T
        out[a : a + chunk_rows] = per.max(1) if aggregate == "max" else per.mean(1)
    return out


def item_statistics(
    store: FeatureStore, *, ckpt: int = -1, chunk_rows: int = 65536
) -> pd.DataFrame:
    """Per-trajectory baseline statistics of a pool store: id, loss, grad_norm (norm of the
    stored trajectory feature at checkpoint ``ckpt``, default the last), length (action
    tokens). Reads trajectory rows in blocks (bounded memory)."""
    it = store.items
    traj = it[it["step"] == -1].reset_index(drop=True)
    c = ckpt % store.n_checkpoints
    rows = traj["row"].to_numpy()
    norms = np.empty(len(rows), np.float32)
    for a in range(0, len(rows), chunk_rows):
        norms[a : a + chunk_rows] = np.linalg.norm(
            store.features(c, rows[a : a + chunk_rows]), axis=1
        )
    return pd.DataFrame(
        {
            "id": traj["id"].astype(str),
            "loss": traj["loss"].astype(float),
            "grad_norm": norms,
            "length": traj["n_action_tokens"].astype(int),
        }
    )


def baseline_statistics(
    model_dir,
    pool_tok,
    target_tok,
    pool_store: FeatureStore,
    target_store: FeatureStore,
    pool_trajs,
    *,
    trust_remote_code: bool = False,
    model: torch.nn.Module | None = None,
    pool_embeddings: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per-item statistics the baseline selectors need, in pool order: id, loss, grad_norm,
    length (:func:`item_statistics` of the pool store's last checkpoint) and rds (RDS+ cosine
    of mean last-hidden-state embeddings to the target's subtasks, with the model at
    ``model_dir``). ``model``: that model, already loaded; ``pool_embeddings``: the pool's
    :func:`hidden_state_embeddings` [N, H], already computed (the job caches them per shard)."""
    from trajinf.models.checkpoints import load_model

    if model is None:
        model, _ = load_model(Path(model_dir), trust_remote_code=trust_remote_code)
    if pool_embeddings is None:
        pool_embeddings = hidden_state_embeddings(model, pool_tok)
    t_items = target_store.items
    t_sub = t_items[t_items["step"] == -1].sort_values("item")["subtask"].tolist()
    rds = rds_scores(pool_embeddings, hidden_state_embeddings(model, target_tok), t_sub)
    ids = [t.id for t in pool_trajs]
    stats = item_statistics(pool_store).set_index("id").reindex(ids)
    stats["rds"] = rds
    return stats.rename_axis("id").reset_index()
