"""Binned calibration errors: top-label ECE / RMS-CE / MCE, classwise ECE, debiased ECE.

Notation: items i = 1..n with top-label confidence c_i and outcome y_i (1 if the top choice
is the gold one). Bins b hold n_b items with accuracy acc_b = mean(y_i) and mean confidence
conf_b = mean(c_i); w_b = n_b / n. Empty bins carry no weight.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from calibrated_lm.calibration.binning import bin_sums
from calibrated_lm.calibration.validation import (
    as_confidence,
    as_correct,
    as_labels,
    as_probs,
    check_bins,
    check_norm,
)


def _error_from_sums(
    count: np.ndarray, conf_sum: np.ndarray, acc_sum: np.ndarray, norm: str
) -> float:
    nonempty = count > 0
    n_b = count[nonempty]
    gap = np.abs(acc_sum[nonempty] - conf_sum[nonempty]) / n_b
    w = n_b / n_b.sum()
    if norm == "l1":
        return float(np.dot(w, gap))
    if norm == "l2":
        return float(np.sqrt(np.dot(w, gap * gap)))
    return float(gap.max())


def calibration_error(
    confidence: ArrayLike,
    correct: ArrayLike,
    *,
    n_bins: int = 15,
    binning: str = "width",
    norm: str = "l1",
) -> float:
    """Top-label calibration error of confidences against 0/1 outcomes.

    - ``norm="l1"`` (ECE, Naeini et al. 2015; Guo et al. 2017): sum_b w_b |acc_b - conf_b|
    - ``norm="l2"`` (RMS calibration error): sqrt(sum_b w_b (acc_b - conf_b)^2)
    - ``norm="max"`` (MCE): max over non-empty bins of |acc_b - conf_b|

    ``binning="width"``: n_bins equal-width bins ``e[k] <= c < e[k + 1]`` on the float edges
    ``e = numpy.linspace(0, 1, n_bins + 1)``, closed on the left (0.0 in the first bin) and the
    last one also on the right (1.0 in the last bin). That is the rule of netcal and
    torchmetrics; Guo et al. write right-closed bins, as Kumar et al.'s package computes them,
    which differs only for a confidence exactly equal to an edge (see ``binning``).
    ``binning="mass"``: after a stable sort by confidence, ``numpy.array_split`` groups of the
    sorted order (the first ``n % n_bins`` groups hold one item more).
    """
    c = as_confidence(confidence)
    y = as_correct(correct, c.shape[0])
    check_bins(n_bins, binning)
    check_norm(norm)
    _, count, conf_sum, acc_sum = bin_sums(c, y, n_bins, binning)
    return _error_from_sums(count, conf_sum, acc_sum, norm)


def classwise_calibration_error(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    n_choices: ArrayLike | None = None,
    n_bins: int = 15,
    binning: str = "width",
) -> float:
    """Classwise ECE (Kull et al. 2019; "SCE" in Nixon et al. 2019).

    classwise-ECE = (1/K) sum_k sum_b (n_{k,b} / n_k) |acc_{k,b} - conf_{k,b}|, where for
    class (choice position) k the "confidence" is p_ik, the outcome is 1[label_i = k], bins
    are formed over the n_k items that have a choice k, and K is the number of positions.
    ``n_choices`` (per item) marks right-padding for items with fewer choices; without it every
    column counts for every item.
    """
    p = as_probs(probs)
    n, width = p.shape
    if n_choices is None:
        k_i = np.full(n, width, dtype=np.int64)
    else:
        k_i = np.asarray(n_choices, dtype=np.int64)
        if k_i.shape != (n,):
            raise ValueError(f"length mismatch: {n} probability rows but {k_i.shape[0]} n_choices")
        if k_i.min() < 1 or k_i.max() > width:
            raise ValueError(f"n_choices must be between 1 and {width}")
    y = as_labels(labels, n, k_i)
    check_bins(n_bins, binning)
    errors = []
    for k in range(width):
        has = k_i > k
        if not has.any():
            continue
        ck = p[has, k]
        yk = (y[has] == k).astype(np.float64)
        _, count, conf_sum, acc_sum = bin_sums(ck, yk, n_bins, binning)
        errors.append(_error_from_sums(count, conf_sum, acc_sum, "l1"))
    return float(np.mean(errors))


def expected_abs_normal(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """E|X| for X ~ N(mean, sd^2): sd sqrt(2/pi) exp(-mean^2 / (2 sd^2)) + mean erf(mean / (sd
    sqrt 2)); |mean| where sd = 0."""
    mean = np.asarray(mean, dtype=np.float64)
    sd = np.asarray(sd, dtype=np.float64)
    pos = sd > 0
    safe = np.where(pos, sd, 1.0)
    z = mean / (safe * math.sqrt(2.0))
    erf = np.vectorize(math.erf, otypes=[np.float64])(z) if z.size else z
    value = safe * math.sqrt(2.0 / math.pi) * np.exp(-(z**2)) + mean * erf
    return np.where(pos, value, np.abs(mean))


def debiased_from_bins(count: np.ndarray, conf_sum: np.ndarray, acc_sum: np.ndarray) -> dict:
    """Debiased l1 and l2 errors from per-bin sums; arrays may carry leading batch axes
    (bins on the last axis). See ``debiased_calibration_error`` for the formulas."""
    nonempty = count > 0
    safe = np.where(nonempty, count, 1.0)
    acc = np.where(nonempty, acc_sum / safe, 0.0)
    conf = np.where(nonempty, conf_sum / safe, 0.0)
    w = count / count.sum(axis=-1, keepdims=True)
    two = count >= 2
    var = np.where(two, acc * (1.0 - acc) / np.where(two, count - 1.0, 1.0), 0.0)
    sq = np.where(two, (acc - conf) ** 2 - var, 0.0)
    l2 = np.sqrt(np.maximum((w * sq).sum(axis=-1), 0.0))
    plugin = (w * np.abs(acc - conf)).sum(axis=-1)
    noisy = (w * expected_abs_normal(acc - conf, np.sqrt(acc * (1.0 - acc) / safe))).sum(axis=-1)
    return {"l1": 2.0 * plugin - noisy, "l2": l2}


def debiased_calibration_error(
    confidence: ArrayLike,
    correct: ArrayLike,
    *,
    n_bins: int = 15,
    binning: str = "width",
    norm: str = "l2",
) -> float:
    """Debiased calibration error estimators of Kumar, Liang and Ma (2019), "Verified
    Uncertainty Calibration".

    The plug-in binned error over-estimates the true one because acc_b is noisy. For
    ``norm="l2"`` the squared error is corrected in closed form:

        CE^2 = sum_b w_b [ (acc_b - conf_b)^2 - acc_b (1 - acc_b) / (n_b - 1) ],

    bins with fewer than two items contributing 0, and the result is sqrt(max(CE^2, 0)).
    For ``norm="l1"`` the bias is that of a normal approximation to each bin's accuracy:

        ECE_debiased = 2 * ECE - sum_b w_b E| N(acc_b - conf_b, acc_b (1 - acc_b) / n_b) |,

    where Kumar et al. estimate the expectation by simulation; here it is computed exactly
    (E|N(m, s^2)| = s sqrt(2/pi) exp(-m^2 / 2s^2) + m erf(m / (s sqrt 2))), the limit of
    their estimator for infinitely many simulations, so the result is deterministic.
    """
    c = as_confidence(confidence)
    y = as_correct(correct, c.shape[0])
    check_bins(n_bins, binning)
    if norm not in ("l1", "l2"):
        raise ValueError(f"unknown norm {norm!r} for the debiased estimator: choose l1 or l2")
    _, count, conf_sum, acc_sum = bin_sums(c, y, n_bins, binning)
    return float(debiased_from_bins(count, conf_sum, acc_sum)[norm])
