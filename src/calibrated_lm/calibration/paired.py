"""Paired comparisons of two models on the same questions, with bootstrap intervals.

Both models answered the same n questions. One resample of the question indices is applied to
both, and the statistic is ``metric(B) - metric(A)`` on that resample; the 95% interval is the
percentile interval over ``draws`` resamples (Efron 1979; paired, so the between-question
variance that both models share cancels).

:func:`two_level_bootstrap` adds a level for training seeds (Davison & Hinkley 1997, sec. 3.8):
each draw resamples seeds with replacement, then questions, and averages the paired
differences of the drawn seeds on the drawn questions, so the interval covers seed-to-seed
variation as well as the question sample.

Metrics (:data:`PAIRED_METRICS`), each a mean over questions or a binned statistic:
``accuracy``, ``mean_confidence``, ``ece`` (top-label, ``n_bins`` equal-width bins, L1),
``rms_ce`` (L2), ``brier`` (multiclass, sum over choices of (p_k - 1[k = y])^2) and ``nll``
(-log p_y). Every draw is computed from item multiplicities with matrix products
(``resampled``), not a Python loop over draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calibrated_lm.calibration.bootstrap import bootstrap_indices, percentile_interval
from calibrated_lm.calibration.resampled import (
    errors_from_sums,
    multiplicities,
    weighted_bin_sums,
)

PAIRED_METRICS = ("accuracy", "mean_confidence", "ece", "rms_ce", "brier", "nll")


def _per_item(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-question columns: confidence, correct, Brier and NLL terms (probs padded with 0)."""
    n = probs.shape[0]
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    onehot = np.zeros_like(probs)
    onehot[np.arange(n), labels] = 1.0
    p_gold = probs[np.arange(n), labels]
    with np.errstate(divide="ignore"):
        nll = -np.log(p_gold)
    return {
        "confidence": conf,
        "correct": correct,
        "brier": ((probs - onehot) ** 2).sum(axis=1),
        "nll": nll,
    }


def _metrics_from_weights(
    cols: dict[str, np.ndarray], weights: np.ndarray, n_bins: int
) -> dict[str, np.ndarray]:
    """Every metric for each row of ``weights`` (B, n) item multiplicities (or a single row)."""
    total = weights.sum(axis=1)
    out = {
        "accuracy": weights @ cols["correct"] / total,
        "mean_confidence": weights @ cols["confidence"] / total,
        "brier": weights @ cols["brier"] / total,
        "nll": weights @ cols["nll"] / total,
    }
    values = np.stack([np.ones_like(cols["confidence"]), cols["confidence"], cols["correct"]], 1)
    sums = weighted_bin_sums(cols["confidence"], values, weights, n_bins, "width")
    err = errors_from_sums(sums)
    out["ece"], out["rms_ce"] = err["ece"], err["rms_ce"]
    return out


def _check(probs: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != labels.shape[0]:
        raise ValueError(f"{name}: expected ({labels.shape[0]}, k) probabilities, got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name}: probabilities must be finite and non-negative")
    return p


def paired_bootstrap(
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    labels: np.ndarray,
    *,
    draws: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
    level: float = 0.95,
) -> dict[str, dict[str, float | list[float]]]:
    """``{metric: {"a", "b", "delta", "ci95"}}``, delta = metric(B) - metric(A).

    ``probs_a`` and ``probs_b`` are (n, k) choice probabilities (rows padded with 0 where an
    item has fewer choices) for the same questions in the same order; ``labels`` the gold
    indices.
    """
    y = np.asarray(labels, dtype=np.int64)
    pa, pb = _check(probs_a, y, "probs_a"), _check(probs_b, y, "probs_b")
    n = y.shape[0]
    ca, cb = _per_item(pa, y), _per_item(pb, y)
    one = np.ones((1, n))
    point_a = _metrics_from_weights(ca, one, n_bins)
    point_b = _metrics_from_weights(cb, one, n_bins)
    w = multiplicities(bootstrap_indices(n, draws, seed), n)
    da = _metrics_from_weights(ca, w, n_bins)
    db = _metrics_from_weights(cb, w, n_bins)
    out: dict[str, dict[str, float | list[float]]] = {}
    for m in PAIRED_METRICS:
        a, b = float(point_a[m][0]), float(point_b[m][0])
        out[m] = {
            "a": a,
            "b": b,
            "delta": b - a,
            "ci95": percentile_interval(db[m] - da[m], level),
        }
    return out


def two_level_bootstrap(
    probs_a: Sequence[np.ndarray],
    probs_b: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    draws: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
    level: float = 0.95,
    return_draws: bool = False,
) -> dict[str, dict[str, float | list[float]]]:
    """Paired seed-and-question bootstrap of mean(metric(B_s)) - mean(metric(A_s)).

    ``probs_a[s]`` and ``probs_b[s]`` are the (n, k) probabilities of seed s's two models (A
    and B trained with the same seed; pass the same array for every A when A is one shared
    model, such as a base). Each draw resamples seeds with replacement, then the n questions,
    and averages the per-seed differences on those questions. ``a``/``b`` are the seed means
    on all questions. The seed draws depend only on (``draws``, ``seed``, number of seeds), so
    calls for several tasks with the same arguments resample the same seeds in each draw;
    ``return_draws`` adds each metric's per-draw differences (``"draws"``), e.g. to average
    over tasks draw by draw.
    """
    y = np.asarray(labels, dtype=np.int64)
    if len(probs_a) != len(probs_b) or not probs_a:
        raise ValueError("two_level_bootstrap needs the same number (>= 1) of A and B seeds")
    n, s = y.shape[0], len(probs_a)
    cols_a = [_per_item(_check(p, y, f"probs_a[{i}]"), y) for i, p in enumerate(probs_a)]
    cols_b = [_per_item(_check(p, y, f"probs_b[{i}]"), y) for i, p in enumerate(probs_b)]
    one = np.ones((1, n))
    w = multiplicities(bootstrap_indices(n, draws, seed), n)
    seeds = np.random.default_rng(seed + 1).integers(0, s, size=(draws, s))
    diffs_by_seed = []
    points_a, points_b = [], []
    for ca, cb in zip(cols_a, cols_b):
        ma, mb = _metrics_from_weights(ca, w, n_bins), _metrics_from_weights(cb, w, n_bins)
        diffs_by_seed.append({m: mb[m] - ma[m] for m in PAIRED_METRICS})
        points_a.append(_metrics_from_weights(ca, one, n_bins))
        points_b.append(_metrics_from_weights(cb, one, n_bins))
    out: dict[str, dict[str, float | list[float]]] = {}
    rows = np.arange(draws)[:, None]
    for m in PAIRED_METRICS:
        per = np.stack([d[m] for d in diffs_by_seed], axis=1)  # (draws, seeds)
        drawn = per[rows, seeds].mean(axis=1)
        a = float(np.mean([p[m][0] for p in points_a]))
        b = float(np.mean([p[m][0] for p in points_b]))
        out[m] = {"a": a, "b": b, "delta": b - a, "ci95": percentile_interval(drawn, level)}
        if return_draws:
            out[m]["draws"] = drawn
    return out
