"""Per-item and per-step projected gradient features (docs/contracts.md, gradients/).

Modules: config (ExtractionConfig, ItemFeatures), loss (ActionNLL, AdvantageWeightedNLL),
modules (which layers), hooks (collector), projection (seeded projections), preconditioners,
batching, factorized (fast default), less (faithful reference), masks (sparse update masks),
extract (the entry point).

The names below load their module on first use, so reading a config (the CLI's options) does
not import torch.
"""

from importlib import import_module

_HOME = {
    "ExtractionConfig": "config",
    "ItemFeatures": "config",
    "TrackedModule": "modules",
    "extract_features": "extract",
    "feature_dim": "extract",
    "mask_density": "masks",
    "sparse_update_mask": "masks",
    "tracked_modules": "modules",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(f"trajinf.gradients.{_HOME[name]}"), name)
    raise AttributeError(f"module 'trajinf.gradients' has no attribute {name!r}")
