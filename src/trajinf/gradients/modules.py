"""Which layers are tracked: Linear / Conv1D in the blocks, or the peft LoRA linears."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch

from torch import nn

from trajinf.errors import TrajinfError

try:  # transformers' GPT-2 style linear: y = x @ W + b with W stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]


@dataclass(frozen=True)
class TrackedModule:
    """A linear layer whose weight gradient is tracked.

    The gradient is always handled in [out, in] orientation (G = sum_t g_t x_t^T);
    `transposed` says the stored weight is [in, out] (Conv1D), so G.T matches it.
    """

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    transposed: bool

    @property
    def param_name(self) -> str:
        """Name of the weight in `model.named_parameters()`."""
        return f"{self.name}.weight"


def _as_tracked(name: str, module: nn.Module) -> TrackedModule | None:
    if isinstance(module, nn.Linear):
        return TrackedModule(name, module, module.in_features, module.out_features, False)
    if Conv1D and isinstance(module, Conv1D):
        w = module.weight
        return TrackedModule(name, module, w.shape[0], w.shape[1], True)
    return None


def _is_lora_linear(name: str) -> bool:
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts


def _in_blocks(model: nn.Module) -> set[str]:
    """Names of modules that live inside an nn.ModuleList (the transformer blocks)."""
    inside: set[str] = set()
    for list_name, container in model.named_modules():
        if isinstance(container, nn.ModuleList):
            prefix = f"{list_name}." if list_name else ""
            inside.update(prefix + n for n, _ in container.named_modules() if n)
    return inside


def tracked_modules(model: nn.Module, patterns: Sequence[str] | None = None) -> list[TrackedModule]:
    """Return the tracked linear layers of `model`, in `named_modules()` order.

    patterns: fnmatch patterns over module names (any match tracks the module). None means:
    the LoRA lora_A / lora_B linears if the model has any, else every Linear/Conv1D inside
    the blocks (an nn.ModuleList), never the output head or embeddings.
    """
    candidates = [t for n, m in model.named_modules() if (t := _as_tracked(n, m)) is not None]
    if patterns is not None:
        chosen = [t for t in candidates if any(fnmatch(t.name, p) for p in patterns)]
        if not chosen:
            raise TrajinfError(
                f"ExtractionConfig field 'modules': patterns {list(patterns)} match no "
                f"Linear/Conv1D module (e.g. {[t.name for t in candidates[:3]]})"
            )
        return chosen
    lora = [t for t in candidates if _is_lora_linear(t.name)]
    if lora:
        return lora
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    blocks = _in_blocks(model)
    chosen = [t for t in candidates if t.name in blocks and t.module is not head]
    if not chosen:  # a model without a ModuleList of blocks: every linear but the head
        chosen = [t for t in candidates if t.module is not head]
    if not chosen:
        raise TrajinfError("model has no Linear/Conv1D module to track")
    return chosen
