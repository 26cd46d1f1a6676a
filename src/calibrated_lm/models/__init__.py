"""Models: resolving a MODEL argument (``loading``), fused-loss patching (``patching``) and
the attention backends safe for training (``attention``).

Both submodules pull in torch/transformers, so names are resolved on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_model": "calibrated_lm.models.loading",
    "patch_model": "calibrated_lm.models.patching",
    "unpatch_model": "calibrated_lm.models.patching",
    "patch_config": "calibrated_lm.models.patching",
    "training_attention": "calibrated_lm.models.attention",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'calibrated_lm.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = list(_LAZY)
