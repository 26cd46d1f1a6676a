"""Temperature scaling (Guo et al. 2017): one scalar T > 0 divides every logit.

fit_temperature minimises the mean NLL  L(T) = -mean_i log softmax(z_i / T)_{y_i}  over T.
L is convex in 1/T, hence unimodal in log T, so a golden-section search on log T within
[1e-2, 1e2] finds the optimum without derivatives or starting points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from calibrated_lm.calibration.scores import log_softmax, padded_scores
from calibrated_lm.calibration.validation import as_labels

LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _nll_at(z: np.ndarray, y: np.ndarray, log_t: float) -> float:
    lp = log_softmax(z / math.exp(log_t))
    return float(-np.mean(lp[np.arange(z.shape[0]), y]))


def fit_temperature(
    logits: ArrayLike | Sequence[Sequence[float]], labels: ArrayLike, *, tol: float = 1e-7
) -> float:
    """NLL-optimal temperature T for ``logits`` (n x C, -inf padding or ragged lists).

    Returns T in [0.01, 100]; the bound is returned when the optimum lies beyond it (e.g. a
    perfectly separated training set wants T -> 0). Identical logits in every item leave the
    NLL flat, and T = 1 is returned. Items whose gold choice scores -inf have NLL +inf at every
    T and say nothing about it: they are left out of the fit (all of them: ValueError).
    """
    z, n_choices = padded_scores(logits, name="logits")
    y = as_labels(labels, z.shape[0], n_choices)
    informative = np.isfinite(z[np.arange(z.shape[0]), y])
    if not informative.any():
        raise ValueError("every item's gold choice scores -inf: no temperature can be fitted")
    z, y = z[informative], y[informative]
    finite = np.isfinite(z)
    centred = np.where(finite, z - z.max(axis=1, keepdims=True), 0.0)
    if not np.any(centred[finite] != 0.0):
        return 1.0
    a, b = LOG_T_BOUNDS
    c = b - _GOLDEN * (b - a)
    d = a + _GOLDEN * (b - a)
    fc, fd = _nll_at(z, y, c), _nll_at(z, y, d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = _nll_at(z, y, c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = _nll_at(z, y, d)
    return float(math.exp(0.5 * (a + b)))


def apply_temperature(
    logits: ArrayLike | Sequence[Sequence[float]], temperature: float
) -> np.ndarray:
    """Scaled logits z / T as a 2-D array (-inf padding preserved; ragged input is padded)."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        t = float("nan")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    z, _ = padded_scores(logits, name="logits")
    return z / t
