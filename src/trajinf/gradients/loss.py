"""The training loss whose gradients are the features: a small object with per-token weights,
in the spirit of kronfluence's ``Task`` (the user picks or writes the loss; no string switch).

Every backward in trajinf (factorized and LESS features, K-FAC factors, SFT) is of
``sum_t w_t * nll_t`` over an item's tokens, where ``nll_t`` is the cross-entropy of predicting
token t; a loss object gives the weights ``w`` [T] of one tokenized item.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from trajinf.data.tokenize import TokenizedTrajectory
from trajinf.errors import TrajinfError


@dataclass(frozen=True)
class ActionNLL:
    """Action-only NLL with per-step weights (the default): token t weighs
    ``action_mask[t] * weights[t]`` (``weights`` from the messages' ``"weight"`` field, 1
    without one), divided by the item's number of action tokens with ``normalization="mean"``
    (LESS: a long trajectory does not outweigh a short one) and not with ``"sum"``."""

    normalization: Literal["mean", "sum"] = "mean"

    def token_weights(self, item: TokenizedTrajectory) -> np.ndarray:
        """float32 [T]: the loss weight of predicting each token of ``item``."""
        action = np.asarray(item.action_mask, dtype=bool)
        weight = action.astype(np.float32)
        if item.weights is not None:
            weight = weight * np.asarray(item.weights, dtype=np.float32)
        n_action = int(action.sum())
        if self.normalization == "mean" and n_action > 0:
            weight = weight / np.float32(n_action)
        return weight


@dataclass(frozen=True)
class AdvantageWeightedNLL(ActionNLL):
    """:class:`ActionNLL` scaled per trajectory by its advantage ``A_i`` (e.g. the reward
    normalized within its rollout group): the gradient of ``sum_i A_i * NLL_i``, the direction a
    REINFORCE / GRPO step moves the policy. ``advantages``: trajectory id -> A_i; an item
    without one raises."""

    advantages: Mapping[str, float] = field(default_factory=dict)

    def token_weights(self, item: TokenizedTrajectory) -> np.ndarray:
        if item.id not in self.advantages:
            raise TrajinfError(f"AdvantageWeightedNLL: no advantage for trajectory '{item.id}'")
        return super().token_weights(item) * np.float32(self.advantages[item.id])
