"""Bootstrap confidence intervals by resampling items with replacement (Efron 1979).

Every draw resamples n item indices uniformly with replacement; a statistic is recomputed on
each draw and the interval is the (alpha/2, 1 - alpha/2) percentile of the draws.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_indices(n: int, draws: int, seed: int = 0) -> np.ndarray:
    """(draws, n) item indices, seeded: the same (n, draws, seed) gives the same draws."""
    if n < 1:
        raise ValueError("cannot bootstrap an empty sample")
    if draws < 1:
        raise ValueError(f"bootstrap draws must be at least 1, got {draws}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(draws, n), dtype=np.int64)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    """[lo, hi] percentile interval of bootstrap values (NaN draws ignored)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return [float("nan"), float("nan")]
    alpha = 1.0 - level
    # Infinite draws (an NLL with a zero-probability gold answer) would make the linear
    # interpolation inf - inf = NaN; clamp them to the largest float and map back.
    big = np.finfo(np.float64).max
    q = np.quantile(np.clip(v, -big, big), [alpha / 2.0, 1.0 - alpha / 2.0])
    q = np.where(q >= big, np.inf, np.where(q <= -big, -np.inf, q))
    return [float(q[0]), float(q[1])]


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> list[float]:
    """Percentile interval of ``statistic(indices)`` over seeded resamples of ``range(n)``."""
    idx = bootstrap_indices(n, draws, seed)
    return percentile_interval(np.array([statistic(row) for row in idx]), level)
