"""traker (TRAK) adapter. traker 0.3.2 ships only classification/CLIP model outputs, so this
file defines a causal-LM one; on CPU TRAKer uses its BasicProjector (normal projection).

Model output f(z) = mean over action tokens of the margin log p(y_t) - log(1 - p(y_t)), and
the out-to-loss term Q = mean over action tokens of (1 - p(y_t)): the per-token classification
recipe of the TRAK paper averaged over the action tokens of one item. TRAK scores are positive
when the train item raises the query's output (i.e. lowers its loss), our convention.
"""

from __future__ import annotations

import torch
from peer_common import MethodResult, PeerSetup, Stopwatch, as_train_by_query, loader


def _model_output_class():
    from trak.modelout_functions import AbstractModelOutput

    class CausalLMActionOutput(AbstractModelOutput):
        """TRAK model output for a causal LM whose loss counts action tokens only."""

        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, input_ids, action_mask) -> torch.Tensor:
            # one item (vmapped by TRAK): input_ids int64 [T], action_mask bool [T] -> scalar
            logits = torch.func.functional_call(
                model, (weights, buffers), args=(), kwargs={"input_ids": input_ids[None]}
            ).logits[0, :-1]
            targets = input_ids[1:]
            correct = logits.gather(-1, targets[:, None])[:, 0]
            others = logits.scatter(-1, targets[:, None], float("-inf")).logsumexp(-1)
            m = action_mask[1:].to(logits.dtype)
            return ((correct - others) * m).sum() / m.sum().clamp_min(1.0)

        def get_out_to_loss_grad(self, model, weights, buffers, batch) -> torch.Tensor:
            input_ids, action_mask = batch
            logits = torch.func.functional_call(
                model, (weights, buffers), args=(), kwargs={"input_ids": input_ids}
            ).logits[:, :-1]
            p = torch.softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
            m = action_mask[:, 1:].to(p.dtype)
            q = ((1 - p) * m).sum(1) / m.sum(1).clamp_min(1.0)
            return q.detach().unsqueeze(-1)  # [B, 1]

    return CausalLMActionOutput


def trak_dim(setup: PeerSetup) -> int:
    """TRAK inverts X^T X of the projected train features [n_train, k] without damping, so
    k must stay below n_train (k = 2048 > 96 rows gave a singular matrix and ~0 scores)."""
    return min(setup.proj_dim, len(setup.train) // 2)


def run(setup: PeerSetup, workdir) -> MethodResult:
    """TRAK with one checkpoint (the full-data model), proj_dim = trak_dim(setup)."""
    from peer_common import tensor_dataset
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = setup.fresh_model()
    params = dict(model.named_parameters())
    k = trak_dim(setup)
    # traker 0.3.2 BasicProjector bug: with a single block (proj_dim <= block_size=100) the
    # matrix is never generated before the first project(); several blocks avoid that path.
    projector = BasicProjector(
        grad_dim=sum(params[n].numel() for n in setup.weight_names),
        proj_dim=k,
        seed=0,
        proj_type=ProjectionType.normal,
        device="cpu",
        block_size=max(1, k // 4),
    )
    traker = TRAKer(
        model=model,
        task=_model_output_class()(),
        train_set_size=len(setup.train),
        save_dir=str(workdir),
        device="cpu",
        projector=projector,
        use_half_precision=False,
        grad_wrt=setup.weight_names,
        logging_level=40,
    )
    sw = Stopwatch()
    train_dl = loader(tensor_dataset(setup.train), setup.batch_size)
    query_dl = loader(tensor_dataset(setup.query), setup.batch_size)
    with sw("fit"):
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for batch in train_dl:
            traker.featurize(batch=list(batch), num_samples=batch[0].shape[0])
        traker.finalize_features()
    with sw("score"):
        traker.start_scoring_checkpoint(
            exp_name="queries",
            checkpoint=model.state_dict(),
            model_id=0,
            num_targets=len(setup.query),
        )
        for batch in query_dl:
            traker.score(batch=list(batch), num_samples=batch[0].shape[0])
        scores = traker.finalize_scores(exp_name="queries")
    return MethodResult(
        as_train_by_query(scores, len(setup.train), len(setup.query)),
        sw.seconds["fit"],
        sw.seconds["score"],
        {"proj_dim": trak_dim(setup), "projector": "BasicProjector (normal)"},
    )
