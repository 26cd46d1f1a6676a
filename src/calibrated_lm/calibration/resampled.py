"""Binned sums for many bootstrap resamples at once.

A resample is a row of item multiplicities W[b, i] (how often item i was drawn). Any sum over
the resampled items is then W @ x, so all draws of a metric come from a few matrix products
instead of a Python loop. Equal-width bins are ``binning.bin_indices``'s, which do not depend
on the draw. Equal-mass bins do: items are sorted once by confidence (the same stable sort as
``binning.bin_indices``) and each draw's N_b copies are cut as ``numpy.array_split`` cuts N_b
items, at ranks ``g * (N_b // n_bins) + min(g, N_b % n_bins)`` (``binning.mass_bounds``).
Copies of one item may straddle a cut, as ties do in ``binning.bin_indices``; a draw that
takes every item once gets exactly ``binning.bin_indices``'s groups.
"""

from __future__ import annotations

import numpy as np

from calibrated_lm.calibration.binning import bin_indices, mass_bounds


def multiplicities(indices: np.ndarray, n: int) -> np.ndarray:
    """(B, n) counts of each item in each row of resampled ``indices`` (B, n_draw)."""
    rows = indices.shape[0]
    flat = (indices + (np.arange(rows, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def weighted_bin_sums(
    key: np.ndarray, values: np.ndarray, weights: np.ndarray, n_bins: int, binning: str
) -> np.ndarray:
    """(B, n_bins, V) sums of ``values`` (n, V) over each draw's bins of ``key`` (n,).

    Include a column of ones in ``values`` to get the bin counts. Items with weight 0 (not
    drawn, or masked out) take no part, also not in the equal-mass cuts. Equal-mass cuts
    count copies, so there the weights must be whole numbers (multiplicities).
    """
    n, v = values.shape
    if binning == "width":
        idx = bin_indices(key, n_bins, "width")
        # Columns grouped by bin: each bin's sums are one small product over a contiguous
        # slice (n x V work per draw instead of n x n_bins x V for a one-hot product).
        order = np.argsort(idx, kind="stable")
        ws = weights[:, order]
        vs = values[order]
        bounds = np.searchsorted(idx[order], np.arange(n_bins + 1))
        out = np.zeros((weights.shape[0], n_bins, v))
        for b in range(n_bins):
            lo, hi = bounds[b], bounds[b + 1]
            if hi > lo:
                out[:, b, :] = ws[:, lo:hi] @ vs[lo:hi]
        return out
    if not np.array_equal(weights, np.rint(weights)):
        raise ValueError("equal-mass bins need whole-number weights (item multiplicities)")
    order = np.argsort(key, kind="stable")
    ws = weights[:, order]
    vs = values[order]
    rows = weights.shape[0]
    copies = np.cumsum(ws, axis=1)  # (B, n): copies among the first j+1 sorted items
    total = copies[:, -1]
    # The array_split cuts of each draw's own copies (exact: sums of whole numbers).
    cut_ranks = mass_bounds(np.rint(total).astype(np.int64), n_bins).astype(np.float64)
    # Items entirely below each cut: one searchsorted over all rows, each row shifted into
    # its own range so the flattened cumulative counts stay sorted.
    shift = (np.arange(rows) * (float(total.max()) + 1.0))[:, None]
    full = np.searchsorted((copies + shift).ravel(), (cut_ranks + shift).ravel(), side="right")
    full = full.reshape(rows, n_bins + 1) - (np.arange(rows) * n)[:, None]
    copies0 = np.concatenate([np.zeros((rows, 1)), copies], axis=1)
    partial = cut_ranks - np.take_along_axis(copies0, full, axis=1)  # copies of the next item
    nxt = np.minimum(full, n - 1)
    cuts = np.empty((rows, n_bins + 1, v))
    for j in range(v):
        prefix = np.zeros((rows, n + 1))
        np.cumsum(ws * vs[:, j], axis=1, out=prefix[:, 1:])
        cuts[:, :, j] = np.take_along_axis(prefix, full, axis=1) + partial * vs[nxt, j]
    return np.diff(cuts, axis=1)


def errors_from_sums(sums: np.ndarray) -> dict[str, np.ndarray]:
    """ECE, RMS-CE and MCE per draw from (B, n_bins, 3) [count, confidence, correct] sums."""
    cnt, cs, ys = sums[..., 0], sums[..., 1], sums[..., 2]
    nonempty = cnt > 0
    safe = np.where(nonempty, cnt, 1.0)
    gap = np.where(nonempty, np.abs(ys - cs) / safe, 0.0)
    total = cnt.sum(axis=1, keepdims=True)
    # A draw without items (a choice position nobody drew) gets weight 0, not 0/0.
    w = cnt / np.where(total > 0, total, 1.0)
    return {
        "ece": (w * gap).sum(axis=1),
        "rms_ce": np.sqrt((w * gap * gap).sum(axis=1)),
        "mce": np.where(nonempty, gap, -np.inf).max(axis=1),
    }
