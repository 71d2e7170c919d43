"""Tiny models and exact gradient oracles shared by the gradient and checkpoint tests.

The oracles are independent of the extractor: weight gradients come from torch.func
(vmap over token-weight rows of grad(functional_call)) and projections are rebuilt from the
seeded blocks, so a test comparing against them fails when the extractor is wrong.
Imported as ``from grad_oracles import ...`` (pytest puts tests/ on sys.path: no __init__.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.gradients.config import ExtractionConfig
from trajinf.gradients.modules import TrackedModule
from trajinf.gradients.projection import (
    DENSE_CHUNK_ROWS,
    factorized_k,
    factorized_pair,
    seeded_gaussian,
)
from trajinf.models.lora import wrap_lora

VOCAB = 100


def tiny_model(arch: str, vocab: int = VOCAB, init_std: float = 0.2) -> torch.nn.Module:
    """fp32 eval-mode tiny llama | qwen2 | gpt2 (Conv1D) | lora (LoRA-wrapped llama).

    The default init std 0.2 keeps gradients far from zero; LoRA B is re-initialized because
    it starts at zero, which would make dL/dA vanish.
    """
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, initializer_range=init_std)
    if arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
        )
    else:
        kw = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
        cls, cfg = (
            (Qwen2ForCausalLM, Qwen2Config) if arch == "qwen2" else (LlamaForCausalLM, LlamaConfig)
        )
        model = cls(cfg(**kw))
    if arch == "lora":
        model = wrap_lora(model, rank=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model.float().eval()


def nll_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T] next-token nll aligned to the predicted token (position 0 predicts nothing: 0)."""
    return F.pad(F.cross_entropy(logits[:-1], ids[1:], reduction="none"), (1, 0))


def token_weights(item: TokenizedTrajectory, normalization: str = "mean") -> torch.Tensor:
    """[T] the item's loss weights: action mask x ``weights``, / n action tokens for "mean"."""
    w = item.action_mask.astype(np.float32)
    if item.weights is not None:
        w = w * item.weights
    if normalization == "mean":
        w = w / item.action_mask.sum()
    return torch.from_numpy(w)


def step_weight_rows(item: TokenizedTrajectory) -> torch.Tensor:
    """[S, T]: each step's own token weights (the item's weights masked to the step)."""
    w = token_weights(item).numpy()
    steps = sorted(set(item.step_ids[item.step_ids >= 0]))
    return torch.from_numpy(np.stack([w * (item.step_ids == s) for s in steps]))


def exact_weighted_grads(
    model: torch.nn.Module, ids: torch.Tensor, rows: torch.Tensor, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """{param name: [R, *shape]}: exact gradient of sum_t rows[r, t] * nll_t for each row r.

    ``ids`` is one sequence [T] shared by all rows or one per row [R, T] (equal lengths).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, seq, w):
        logits = functional_call(model, p, (seq.unsqueeze(0),), {"use_cache": False}).logits[0]
        return (nll_of(logits, seq) * w).sum()

    ids_dim = 0 if ids.dim() == 2 else None
    grads = vmap(grad(loss), in_dims=(None, ids_dim, 0))(params, ids, rows)
    return {n: grads[n] for n in names}


def step_loss_grads(
    model: torch.nn.Module,
    item: TokenizedTrajectory,
    names: Sequence[str],
    *,
    with_item: bool = False,
) -> dict[str, torch.Tensor]:
    """Exact gradients of each step's own masked loss, {param name: [S, *shape]}.

    with_item: the whole item loss's gradient comes first ([1 + S, *shape]).
    """
    rows = step_weight_rows(item)
    if with_item:
        rows = torch.cat([token_weights(item)[None], rows])
    return exact_weighted_grads(model, torch.from_numpy(item.input_ids), rows, names)


def flatten_grads(grads: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """[R, N]: the rows' gradients flattened and concatenated in ``names`` order."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1)


def module_grads(
    tracked: Sequence[TrackedModule], grads: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """{module name: [..., out, in]} from {param name: grads} (Conv1D stores [in, out])."""
    return {
        t.name: grads[t.param_name].transpose(-1, -2) if t.transposed else grads[t.param_name]
        for t in tracked
    }


def project_factorized(
    tracked: Sequence[TrackedModule], config: ExtractionConfig, mats: dict[str, torch.Tensor]
) -> np.ndarray:
    """Concatenate P_out G P_in^T (G in [out, in]) over modules -> [D] (or [S, D] for [S,o,i])."""
    k = factorized_k(config.proj_dim, len(tracked))
    parts = []
    for t in tracked:
        p_in, p_out = factorized_pair(config.seed, t.name, k, t.in_features, t.out_features)
        g = mats[t.name]
        parts.append((p_out @ g @ p_in.T).reshape(*g.shape[:-2], k * k))
    return torch.cat(parts, -1).numpy()


def reference_projection(
    model: torch.nn.Module, names: Sequence[str], dim: int, seed: int
) -> torch.Tensor:
    """LESS's full [N, D] dense matrix, assembled from the seeded per-parameter blocks."""
    params = dict(model.named_parameters())
    blocks = []
    for name in names:
        numel = params[name].numel()
        for c, start in enumerate(range(0, numel, DENSE_CHUNK_ROWS)):
            rows = min(DENSE_CHUNK_ROWS, numel - start)
            blocks.append(seeded_gaussian(rows, dim, 1 / math.sqrt(dim), "less", seed, name, c))
    return torch.cat(blocks)


def assert_close(actual, expected, rtol: float = 1e-4, atol_floor: float = 1e-3) -> None:
    """allclose with atol 1e-6 x max(|expected|, atol_floor): relative to the feature scale."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=1e-6 * max(np.abs(expected).max(), atol_floor)
    )
