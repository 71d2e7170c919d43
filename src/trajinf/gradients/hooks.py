"""Hooks behind a context manager: capture layer inputs x_t and output gradients g_t.

Nothing stays attached after the `with` block, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from trajinf.errors import TrajinfError
from trajinf.gradients.modules import TrackedModule

ForwardFn = Callable[[TrackedModule, torch.Tensor], None]
BackwardFn = Callable[[TrackedModule, torch.Tensor], None]


class ActivationGradientCollector:
    """Forward hooks hand each tracked layer's input x [B, T, in] to `on_input`; a tensor hook
    on the layer's output hands dL/dy [B, T, out] to `on_output_grad` during backward.

    A tensor hook on the output (instead of a module backward hook) lets the caller run
    `torch.autograd.grad(loss, [inputs_embeds])`: autograd then never computes weight
    gradients, which is most of the saving over a training step.
    """

    def __init__(
        self,
        modules: Sequence[TrackedModule],
        on_input: ForwardFn,
        on_output_grad: BackwardFn,
    ) -> None:
        self.modules = list(modules)
        self.on_input = on_input
        self.on_output_grad = on_output_grad
        self._handles: list[RemovableHandle] = []
        self._seen: set[str] = set()

    def _forward_hook(self, tracked: TrackedModule) -> Callable:
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if tracked.name in self._seen:
                # a module applied twice per forward would need per-call bookkeeping
                raise TrajinfError(
                    f"tracked module {tracked.name!r} ran twice in one forward; exclude it "
                    "with ExtractionConfig.modules"
                )
            self._seen.add(tracked.name)
            self.on_input(tracked, inputs[0])
            if output.requires_grad:
                output.register_hook(lambda g: self.on_output_grad(tracked, g))

        return hook

    def new_forward(self) -> None:
        """Call before each forward pass."""
        self._seen.clear()

    def __enter__(self) -> ActivationGradientCollector:
        try:
            for tracked in self.modules:
                handle = tracked.module.register_forward_hook(self._forward_hook(tracked))
                self._handles.append(handle)
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self._remove()
