"""dattri adapter: Grad-Dot / Grad-Cos (TracInAttributor with one checkpoint), TRAK, DataInf,
LoGra (hook based), and EK-FAC / Arnoldi / CG / LiSSA influence functions.

API (dattri 0.3.0): ``AttributionTask(loss_func, model, checkpoints)`` where ``loss_func`` is
``f(params, data)`` in ``torch.func`` style for the vmapped attributors, but
``f(model, batch, device)`` for the hook-based LoGra; each attributor has ``cache(train_loader)``
and ``attribute(train_loader, test_loader)`` -> [n_train, n_test]. Grad-Dot/TRAK/DataInf use
``layer_name`` = parameter names; LoGra/EK-FAC use module names. dattri's scores are positive
for helpful train items (inner products of loss gradients; TRAK of margin gradients).
"""

from __future__ import annotations

import inspect

import torch
from peer_common import (
    MethodResult,
    PeerSetup,
    Stopwatch,
    as_train_by_query,
    functional_action_loss,
    lds,
    loader,
    summed_action_loss,
    tensor_dataset,
)
from peer_trak import trak_dim


def _margin_and_prob(model):
    """TRAK pieces for one item: mean action-token margin log(p/(1-p)) and mean p."""

    def token_logp(params, data):
        input_ids, mask = data
        if input_ids.dim() == 1:
            input_ids, mask = input_ids[None], mask[None]
        logits = torch.func.functional_call(model, params, args=(), kwargs={"input_ids": input_ids})
        logp = torch.log_softmax(logits.logits[:, :-1].float(), -1)
        tok = logp.gather(-1, input_ids[:, 1:, None])[..., 0]
        return tok, mask[:, 1:].to(tok.dtype)

    def margin(params, data):
        tok, m = token_logp(params, data)
        marg = tok - torch.log1p(-torch.exp(tok).clamp(max=1 - 1e-6))
        return ((marg * m).sum(1) / m.sum(1)).sum()

    def prob(params, data):
        tok, m = token_logp(params, data)
        return ((torch.exp(tok) * m).sum(1) / m.sum(1)).sum()

    return margin, prob


def _vmap_task(model, loss_func=None):
    from dattri.task import AttributionTask

    return AttributionTask(
        loss_func=loss_func or functional_action_loss(model),
        model=model,
        checkpoints=model.state_dict(),
    )


def _attribute(attributor, setup: PeerSetup, train_dl, test_dl, info: dict) -> MethodResult:
    sw = Stopwatch()
    with sw("fit"):
        # TracInAttributor has no cache stage (cache() takes no loader): all its work is in
        # attribute(), which is then timed as the score stage
        if "full_train_dataloader" in inspect.signature(attributor.cache).parameters:
            attributor.cache(train_dl)
        else:
            info = {**info, "note": "no separate cache stage; all time in score"}
    with sw("score"):
        if "test_dataloader" == next(iter(inspect.signature(attributor.attribute).parameters)):
            # TRAKAttributor.attribute(test_dataloader, train_dataloader=None): the other
            # attributors take (train, test); passing train again would be rejected
            scores = attributor.attribute(test_dl)
        else:
            scores = attributor.attribute(train_dl, test_dl)
    return MethodResult(
        as_train_by_query(scores, len(setup.train), len(setup.query)),
        sw.seconds["fit"],
        sw.seconds["score"],
        info,
    )


def _proj_kwargs(setup: PeerSetup) -> dict:
    return {"proj_dim": setup.proj_dim, "proj_max_batch_size": 16, "proj_seed": 0, "device": "cpu"}


