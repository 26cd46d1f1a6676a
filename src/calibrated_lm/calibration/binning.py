"""Assigning confidences to bins, and the per-bin table every binned metric is built on.

Equal-width bins split [0, 1] into ``n_bins`` intervals ``[k/B, (k+1)/B)``; a confidence of
exactly 1.0 falls into the last bin and 0.0 into the first. Equal-mass bins sort the items by
confidence and cut them into ``n_bins`` consecutive groups whose sizes differ by at most one
(``numpy.array_split`` sizes); ties may straddle two groups, which keeps the sizes equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from calibrated_lm.calibration.validation import as_confidence, as_correct, check_bins


def bin_indices(confidence: np.ndarray, n_bins: int, binning: str = "width") -> np.ndarray:
    """Bin index in ``0..n_bins-1`` of every item (inputs assumed validated)."""
    if binning == "width":
        # floor(c * B) puts c in [k/B, (k+1)/B); clip moves c == 1.0 into the last bin.
        return np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    n = confidence.shape[0]
    order = np.argsort(confidence, kind="stable")
    # Rank r goes to group floor(r * B / n): the array_split sizes, without a Python loop.
    # When n < B some groups stay empty, which is fine: empty bins carry no weight.
    groups = (np.arange(n, dtype=np.int64) * n_bins) // n
    out = np.empty(n, dtype=np.int64)
    out[order] = groups
    return out


@dataclass(frozen=True)
class BinTable:
    """Per-bin statistics. Arrays have one entry per bin; empty bins have count 0 and NaN means.

    ``lower``/``upper`` are the interval for equal-width bins, and the smallest/largest
    confidence inside the bin for equal-mass bins (NaN when empty).
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    binning: str

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def weight(self) -> np.ndarray:
        """n_b / n, the share of items in each bin."""
        return self.count / self.count.sum()

    @property
    def gap(self) -> np.ndarray:
        """confidence - accuracy per bin (positive = over-confident); NaN for empty bins."""
        return self.confidence - self.accuracy

    def rows(self) -> list[dict[str, float | int | None]]:
        """The table as JSON-ready records (NaN -> None)."""

        def f(x: float) -> float | None:
            return None if not np.isfinite(x) else float(x)

        return [
            {
                "lower": f(self.lower[k]),
                "upper": f(self.upper[k]),
                "count": int(self.count[k]),
                "accuracy": f(self.accuracy[k]),
                "confidence": f(self.confidence[k]),
            }
            for k in range(self.count.shape[0])
        ]


def bin_sums(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int, binning: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bin index, count, sum of confidence, sum of correct) per bin; inputs assumed validated."""
    idx = bin_indices(confidence, n_bins, binning)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    return idx, count, conf_sum, acc_sum


def bin_table(
    confidence: ArrayLike, correct: ArrayLike, *, n_bins: int = 15, binning: str = "width"
) -> BinTable:
    """Per-bin (lower, upper, count, accuracy, mean confidence) for top-label confidences."""
    c = as_confidence(confidence)
    y = as_correct(correct, c.shape[0])
    check_bins(n_bins, binning)
    idx, count, conf_sum, acc_sum = bin_sums(c, y, n_bins, binning)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = acc_sum / count
        conf = conf_sum / count
    if binning == "width":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        lower, upper = edges[:-1], edges[1:]
    else:
        lower = np.full(n_bins, np.nan)
        upper = np.full(n_bins, np.nan)
        np.fmin.at(lower, idx, c)
        np.fmax.at(upper, idx, c)
    return BinTable(lower, upper, count.astype(np.int64), acc, conf, binning)
