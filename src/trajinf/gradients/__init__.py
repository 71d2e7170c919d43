"""Per-item and per-step projected gradient features (docs/contracts.md, gradients/).

Modules: config (ExtractionConfig, ItemFeatures), modules (which layers), hooks (collector),
projection (seeded projections), preconditioners, batching, factorized (fast default),
less (faithful reference), masks (sparse update masks), extract (the entry point).
"""

from trajinf.gradients.config import ExtractionConfig, ItemFeatures
from trajinf.gradients.extract import extract_features, feature_dim
from trajinf.gradients.masks import mask_density, sparse_update_mask
from trajinf.gradients.modules import TrackedModule, tracked_modules

__all__ = [
    "ExtractionConfig",
    "ItemFeatures",
    "TrackedModule",
    "extract_features",
    "feature_dim",
    "mask_density",
    "sparse_update_mask",
    "tracked_modules",
]
