"""Models: resolving a MODEL argument (``loading``) and fused-loss patching (``patching``)."""

from __future__ import annotations

from typing import Any

from calibrated_lm.models.patching import patch_config, patch_model, unpatch_model


def __getattr__(name: str) -> Any:
    # loading pulls in gguf/transformers machinery: import it only when asked for.
    if name == "load_model":
        from calibrated_lm.models.loading import load_model

        return load_model
    raise AttributeError(f"module 'calibrated_lm.models' has no attribute {name!r}")


__all__ = ["load_model", "patch_config", "patch_model", "unpatch_model"]
