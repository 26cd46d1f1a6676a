"""Input checks shared by the metrics: every failure is a ``ValueError`` naming the problem."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

BINNINGS = ("width", "mass")
NORMS = ("l1", "l2", "max")
PROB_SUM_TOL = 1e-4


def as_confidence(confidence: ArrayLike, name: str = "confidence") -> np.ndarray:
    """1-D float array of finite values in [0, 1]; rejects empty input."""
    c = np.asarray(confidence, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {c.shape}")
    if c.size == 0:
        raise ValueError(f"{name} is empty: need at least one item")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if c.min() < 0.0 or c.max() > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1], got values from {c.min():.6g} to {c.max():.6g}"
        )
    return c


def as_correct(correct: ArrayLike, n: int, name: str = "correct") -> np.ndarray:
    """1-D float array of 0/1 outcomes with length ``n``."""
    y = np.asarray(correct)
    if y.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"length mismatch: {n} confidences but {y.shape[0]} {name} values")
    y = y.astype(np.float64)
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if not np.all((y == 0.0) | (y == 1.0)):
        raise ValueError(f"{name} must hold only 0/1 (or False/True) values")
    return y


def check_bins(n_bins: int, binning: str) -> None:
    if isinstance(n_bins, bool) or int(n_bins) != n_bins:
        raise ValueError(f"n_bins must be an integer, got {n_bins!r}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if binning not in BINNINGS:
        raise ValueError(f"unknown binning {binning!r}: choose one of {', '.join(BINNINGS)}")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")


def as_labels(labels: ArrayLike, n: int, n_choices: np.ndarray | int) -> np.ndarray:
    """1-D int array of gold indices, each inside its item's choices."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"length mismatch: {n} items but {y.shape[0]} labels")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        yf = y.astype(np.float64)
        if not np.all(np.isfinite(yf)) or not np.all(yf == np.round(yf)):
            raise ValueError("labels must be integer class indices")
        y = yf
    y = y.astype(np.int64)
    limit = np.broadcast_to(np.asarray(n_choices), y.shape)
    bad = np.flatnonzero((y < 0) | (y >= limit))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"label out of range at item {i}: label {int(y[i])} but the item has "
            f"{int(limit[i])} choices"
        )
    return y


def as_probs(probs: ArrayLike | Sequence[Sequence[float]]) -> np.ndarray:
    """2-D array of probability rows (padding entries are 0), rows summing to 1 within 1e-4.

    Ragged per-item lists are padded with zeros on the right.
    """
    p = pad_ragged(probs, fill=0.0, name="probs")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probs must lie in [0, 1]")
    sums = p.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > PROB_SUM_TOL)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"probability rows must sum to 1 (tolerance {PROB_SUM_TOL:g}): row {i} sums to "
            f"{sums[i]:.6g} ({bad.size} bad rows)"
        )
    return p


def pad_ragged(rows: ArrayLike | Sequence[Sequence[float]], fill: float, name: str) -> np.ndarray:
    """Turn per-item sequences (possibly of different lengths) into a 2-D float array.

    A 2-D array passes through unchanged; shorter rows are right-padded with ``fill``.
    """
    return pad_ragged_with_lengths(rows, fill, name)[0]


def _is_array(rows: object) -> bool:
    """A numeric array (numpy, or anything with ``ndim`` such as a torch tensor), as opposed
    to a sequence of per-item rows (a list or tuple, or a numpy object array of rows)."""
    if isinstance(rows, np.ndarray):
        return rows.dtype != object
    return not isinstance(rows, list | tuple) and hasattr(rows, "ndim") and hasattr(rows, "shape")


def pad_ragged_with_lengths(
    rows: ArrayLike | Sequence[Sequence[float]], fill: float, name: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`pad_ragged` plus each row's own length: an int array for per-item sequences
    (their ``len``, whatever they hold), None for a 2-D array (its rows carry no length of
    their own beyond the width; the caller decides what padding is)."""
    if _is_array(rows):
        try:
            a = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must contain only numbers") from None
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D (items x choices), got shape {a.shape}")
        if a.shape[0] == 0:
            raise ValueError(f"{name} is empty: need at least one item")
        if a.shape[1] == 0:
            raise ValueError(f"{name} has zero choices per item")
        return a, None
    rows = list(rows)
    if not rows:
        raise ValueError(f"{name} is empty: need at least one item")
    lengths = np.empty(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        try:
            lengths[i] = len(r)
        except TypeError:
            raise ValueError(f"{name}[{i}] must be a sequence of numbers, got {r!r}") from None
    width = int(lengths.max())
    if lengths.min() == 0:
        raise ValueError(f"{name}[{int(np.argmin(lengths))}] has no choices")
    if lengths.min() == width:
        try:
            return np.asarray(rows, dtype=np.float64).reshape(len(rows), width), lengths
        except (TypeError, ValueError):
            raise ValueError(f"{name} must contain only numbers") from None
    out = np.full((len(rows), width), fill, dtype=np.float64)
    for i, r in enumerate(rows):
        try:
            out[i, : lengths[i]] = np.asarray(r, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}] must contain only numbers") from None
    return out, lengths