def run(setup: PeerSetup, workdir, method: str) -> MethodResult:
    """One dattri method: "grad-dot" | "grad-cos" | "trak" | "datainf" | "logra" | "ekfac" |
    "arnoldi" | "cg" | "lissa"."""
    from dattri.algorithm import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorDataInf,
        IFAttributorEKFAC,
        IFAttributorLiSSA,
        TracInAttributor,
        TRAKAttributor,
    )

    model = setup.fresh_model()
    bs = setup.batch_size
    train_dl = loader(tensor_dataset(setup.train), bs)
    test_dl = loader(tensor_dataset(setup.query), bs)
    layers = setup.weight_names
    if method in ("grad-dot", "grad-cos"):
        att = TracInAttributor(
            task=_vmap_task(model),
            weight_list=torch.ones(1),
            normalized_grad=method == "grad-cos",
            projector_kwargs=_proj_kwargs(setup),
            layer_name=layers,
            device="cpu",
        )
        return _attribute(att, setup, train_dl, test_dl, {"proj_dim": setup.proj_dim})
    if method == "trak":
        margin, prob = _margin_and_prob(model)
        kw = {**_proj_kwargs(setup), "proj_dim": trak_dim(setup)}  # see peer_trak.trak_dim
        att = TRAKAttributor(
            task=_vmap_task(model, margin),
            # called with unflattened params (dattri 0.3.0, trak.py), so no flatten_func here
            correct_probability_func=prob,
            projector_kwargs=kw,
            layer_name=layers,
            device="cpu",
        )
        return _attribute(att, setup, train_dl, test_dl, {"proj_dim": trak_dim(setup)})
    if method == "datainf":
        att = IFAttributorDataInf(
            task=_vmap_task(model), layer_name=layers, device="cpu", regularization=1e-3
        )
        return _attribute(att, setup, train_dl, test_dl, {"regularization": 1e-3})
    if method in ("arnoldi", "cg", "lissa"):
        cls = {"arnoldi": IFAttributorArnoldi, "cg": IFAttributorCG, "lissa": IFAttributorLiSSA}
        att = cls[method](task=_vmap_task(model), layer_name=layers, device="cpu")
        return _attribute(att, setup, train_dl, test_dl, {})
    if method == "ekfac":
        # The docstring asks for (mean loss, mask [B, t]), but estimate_covariance (fisher.py)
        # calls .backward() on the whole output: a scalar batch-mean loss is what runs.
        def ekfac_loss(params, data):
            n = data[0].shape[0] if data[0].dim() == 2 else 1
            return functional_action_loss(model)(params, data) / n

        att = IFAttributorEKFAC(
            task=_vmap_task(model, ekfac_loss),
            module_name=list(setup.modules),
            device="cpu",
            damping=1e-3,
        )
        return _attribute(att, setup, train_dl, test_dl, {"damping": 1e-3})
    if method == "logra":
        return _logra(setup, model, workdir)
    raise ValueError(f"unknown dattri method {method!r}")


def _logra(setup: PeerSetup, model, workdir) -> MethodResult:
    """LoGra: hooks, factorized normal projection (sqrt(per-module dim) per side), eFIM."""
    from dattri.algorithm import LoGraAttributor
    from dattri.task import AttributionTask
    from peer_common import DictDataset

    k = max(2, int((setup.proj_dim // len(setup.modules)) ** 0.5))

    def hook_loss(model_, batch, device):  # LoGra calls loss_func(model, batch, device)
        return summed_action_loss(model_, batch["input_ids"], batch["action_mask"])

    task = AttributionTask(loss_func=hook_loss, model=model, checkpoints=model.state_dict())
    att = LoGraAttributor(
        task=task,
        layer_names=list(setup.modules),
        hessian="eFIM",
        damping=1e-3,
        device="cpu",
        proj_dim=k * k,
        offload="cpu",
    )

    def labels_only(items):  # test side runs model(**batch).loss: only model kwargs allowed
        ids = torch.stack([it["input_ids"] for it in items])
        return {"input_ids": ids, "labels": torch.stack([it["labels"] for it in items])}

    train_dl = loader(DictDataset(setup.train), setup.batch_size)
    # batch size 1 on the query side so HF's token-mean loss == the item's mean action loss
    test_dl = loader(DictDataset(setup.query), 1, collate=labels_only)
    return _attribute(att, setup, train_dl, test_dl, {"per_module_dim": k * k})


__all__ = ["lds", "run"]
