"""calibrated-lm: confidence calibration for fine-tuned language models.

Heavy pieces (torch, transformers) are imported lazily so that
``import calibrated_lm`` and the metrics command stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access.
_LAZY = {
    "linear_cross_entropy": "calibrated_lm.loss",
    "patch_model": "calibrated_lm.models",
    "unpatch_model": "calibrated_lm.models",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'calibrated_lm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["__version__", *_LAZY]
