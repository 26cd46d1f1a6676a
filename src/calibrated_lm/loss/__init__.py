"""Fused linear cross-entropy with label smoothing that never materialises the logits.

``linear_cross_entropy(hidden, weight, targets, ...)`` equals
``F.cross_entropy(hidden @ weight.T + bias, targets, label_smoothing=eps)`` (plus optional
softcap and z-loss) while keeping only one bounded logit block in memory.
"""

from calibrated_lm.loss.api import linear_cross_entropy
from calibrated_lm.loss.reference import reference_linear_cross_entropy
from calibrated_lm.loss.stats import LinearCrossEntropyStats

__all__ = ["LinearCrossEntropyStats", "linear_cross_entropy", "reference_linear_cross_entropy"]
