"""Assigning confidences to bins, and the per-bin table every binned metric is built on.

Equal-width bins. With edges ``e = numpy.linspace(0, 1, B + 1)`` (the floats themselves, not
the real numbers k/B), bin k holds the confidences with ``e[k] <= c < e[k + 1]``: bins are
closed on the left, and the last one is also closed on the right, so 0.0 is in the first bin
and 1.0 in the last. Membership is decided by comparing c with those floats
(``numpy.searchsorted(e, c, side="right") - 1``), which is exact; ``floor(c * B)`` is not,
because the product rounds: 0.7 * 10 == 7.000000000000001 put the float 0.7, which lies below
7/10, into [0.7, 0.8).

This is ``numpy.histogram``'s rule on these edges, so it is exactly netcal's (its ``ECE`` and
``MCE`` bin with ``numpy.histogramdd`` on the same linspace edges) and the rule of torchmetrics
(``torch.bucketize(..., right=True)`` on linspace edges; torchmetrics works in float32, though,
and keeps 1.0 in an extra bin of its own). One ulp either side of every edge it also agrees
with the exact comparison with the real numbers k/B, with Kumar et al.'s ``calibration``
package (``numpy.searchsorted`` on upper edges ``i * 1.0 / B``) and, for 10 bins, with
relplot's ``binnedECE`` (``int(c / (1 / B))``, whose quotient rounds too: with 15 bins it puts
0.19999999999999998, 0.39999999999999997 and 0.7999999999999999 one bin too high).

Conventions part only for a confidence exactly equal to an edge float. Here it goes to the bin
above that edge (left-closed, as in netcal, torchmetrics and relplot). Guo et al. (2017) write
right-closed bins ((k-1)/B, k/B], which Kumar's package implements, so that, for example, 0.5
with 10 bins is in bin 5 here and in bin 4 there. An edge float below the real k/B also goes
to bin k (``linspace(0, 1, 16)[1] == 0.06666666666666667 < 1/15``), where comparing with the
real numbers would give bin k - 1.

Equal-mass bins sort the items by confidence (stable, so ties keep their input order) and
cut the sorted order exactly as ``numpy.array_split(order, B)`` does: the first ``n % B``
groups hold ``n // B + 1`` items, the others ``n // B``; with n < B the last B - n groups are
empty. Ties may straddle two groups, which keeps the sizes exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from calibrated_lm.calibration.validation import as_confidence, as_correct, check_bins


def width_edges(n_bins: int) -> np.ndarray:
    """The B + 1 equal-width bin edges, ``numpy.linspace(0, 1, n_bins + 1)``."""
    return np.linspace(0.0, 1.0, n_bins + 1)


def mass_bounds(n: np.ndarray | int, n_bins: int) -> np.ndarray:
    """Where the equal-mass groups of ``n`` sorted items start: ``n.shape + (n_bins + 1,)`` ranks.

    Group g holds the ranks ``bounds[g] <= r < bounds[g + 1]``, the ``numpy.array_split``
    sizes: ``bounds[g] = g * (n // B) + min(g, n % B)``. ``n`` may be an array of counts.
    """
    n = np.asarray(n, dtype=np.int64)[..., None]
    g = np.arange(n_bins + 1, dtype=np.int64)
    return g * (n // n_bins) + np.minimum(g, n % n_bins)


def bin_indices(confidence: np.ndarray, n_bins: int, binning: str = "width") -> np.ndarray:
    """Bin index in ``0..n_bins-1`` of every item (inputs assumed validated; see the module
    docstring for the conventions)."""
    if binning == "width":
        # Bin k is edges[k] <= c < edges[k + 1]; the minimum moves c == 1.0 into the last bin.
        idx = np.searchsorted(width_edges(n_bins), confidence, side="right") - 1
        return np.minimum(idx, n_bins - 1).astype(np.int64)
    n = confidence.shape[0]
    order = np.argsort(confidence, kind="stable")
    # Rank r goes to the group g with bounds[g] <= r < bounds[g + 1] (the last such g, so
    # empty groups, which have equal bounds, are skipped).
    bounds = mass_bounds(n, n_bins)
    groups = np.searchsorted(bounds, np.arange(n, dtype=np.int64), side="right") - 1
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
        edges = width_edges(n_bins)
        lower, upper = edges[:-1], edges[1:]
    else:
        lower = np.full(n_bins, np.nan)
        upper = np.full(n_bins, np.nan)
        np.fmin.at(lower, idx, c)
        np.fmax.at(upper, idx, c)
    return BinTable(lower, upper, count.astype(np.int64), acc, conf, binning)
