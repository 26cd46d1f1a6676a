"""Registered metrics on many bootstrap resamples at once: the one bootstrap of every summary.

:func:`metric_draws` takes metrics of the registry (:mod:`calibrated_lm.calibration.registry`),
the items (:class:`~calibrated_lm.calibration.items.ItemArrays`) and resamples ``idx`` (B, n)
of item indices, and returns each metric's value on each resample, i.e. ``metric.point(
items.take(idx[b]), n_bins, binning)`` for every b. The built-in metrics get there through
shared weighted sums (a resample is a row of item multiplicities, so every sum over it is a
matrix product; :mod:`calibrated_lm.calibration.resampled`) and smooth ECE through its
resampled fixed point; any other metric, or a built-in whose registration was replaced, is
recomputed draw by draw through its own point function. So a metric added to the registry is
bootstrapped wherever the built-ins are (``summarize``, ``compare``'s paired differences, the
lm-eval plugin's standard errors) without other edits.

:func:`index_chunks` yields the resamples of :func:`~calibrated_lm.calibration.bootstrap.
bootstrap_indices` a chunk at a time (the same indices), so that (draws x items) arrays stay a
few million entries; inside :func:`draws_bar` each chunk advances a progress bar, since one
task's draws can take minutes (20,000 draws of a large task).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from calibrated_lm.calibration.items import ItemArrays
from calibrated_lm.calibration.metrics import debiased_from_bins
from calibrated_lm.calibration.registry import BUILTIN, Metric
from calibrated_lm.calibration.registry import get as registered
from calibrated_lm.calibration.resampled import (
    errors_from_sums,
    multiplicities,
    weighted_bin_sums,
)
from calibrated_lm.calibration.smooth import smooth_ece_resampled

# The point functions the vectorised path stands in for (taken at import, before any
# registration could replace one).
_BUILTIN_POINTS = {name: registered(name).point for name in BUILTIN}
_MEANS = ("accuracy", "mean_confidence", "brier", "top_label_brier", "nll", "overconfidence")
_BINNED = ("ece", "rms_ce", "mce", "debiased_ece", "debiased_rms_ce")


def has_fast_path(metric: Metric) -> bool:
    """Whether ``metric`` is a built-in still registered with its own point function (then
    its draws come from the shared sums, else from its point function draw by draw)."""
    return _BUILTIN_POINTS.get(metric.name) is metric.point


# Where index_chunks reports the rows it has handed out (None: nowhere). A context variable,
# not an argument, so that summarize, the paired bootstraps and the registry's metrics need no
# progress parameter threaded through them.
_ON_DRAWS: ContextVar[Callable[[int], None] | None] = ContextVar("_ON_DRAWS", default=None)


@contextmanager
def draws_bar(total: int, desc: str, enabled: bool = True) -> Iterator[None]:
    """Count on a tqdm bar (``total`` draws, removed when done) the bootstrap draws that
    :func:`index_chunks` hands out inside the block; ``enabled`` False or ``total`` 0 shows
    nothing. A chunk is counted once its consumer asks for the next one, i.e. when its draws
    have been computed."""
    if not enabled or total <= 0:
        yield
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="draw", leave=False) as bar:
        token = _ON_DRAWS.set(bar.update)
        try:
            yield
        finally:
            _ON_DRAWS.reset(token)


def index_chunks(n: int, draws: int, seed: int, width: int = 1) -> Iterator[np.ndarray]:
    """The rows of ``bootstrap_indices(n, draws, seed)``, in chunks of at most about
    4,000,000 / (n * max(1, width // 2)) rows (``width``: the number of choices, which the
    classwise sums multiply by). Consecutive draws from one generator give the same indices
    as a single call."""
    if n < 1:
        raise ValueError("cannot bootstrap an empty sample")
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // (n * max(1, width // 2)))
    on_draws = _ON_DRAWS.get()
    for start in range(0, int(draws), chunk):
        rows = min(chunk, int(draws) - start)
        yield rng.integers(0, n, size=(rows, n), dtype=np.int64)
        if on_draws is not None:
            on_draws(rows)


def _weighted_means(w: np.ndarray, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row-wise weighted means of per-item columns in one product; +inf where a drawn item
    is infinite (a plain product would turn 0 * inf into NaN)."""
    x = np.stack(list(columns.values()), axis=1)
    finite = np.isfinite(x)
    means = (w @ np.where(finite, x, 0.0)) / w.sum(axis=1)[:, None]
    for j in np.flatnonzero(~finite.all(axis=0)):
        hit = w[:, ~finite[:, j]].sum(axis=1) > 0
        means[:, j] = np.where(hit, np.inf, means[:, j])
    return {name: means[:, j] for j, name in enumerate(columns)}


def _builtin_draws(
    names: set[str], items: ItemArrays, idx: np.ndarray, n_bins: int, binning: str
) -> dict[str, np.ndarray]:
    """The built-ins in ``names`` on each resample, from shared weighted sums; only the sums
    that some requested metric needs are formed."""
    out: dict[str, np.ndarray] = {}
    c, y = items.confidence, items.correct
    ones = np.ones_like(c)
    weights = multiplicities(idx, items.n) if names - {"smooth_ece"} else None
    if names & set(_MEANS):
        out.update(
            _weighted_means(
                weights,
                {
                    "accuracy": y,
                    "mean_confidence": c,
                    "brier": items.brier,
                    "top_label_brier": (c - y) ** 2,
                    "nll": -items.gold_logp,
                },
            )
        )
        out["overconfidence"] = out["mean_confidence"] - out["accuracy"]
    if names & set(_BINNED):
        sums = weighted_bin_sums(c, np.stack([ones, c, y], axis=1), weights, n_bins, binning)
        out.update(errors_from_sums(sums))
        debiased = debiased_from_bins(sums[..., 0], sums[..., 1], sums[..., 2])
        out["debiased_ece"], out["debiased_rms_ce"] = debiased["l1"], debiased["l2"]
    if "classwise_ece" in names:
        per_class = []
        for k in range(items.probs.shape[1]):
            has = items.n_choices > k
            if not has.any():
                continue
            pk = items.probs[:, k]
            yk = (items.labels == k).astype(np.float64)
            w_k = weights * has[None, :]
            s_k = weighted_bin_sums(pk, np.stack([ones, pk, yk], axis=1), w_k, n_bins, binning)
            ece_k = errors_from_sums(s_k)["ece"]
            # A class absent from a draw has no bins; it is left out of that draw's mean.
            per_class.append(np.where(w_k.sum(axis=1) > 0, ece_k, np.nan))
        out["classwise_ece"] = np.nanmean(np.stack(per_class, axis=1), axis=1)
    if "smooth_ece" in names:
        out["smooth_ece"] = smooth_ece_resampled(c, y, idx)
    return {name: out[name] for name in names}


def per_draw(
    metric: Metric, items: ItemArrays, idx: np.ndarray, n_bins: int, binning: str
) -> np.ndarray:
    """``metric`` on each resample (row of ``idx``): the general path, one call per draw."""
    return np.array([metric.point(items.take(row), n_bins, binning) for row in idx])


def metric_draws(
    metrics: Sequence[Metric], items: ItemArrays, idx: np.ndarray, n_bins: int, binning: str
) -> dict[str, np.ndarray]:
    """``{metric name: (B,) values}``: each metric on each resample ``items.take(idx[b])``
    (equal, up to rounding, to calling its point function on that resample)."""
    fast = {m.name for m in metrics if has_fast_path(m)}
    out = _builtin_draws(fast, items, idx, n_bins, binning) if fast else {}
    for m in metrics:
        if m.name not in fast:
            out[m.name] = per_draw(m, items, idx, n_bins, binning)
    return {m.name: out[m.name] for m in metrics}
