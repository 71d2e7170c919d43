"""Linear datamodeling score (LDS) harness on a tiny synthetic agent-like causal LM.

The data imitate agent trajectories: each sequence is ``BOS SKILL (OBS ACT_MARK ACTION)*S EOS``
where the action tokens of a step are a skill-specific lookup (a permutation of the symbols) of
the step's first observation token. Only action tokens (and the closing EOS) count in the loss. A fraction of the train
pool is "noisy": its actions follow the rule of another skill, so it should hurt the queries of
its own skill. Queries are held-out sequences of each skill.

Ground truth: ``M`` tiny Llama models are trained (same initialization, seeded data order) on
random 50% subsets of the train pool; each model's mean action loss on each query is recorded.
An attribution method predicts ``scores[i, q]`` (positive = train item ``i`` lowers query ``q``'s
loss); its LDS is the mean over queries of the Spearman correlation, across the ``M`` subsets,
between ``sum_{i in subset} scores[i, q]`` and ``-loss_q(model trained on subset)``.

Run ``python benchmarks/lds.py --out runs/lds`` (main venv). The trained-subset results are
cached in ``{out}/lds_ground_truth.npz`` and the full-data model in ``{out}/full_model/``
(``save_pretrained``, safetensors) so other harnesses (benchmarks/peers/run_peers.py) evaluate
against the same subsets. Depends only on torch, transformers, numpy and scipy.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from transformers import LlamaConfig, LlamaForCausalLM

from trajinf.bench.metrics import lds_per_query

# Token layout of the synthetic vocabulary.
PAD, BOS, EOS, ACT = 0, 1, 2, 3
SKILL_BASE = 8  # skill tokens: SKILL_BASE + s
SYMBOL_BASE = 32  # observation / action symbols: SYMBOL_BASE + j


@dataclass
class DataConfig:
    """Synthetic dataset shape. All sequences have the same length (no padding needed)."""

    n_skills: int = 4
    n_train: int = 96
    n_query_per_skill: int = 16  # 64 queries: the LDS mean has a small standard error
    n_symbols: int = 8
    n_steps: int = 2  # steps (observation + action) per sequence
    step_len: int = 4  # tokens per observation and per action
    noise_fraction: float = 0.15  # train items whose actions follow another skill's rule
    seed: int = 0


@dataclass
class ModelConfig:
    """Tiny Llama built from a config (never downloaded)."""

    vocab_size: int = 128
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    init_seed: int = 0


@dataclass
class TrainConfig:
    """Training of every ground-truth model (and of the full-data model).

    Short and gentle on purpose: after 4 epochs at lr 1e-3 the models are still near the
    linear regime that gradient attribution assumes, so the query losses depend on which items
    a subset holds (the exact grad-dot LDS is 0.63 here, against 0.06 after 30 epochs at 3e-3,
    where every subset fits every skill and the remaining differences are optimization noise).
    """

    epochs: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class SeqData:
    """Equal-length token sequences. ``input_ids`` int64 [N, T]; ``action_mask`` bool [N, T]
    (token t counts in the loss, predicted from tokens < t); ``step_ids`` int32 [N, T]
    (step of each action token, -1 elsewhere); ``skill`` int64 [N]; ``noisy`` bool [N]."""

    input_ids: np.ndarray
    action_mask: np.ndarray
    step_ids: np.ndarray
    skill: np.ndarray
    noisy: np.ndarray
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def tokenized(self) -> list:
        """The rows as trajinf ``TokenizedTrajectory`` items (action mask and step ids as
        given), what ``trajinf.gradients.extract_features`` reads."""
        from trajinf.data.tokenize import TokenizedTrajectory

        return [
            TokenizedTrajectory(
                id=self.ids[i],
                input_ids=self.input_ids[i].copy(),
                action_mask=self.action_mask[i].copy(),
                step_ids=self.step_ids[i].copy(),
                n_steps=int(self.step_ids[i].max()) + 1,
            )
            for i in range(len(self))
        ]

    def subset(self, idx: np.ndarray) -> SeqData:
        """The rows ``idx`` (int indices) as a new SeqData."""
        return SeqData(
            self.input_ids[idx], self.action_mask[idx], self.step_ids[idx], self.skill[idx],
            self.noisy[idx], [self.ids[i] for i in idx],
        )  # fmt: skip


def _sequence(rng: np.random.Generator, skill: int, perm: np.ndarray, cfg: DataConfig):
    """One sequence whose actions map observations through ``perm`` [n_symbols]."""
    toks, mask, steps = [BOS, SKILL_BASE + skill], [False, False], [-1, -1]
    for k in range(cfg.n_steps):
        obs = rng.integers(0, cfg.n_symbols, size=cfg.step_len)
        toks += [SYMBOL_BASE + int(o) for o in obs] + [ACT]
        mask += [False] * (cfg.step_len + 1)
        steps += [-1] * (cfg.step_len + 1)
        # the action is a skill-specific lookup of the step's first observation token: a
        # small table per skill, so a query's loss depends on which (skill, key) pairs and
        # which noisy items the training subset contains
        key = int(obs[0])
        toks += [SYMBOL_BASE + int(perm[(key + j) % cfg.n_symbols]) for j in range(cfg.step_len)]
        mask += [True] * cfg.step_len
        steps += [k] * cfg.step_len
    toks.append(EOS)  # learning to stop is part of the last action
    mask.append(True)
    steps.append(cfg.n_steps - 1)
    return toks, mask, steps


def make_dataset(cfg: DataConfig) -> tuple[SeqData, SeqData]:
    """Build (train pool, queries). Train items cycle through skills; the first
    ``noise_fraction`` of each skill's items use the next skill's permutation (harmful)."""
    rng = np.random.default_rng(cfg.seed)
    perms = np.stack([rng.permutation(cfg.n_symbols) for _ in range(cfg.n_skills)])

    def build(n: int, noisy_frac: float, prefix: str) -> SeqData:
        rows = []
        skills = np.arange(n) % cfg.n_skills
        n_noisy = int(round(noisy_frac * n))
        noisy = np.zeros(n, dtype=bool)
        noisy[rng.permutation(n)[:n_noisy]] = True
        for i in range(n):
            s = int(skills[i])
            rule = perms[(s + 1) % cfg.n_skills] if noisy[i] else perms[s]
            rows.append(_sequence(rng, s, rule, cfg))
        return SeqData(
            input_ids=np.array([r[0] for r in rows], dtype=np.int64),
            action_mask=np.array([r[1] for r in rows], dtype=bool),
            step_ids=np.array([r[2] for r in rows], dtype=np.int32),
            skill=skills.astype(np.int64),
            noisy=noisy,
            ids=[f"{prefix}-{i:04d}" for i in range(n)],
        )

    train = build(cfg.n_train, cfg.noise_fraction, "train")
    query = build(cfg.n_query_per_skill * cfg.n_skills, 0.0, "query")
    return train, query


def tiny_llama(cfg: ModelConfig) -> LlamaForCausalLM:
    """A tiny LlamaForCausalLM from a config with eager attention (``torch.func`` friendly)."""
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=2 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(config)
    return model


def action_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, action_mask: torch.Tensor
) -> torch.Tensor:
    """Per-item mean action-token loss. ``input_ids`` int64 [B, T], ``action_mask`` bool [B, T]
    -> float [B]: mean over t with action_mask[t] of -log p(input_ids[t] | input_ids[:t])."""
    logits = model(input_ids=input_ids).logits[:, :-1]  # [B, T-1, V] predicts tokens 1..T-1
    tok_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(input_ids.shape[0], -1)
    mask = action_mask[:, 1:].to(tok_loss.dtype)
    return (tok_loss * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _tensors(data: SeqData, idx: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    sel = slice(None) if idx is None else idx
    return torch.from_numpy(data.input_ids[sel]), torch.from_numpy(data.action_mask[sel])


def train_model(
    data: SeqData, members: np.ndarray | None, mcfg: ModelConfig, tcfg: TrainConfig, seed: int
) -> LlamaForCausalLM:
    """Train a fresh tiny Llama (init ``mcfg.init_seed``) on the ``members`` rows of ``data``
    (int indices, or None for all) with AdamW; ``seed`` fixes the data order."""
    model = tiny_llama(mcfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    idx = np.arange(len(data)) if members is None else np.asarray(members)
    gen = np.random.default_rng(seed)
    for _ in range(tcfg.epochs):
        order = idx[gen.permutation(len(idx))]
        for start in range(0, len(order), tcfg.batch_size):
            ids, mask = _tensors(data, order[start : start + tcfg.batch_size])
            loss = action_loss(model, ids, mask).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


def time_one_epoch(data: SeqData, mcfg: ModelConfig, tcfg: TrainConfig, seed: int = 0) -> float:
    """Wall seconds of one training epoch over all of ``data`` (same batches and optimizer as
    the ground-truth training), the unit that attribution costs are reported in."""
    one = TrainConfig(epochs=1, batch_size=tcfg.batch_size, lr=tcfg.lr)
    train_model(data, None, mcfg, one, seed)  # warm-up (allocator, kernels)
    runs = []
    for _ in range(3):  # min of 3: the least disturbed by other processes on the machine
        t0 = time.perf_counter()
        train_model(data, None, mcfg, one, seed)
        runs.append(time.perf_counter() - t0)
    return min(runs)


@torch.no_grad()
def query_losses(model: torch.nn.Module, query: SeqData) -> np.ndarray:
    """Mean action loss of each query under ``model``: float64 [n_query]."""
    ids, mask = _tensors(query)
    return action_loss(model, ids, mask).double().numpy()


def sample_subsets(n_models: int, n_train: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Random subsets as a bool mask [n_models, n_train], each with exactly
    ``round(fraction * n_train)`` members; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    k = int(round(fraction * n_train))
    out = np.zeros((n_models, n_train), dtype=bool)
    for m in range(n_models):
        out[m, rng.permutation(n_train)[:k]] = True
    return out


@dataclass
class GroundTruth:
    """Trained-subset results. ``subsets`` bool [M, n_train]; ``losses`` float64 [M, n_query]."""

    subsets: np.ndarray
    losses: np.ndarray
    meta: dict

    def save(self, path: str | Path) -> None:
        """Write an .npz (arrays only; ``meta`` as a JSON string, no pickle)."""
        np.savez(
            path, subsets=self.subsets, losses=self.losses, meta=np.array(json.dumps(self.meta))
        )

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            return cls(z["subsets"], z["losses"], json.loads(str(z["meta"])))


def train_subsets(
    train: SeqData,
    query: SeqData,
    subsets: np.ndarray,
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    progress: bool = False,
) -> np.ndarray:
    """Train one model per subset row and return query losses float64 [M, n_query]."""
    out = np.zeros((subsets.shape[0], len(query)))
    for m in range(subsets.shape[0]):
        model = train_model(train, np.flatnonzero(subsets[m]), mcfg, tcfg, seed=1000 + m)
        out[m] = query_losses(model, query)
        if progress:
            print(f"  subset model {m + 1}/{subsets.shape[0]}", flush=True)
    return out


def rank_agreement(scores: np.ndarray, reference: np.ndarray) -> float:
    """Mean over queries of the Spearman correlation between ``scores[:, q]`` and
    ``reference[:, q]`` (both [n_train, n_query]): how well a method orders the train pool
    the way the reference does."""
    scores, reference = np.asarray(scores), np.asarray(reference)
    return float(
        np.mean(
            [
                0.0
                if np.ptp(scores[:, q]) == 0 or np.ptp(reference[:, q]) == 0
                else spearmanr(scores[:, q], reference[:, q]).statistic
                for q in range(scores.shape[1])
            ]
        )
    )


def per_item_gradients(
    model: torch.nn.Module, data: SeqData, params: Sequence[str] | None = None
) -> torch.Tensor:
    """Exact (unprojected) per-item gradients of the mean action loss, one backward per item:
    float32 [N, P] over the named parameters ``params`` (default: all trainable)."""
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
    tensors = [named[n] for n in names]
    rows = []
    for i in range(len(data)):
        ids, mask = _tensors(data, np.array([i]))
        grads = torch.autograd.grad(action_loss(model, ids, mask).sum(), tensors, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(t)).reshape(-1)
                    for g, t in zip(grads, tensors, strict=True)
                ]
            )
        )
    return torch.stack(rows).float()


def exact_grad_dot(
    model: torch.nn.Module, train: SeqData, query: SeqData, params: Sequence[str] | None = None
) -> np.ndarray:
    """Reference attributor: ``<grad L_train_i, grad L_query_q>`` with exact per-item gradients
    -> float64 [n_train, n_query] (positive = a gradient step on i lowers q's loss). The query
    gradients are held [n_query, P]; train gradients stream one item at a time, so memory is
    (n_query + 1) x P floats (a ~20M-parameter model fits)."""
    g_query = per_item_gradients(model, query, params)  # float32 [n_query, P]
    # float64 dots for small models (as before); float32 for large ones (ranks are unchanged
    # and a float64 copy of the query gradients would double the memory)
    small = g_query.shape[1] < 5_000_000
    q = g_query.double() if small else g_query
    rows = []
    for i in range(len(train)):
        g = per_item_gradients(model, train.subset(np.array([i])), params)[0]
        rows.append((q @ (g.double() if small else g)).double())
    return torch.stack(rows).numpy()


def block_linear_params(model: torch.nn.Module) -> list[str]:
    """Weights of the Linear layers inside the transformer blocks (what factorized methods
    track): excludes embeddings, norms and lm_head."""
    return [
        f"{name}.weight"
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}."
    ]


def build_ground_truth(
    out: Path,
    dcfg: DataConfig,
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    n_models: int,
    subset_seed: int = 0,
    progress: bool = True,
) -> GroundTruth:
    """Train the full-data model and ``n_models`` subset models; write ``out/full_model`` and
    ``out/lds_ground_truth.npz``. Returns the ground truth."""
    out.mkdir(parents=True, exist_ok=True)
    train, query = make_dataset(dcfg)
    t0 = time.perf_counter()
    full = train_model(train, None, mcfg, tcfg, seed=0)
    full.save_pretrained(out / "full_model")
    subsets = sample_subsets(n_models, len(train), 0.5, seed=subset_seed)
    losses = train_subsets(train, query, subsets, mcfg, tcfg, progress=progress)
    meta = {
        "data": asdict(dcfg),
        "model": asdict(mcfg),
        "train": asdict(tcfg),
        "n_models": n_models,
        "subset_seed": subset_seed,
        "train_ids_sha": _digest(train.input_ids),
        "full_model_query_loss": query_losses(full, query).tolist(),
        "train_seconds": time.perf_counter() - t0,
    }
    gt = GroundTruth(subsets, losses, meta)
    gt.save(out / "lds_ground_truth.npz")
    return gt


def _digest(arr: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


def load_setup(out: Path) -> tuple[GroundTruth, SeqData, SeqData, LlamaForCausalLM, dict]:
    """Reload (ground truth, train, query, full-data model, configs) from ``out``; checks that
    the regenerated train pool matches the one the ground truth was trained on."""
    gt = GroundTruth.load(out / "lds_ground_truth.npz")
    dcfg = DataConfig(**gt.meta["data"])
    train, query = make_dataset(dcfg)
    if _digest(train.input_ids) != gt.meta["train_ids_sha"]:
        raise RuntimeError(f"{out}: regenerated train pool differs from the cached ground truth")
    model = LlamaForCausalLM.from_pretrained(out / "full_model", attn_implementation="eager")
    model.eval()
    cfgs = {
        "data": dcfg,
        "model": ModelConfig(**gt.meta["model"]),
        "train": TrainConfig(**gt.meta["train"]),
    }
    return gt, train, query, model, cfgs


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: build (or reuse) the ground truth and report the exact grad-dot reference's LDS."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/lds"))
    ap.add_argument("--models", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--queries-per-skill", type=int, default=DataConfig.n_query_per_skill)
    ap.add_argument("--n-train", type=int, default=DataConfig.n_train)
    ap.add_argument("--hidden", type=int, default=ModelConfig.hidden)
    ap.add_argument("--layers", type=int, default=ModelConfig.layers)
    ap.add_argument("--heads", type=int, default=ModelConfig.heads)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = stable timings)")
    ap.add_argument("--rebuild", action="store_true", help="retrain even if the cache exists")
    ap.add_argument("--report", type=Path, default=None, help="also write the report JSON here")
    args = ap.parse_args(argv)
    # Tiny models gain nothing from intra-op threads and lose a lot on a shared machine.
    torch.set_num_threads(args.threads)
    dcfg = DataConfig(n_train=args.n_train, n_query_per_skill=args.queries_per_skill)
    mcfg = ModelConfig(hidden=args.hidden, layers=args.layers, heads=args.heads)
    tcfg = TrainConfig(epochs=args.epochs, lr=args.lr)
    cache = args.out / "lds_ground_truth.npz"
    wanted = {"data": asdict(dcfg), "model": asdict(mcfg), "train": asdict(tcfg),
              "n_models": args.models}  # fmt: skip
    stale = cache.exists() and any(
        GroundTruth.load(cache).meta.get(k) != v for k, v in wanted.items()
    )
    if stale:
        print(f"{cache}: cached ground truth has other settings; retraining", flush=True)
    if args.rebuild or stale or not cache.exists():
        build_ground_truth(args.out, dcfg, mcfg, tcfg, args.models)
    report = ground_truth_report(args.out)
    print(json.dumps(report, indent=2))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")


def ground_truth_report(out: Path) -> dict:
    """How informative the cached ground truth in ``out`` is: the LDS (± standard error over
    queries) of the exact gradient dot (all parameters and block linears) and of the planted
    skill oracle, losses, and the wall time of one training epoch."""
    gt, train, query, model, cfgs = load_setup(out)
    ref = exact_grad_dot(model, train, query)
    lin = exact_grad_dot(model, train, query, block_linear_params(model))
    same_skill = (train.skill[:, None] == query.skill[None, :]).astype(float)
    oracle = same_skill - 2.0 * (train.noisy[:, None] & (same_skill > 0))

    def with_se(scores: np.ndarray) -> dict:
        pq = lds_per_query(gt.subsets, gt.losses, scores)
        return {"lds": float(pq.mean()), "se": float(pq.std(ddof=1) / np.sqrt(len(pq)))}

    return {
        "n_models": int(gt.subsets.shape[0]),
        "n_train": len(train),
        "n_query": len(query),
        "train": gt.meta["train"],
        "train_seconds": gt.meta["train_seconds"],
        "mean_full_model_query_loss": float(np.mean(gt.meta["full_model_query_loss"])),
        "mean_subset_query_loss": float(gt.losses.mean()),
        "exact_grad_dot_all_params": with_se(ref),
        "exact_grad_dot_block_linears": with_se(lin),
        "skill_oracle": with_se(oracle),
        "epoch_seconds": time_one_epoch(train, cfgs["model"], cfgs["train"]),
    }


if __name__ == "__main__":
    main()
