"""Scoring-time logit transforms: a softcap C and a temperature T (issue 12, claim 3's remedies).

A model trained with a training temperature T or a logit softcap C (``calibrated-lm train
--temperature T / --softcap C``) saves plain weights; its training loss saw ``cap_C(z) / T``.
Claim 3 scores each such model twice, "as saved" and "with the training T / C applied". With
``--logit-softcap C`` and/or ``--logit-temperature T`` every continuation token is scored as

    log p(t | .) = log_softmax( cap_C(z) / T )_t,    cap_C(z) = C tanh(z / C),

over the same columns as without them (the head subset's kept tokens when there is one, so the
transform acts after the restriction). Order: the cap first, then the temperature, the order
of the training loss (``calibrated_lm.models.patching``). ``z`` is the logits as the model
computes them: a model whose config carries its own ``final_logit_softcapping`` (Gemma 2/3)
has already capped them, and ``--logit-softcap`` caps them again on top (whereas
``train --softcap`` replaces the model's cap in the loss). A logit of -inf (a token masked
out) stays -inf: ``C tanh(-inf / C)`` would be -C, giving the masked token probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from calibrated_lm.errors import UserError


@dataclass(frozen=True)
class LogitTransform:
    """``softcap`` C and ``temperature`` T (None: not applied); both > 0 and finite."""

    softcap: float | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        check_positive("--logit-softcap", self.softcap)
        check_positive("--logit-temperature", self.temperature)

    @property
    def is_identity(self) -> bool:
        return self.softcap is None and self.temperature is None

    def apply(self, logits: Any) -> Any:
        """``cap_C(z) / T`` of a float tensor (module docstring); -inf entries stay -inf."""
        import torch

        z = logits
        if self.softcap is not None:
            c = self.softcap
            capped = c * torch.tanh(z / c)
            z = torch.where(torch.isneginf(z), z, capped)
        if self.temperature is not None:
            z = z / self.temperature  # -inf / T = -inf
        return z

    def key(self) -> dict[str, float]:
        """The protocol key's entries (absent when not applied, as in older folders)."""
        out: dict[str, float] = {}
        if self.softcap is not None:
            out["logit_softcap"] = float(self.softcap)
        if self.temperature is not None:
            out["logit_temperature"] = float(self.temperature)
        return out

    def describe(self) -> str:
        """One phrase for the protocol's ``scoring`` line and the report ('' when none)."""
        if self.is_identity:
            return ""
        steps = []
        if self.softcap is not None:
            steps.append(f"z -> {self.softcap:g} tanh(z / {self.softcap:g})")
        if self.temperature is not None:
            steps.append(f"z -> z / {self.temperature:g}")
        return "logits transformed before the log-softmax: " + ", then ".join(steps)


def check_positive(flag: str, value: Any) -> None:
    """:class:`UserError` unless ``value`` is None or a finite real number > 0."""
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not value > 0:
        raise UserError(f"{flag} must be a finite number above 0 (or be left out), not {value!r}")


def from_key(key: dict[str, Any]) -> LogitTransform:
    """The transform a run.json or summary protocol records (none without its entries)."""
    return LogitTransform(key.get("logit_softcap"), key.get("logit_temperature"))


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Differences of the transform between a stored run.json and a new key. Always compared
    (a key without an entry means not applied): scores under another transform differ."""
    changes = []
    for k in ("logit_softcap", "logit_temperature"):
        if old.get(k) != new.get(k):
            shown = ["none" if v is None else f"{v:g}" for v in (old.get(k), new.get(k))]
            changes.append(f"{k}: {shown[0]} -> {shown[1]}")
    return changes
