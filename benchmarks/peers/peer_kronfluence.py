"""kronfluence adapter: EK-FAC influence and the ``identity`` strategy (= exact gradient dot
over the tracked modules, no projection).

API (kronfluence 1.0.1): a ``Task`` with ``compute_train_loss(batch, model, sample)`` and
``compute_measurement(batch, model)``; ``prepare_model(model, task)`` wraps the tracked
modules; ``Analyzer(..., cpu=True).fit_all_factors`` then ``compute_pairwise_scores``, whose
``"all_modules"`` entry is [n_query, n_train]. Positive kronfluence scores mean the train item
lowers the measurement (here: the query's action loss), matching our convention.
"""

from __future__ import annotations

import torch
from peer_common import MethodResult, PeerSetup, Stopwatch, as_train_by_query, lds


def _task_class(modules: list[str]):
    from kronfluence.task import Task

    class ActionLossTask(Task):
        """Loss = sum over items of their mean action-token loss."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            ids, mask = batch["input_ids"], batch["action_mask"]
            if not sample:
                return lds.action_loss(model, ids, mask).sum()
            # True Fisher for the factors: targets drawn from the model's own predictions.
            logits = model(input_ids=ids).logits[:, :-1].float()
            with torch.no_grad():
                probs = torch.softmax(logits.detach(), dim=-1)
                sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1)
                sampled = sampled.view(ids.shape[0], -1)
            tok = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), sampled.reshape(-1), reduction="none"
            ).view(ids.shape[0], -1)
            m = mask[:, 1:].float()
            return ((tok * m).sum(1) / m.sum(1).clamp_min(1.0)).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return lds.action_loss(model, batch["input_ids"], batch["action_mask"]).sum()

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return None  # equal-length sequences, no padding

    return ActionLossTask


def run(setup: PeerSetup, workdir, strategy: str) -> MethodResult:
    """Score with kronfluence ``strategy`` ("ekfac" | "identity" | "kfac" | "diagonal")."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from peer_common import DictDataset

    torch.manual_seed(0)  # the sampled-label Fisher is random
    task = _task_class(setup.modules)()
    model = prepare_model(setup.fresh_model(), task)
    analyzer = Analyzer(
        analysis_name=f"kron_{strategy}",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(workdir),
    )
    train_ds, query_ds = DictDataset(setup.train), DictDataset(setup.query)
    sw = Stopwatch()
    factor_args = FactorArguments(strategy=strategy)
    with sw("fit"):
        analyzer.fit_all_factors(
            "factors",
            dataset=train_ds,
            per_device_batch_size=setup.batch_size,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
    with sw("score"):
        analyzer.compute_pairwise_scores(
            "scores",
            "factors",
            query_dataset=query_ds,
            train_dataset=train_ds,
            per_device_query_batch_size=setup.batch_size,
            per_device_train_batch_size=setup.batch_size,
            score_args=ScoreArguments(),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return MethodResult(
        as_train_by_query(scores, len(setup.train), len(setup.query)),
        sw.seconds["fit"],
        sw.seconds["score"],
        {"strategy": strategy, "projection": "none (full factors)"},
    )
