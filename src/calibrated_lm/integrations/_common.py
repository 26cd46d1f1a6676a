"""What both trainer integrations share: the tested version ranges and the eps resolution."""

from __future__ import annotations

import math
import os
from importlib import metadata

from torch import nn

from calibrated_lm.errors import UserError
from calibrated_lm.models.patching import PatchConfig, patch_config, patch_model

# The versions the integration tests ran on, as [low, high): trl 1.16.0; transformers 5.11.0 and
# 5.24.0. A trainer's private internals (TRL's compute_loss and metrics, Trainer's label
# smoother) change between minor releases, so a version outside this range is refused rather
# than trusted to keep the loss right. Before 5.11, Trainer counted num_items_in_batch over the
# unshifted labels (one token per sequence too many), so its losses are not token means.
TESTED_VERSIONS: dict[str, tuple[str, str]] = {
    "trl": ("1.16.0", "1.17"),
    "transformers": ("5.11.0", "6"),
}
# Set to 1 to run an integration on versions outside TESTED_VERSIONS anyway.
ALLOW_UNTESTED_ENV = "CALIBRATED_LM_ALLOW_UNTESTED"


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None (tests monkeypatch this)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_tested_versions(integration: str, *dists: str) -> None:
    """Raise ``UserError`` unless each of ``dists`` is installed within ``TESTED_VERSIONS``.

    ``CALIBRATED_LM_ALLOW_UNTESTED=1`` skips the range check (not the presence check).
    """
    from packaging.version import Version

    for dist in dists:
        low, high = TESTED_VERSIONS[dist]
        spec = f"{dist}>={low},<{high}"
        found = installed_version(dist)
        if found is None:
            raise UserError(f"{integration} needs {dist}: pip install '{spec}'.")
        if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
            continue
        # base_version: a pre-release of the excluded upper bound (1.17.0rc1) is outside too.
        version = Version(Version(found).base_version)
        if not Version(low) <= version < Version(high):
            raise UserError(
                f"{integration} is tested with {spec}, but {dist} {found} is installed: "
                f"pip install '{spec}' (or set {ALLOW_UNTESTED_ENV}=1 to run it untested)."
            )


def resolve_label_smoothing(
    model: nn.Module | None, factor: float, trainer: str, args_class: str, *, apply: bool
) -> PatchConfig | None:
    """Reconcile the patch on ``model`` with the trainer's ``label_smoothing_factor``.

    * patched, factor 0: the patch's settings apply;
    * patched, factor equal to the patch's eps: the same, the factor is only a record;
    * patched, another factor: ``UserError`` (which eps the run trains with would be a guess);
    * unpatched, factor > 0: ``patch_model(model, label_smoothing=factor)`` when ``apply``;
    * unpatched, factor 0: ``UserError`` (the trainer would train on plain cross-entropy).

    ``apply=False`` only checks (before the trainer builds its datasets; the model may still
    be wrapped by the trainer). Returns the patch settings in force, or None when unpatched and
    ``apply`` is False.
    """
    factor = float(factor or 0.0)
    if model is None:
        return None
    cfg = patch_config(model)
    if cfg is None:
        if factor <= 0:
            raise UserError(
                f"{trainer} trains a model patched by calibrated_lm.patch_model and this one is "
                f"not patched: call patch_model(model, label_smoothing=0.1) first, or set "
                f"label_smoothing_factor in the {args_class} to the eps to train with."
            )
        if not apply:
            return None
        patch_model(model, label_smoothing=factor)
        return patch_config(model)
    if factor > 0 and not math.isclose(factor, cfg.label_smoothing, rel_tol=0.0, abs_tol=1e-12):
        raise UserError(
            f"{args_class}(label_smoothing_factor={factor}) conflicts with patch_model("
            f"label_smoothing={cfg.label_smoothing}) on this model: leave label_smoothing_factor "
            f"at 0 to train with the patch's {cfg.label_smoothing}, or patch with "
            f"label_smoothing={factor}."
        )
    return cfg
