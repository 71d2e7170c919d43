"""The loss split: one backward per step slot, all sharing one forward.

A step's loss-split feature is the gradient of the step's own loss
    L_s = sum_{t in step s} w_t nll_t      (w_t: the item's token weights, 1/n_action if "mean")
so a tracked layer needs g^(s)_t = dL_s/dy_t at every position t. The forward (and the
projected inputs x~_t it leaves in the hooks) is the same for every step, so we run it once and
then one backward per step slot over the retained graph, each with the step's own cotangent.

The output head is shared work: the logits at position p depend on the final hidden state h_p
alone, so dL_s/dh_p is dL/dh_p where position p predicts a token of step s and 0 elsewhere. One
backward through the head gives dL/dh for all steps; each step then backpropagates the masked
dL/dh from h instead of from the logits, skipping S - 1 head backwards ([B, T, V] each).

Cost: forward + head backward + S body backwards (position split: one of each), about 4x the
position split and 3.7x a training step on CPU for 8 steps of 512 tokens (extract_speed.py,
~10M Llama, 1 thread). Alternatives measured in the same run: replicating each item once per
step, truncated after the step's last action token (causality), was 5.4x the position split
(summed prefix lengths are 4.2x the tokens, each with its own forward and head); the same
loop backpropagating from the loss instead of the head input was 5.0x. `is_grads_batched`
cannot be used: its vmap cannot write the hooks' projections out of the batched backward.

An action token outside every step (not produced by tokenize) counts towards the step that
owns the position predicting it (the previous step), as in the position split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trajinf.gradients.modules import TrackedModule


@dataclass
class HeadInput:
    """The input of the output head seen in one forward (None if it cannot be used)."""

    hidden: torch.Tensor | None = None
    calls: int = 0


@contextmanager
def capture_head_input(
    model: torch.nn.Module, tracked: Sequence[TrackedModule], *, active: bool = True
) -> Iterator[HeadInput]:
    """Record the output head's input h [B, T, H] during the forward inside the block.

    Yields an empty HeadInput (so the caller backpropagates from the loss) when not `active`,
    when the model has no output-embeddings module, or when the head itself is tracked: its
    per-step output gradients must then come from per-step backwards through it.
    """
    seen = HeadInput()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (
        not active
        or not isinstance(head, torch.nn.Module)
        or any(t.module is head for t in tracked)
    ):
        yield seen
        return

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen.calls += 1
        seen.hidden = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None

    handle = head.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def per_step_backward(
    nll: torch.Tensor,
    token_weight: torch.Tensor,
    position_slot: torch.Tensor,
    embeds: torch.Tensor,
    head: HeadInput,
    n_slots: int,
    on_slot: Callable[[int], None],
) -> None:
    """Backpropagate each step slot's own loss to `embeds`, one slot at a time.

    nll, token_weight: float32 [B, T] (nll[:, t] is token t's loss, computed at position t-1);
    position_slot: int64 [B, T], the slot whose tokens position p predicts (-1 on padding);
    embeds: [B, T, H], the leaf the backwards stop at. `on_slot(s)` is called before slot s's
    backward so the hooks know where its gradients go. Rows with fewer slots get zero
    cotangents for the slots they lack.
    """
    b, t = nll.shape
    hidden = head.hidden
    usable = (
        head.calls == 1
        and hidden is not None
        and hidden.requires_grad
        and hidden.shape[:2] == (b, t)
    )
    if usable:
        total = (nll * token_weight).sum()
        (d_hidden,) = torch.autograd.grad(total, [hidden], retain_graph=True)
        root = hidden

        def cotangent(s: int) -> torch.Tensor:
            return d_hidden * (position_slot == s).unsqueeze(-1).to(d_hidden.dtype)
    else:  # token t's loss belongs to the slot of the position that predicts it (t - 1)
        token_slot = F.pad(position_slot[:, :-1], (1, 0), value=-1)
        root = nll

        def cotangent(s: int) -> torch.Tensor:
            return token_weight * (token_slot == s)

    for s in range(n_slots):
        on_slot(s)
        torch.autograd.grad(root, [embeds], grad_outputs=cotangent(s), retain_graph=s < n_slots - 1)
