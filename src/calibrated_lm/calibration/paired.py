"""Paired comparisons of two models on the same questions, with bootstrap intervals.

Both models answered the same n questions. One resample of the question indices is applied to
both, and the statistic is ``metric(B) - metric(A)`` on that resample; the 95% interval is the
percentile interval over ``draws`` resamples (Efron 1979; paired, so the between-question
variance that both models share cancels).

:func:`two_level_bootstrap` adds a level for training seeds (Davison & Hinkley 1997, sec. 3.8):
each draw resamples seeds with replacement, then questions, and averages the paired
differences of the drawn seeds on the drawn questions, so the interval covers seed-to-seed
variation as well as the question sample.

Metrics come from the metrics registry (:mod:`calibrated_lm.calibration.registry`): by default
its ``paired`` view (accuracy, mean confidence, ECE, RMS-CE, multiclass Brier, NLL), or the
names given; each metric's value is its registered point function on the questions (the same
number ``summarize`` reports) and its draws come from
:func:`~calibrated_lm.calibration.metric_draws.metric_draws` (the built-ins' shared weighted
sums; any other registered metric draw by draw through its own function). A metric without a
bootstrap interval (``has_ci`` False) gets its difference and ``ci95`` None. A metric added
to the registry's ``paired`` view is therefore computed here, and shown by ``compare``, without
other edits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calibrated_lm.calibration.bootstrap import percentile_interval
from calibrated_lm.calibration.items import ItemArrays
from calibrated_lm.calibration.metric_draws import index_chunks, metric_draws
from calibrated_lm.calibration.registry import Metric
from calibrated_lm.calibration.registry import get as registered
from calibrated_lm.calibration.registry import metrics as registered_metrics

MetricChoice = Sequence[str | Metric] | None


def paired_metrics(metrics: MetricChoice = None) -> list[Metric]:
    """The registry's metrics for a paired comparison: its ``paired`` view (in table order) by
    default, else those named (registry names or :class:`Metric` objects), in the order given."""
    if metrics is None:
        return registered_metrics("paired")
    chosen = [m if isinstance(m, Metric) else registered(m) for m in metrics]
    names = [m.name for m in chosen]
    if len(set(names)) < len(names):
        raise ValueError(f"a metric is named twice: {names}")
    return chosen


def _check(probs: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != labels.shape[0]:
        raise ValueError(f"{name}: expected ({labels.shape[0]}, k) probabilities, got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name}: probabilities must be finite and non-negative")
    if labels.size and (labels.min() < 0 or labels.max() >= p.shape[1]):
        raise ValueError(f"{name}: a gold label is outside the {p.shape[1]} choices")
    return p


def _same_questions(a: ItemArrays, b: ItemArrays, what: str) -> None:
    if a.n != b.n or not np.array_equal(a.labels, b.labels):
        raise ValueError(f"{what}: A and B must hold the same questions (n and gold labels)")
    if a.n < 1:
        raise ValueError("cannot bootstrap an empty sample")


def paired_bootstrap_items(
    items_a: ItemArrays,
    items_b: ItemArrays,
    *,
    metrics: MetricChoice = None,
    draws: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
    binning: str = "width",
    level: float = 0.95,
) -> dict[str, dict[str, float | list[float] | None]]:
    """``{metric: {"a", "b", "delta", "ci95"}}`` with delta = metric(B) - metric(A), for the
    metrics of :func:`paired_metrics` (registry order, or as given).

    ``items_a`` and ``items_b`` hold the same questions in the same order (equal gold
    labels). ``a`` and ``b`` are the metrics' point values on all questions; ``ci95`` the
    percentile interval of metric(B*) - metric(A*) over ``draws`` resamples of the questions
    shared by both sides (the indices of ``bootstrap_indices(n, draws, seed)``).
    """
    _same_questions(items_a, items_b, "paired_bootstrap")
    if draws < 0:
        raise ValueError(f"bootstrap draws must be 0 or more, got {draws}")
    chosen = paired_metrics(metrics)
    # No draws: the point differences alone, every interval None.
    with_ci = [m for m in chosen if m.has_ci] if draws else []
    diffs: dict[str, list[np.ndarray]] = {m.name: [] for m in with_ci}
    width = max(items_a.probs.shape[1], items_b.probs.shape[1])
    for idx in index_chunks(items_a.n, draws, seed, width) if with_ci else ():
        da = metric_draws(with_ci, items_a, idx, n_bins, binning)
        db = metric_draws(with_ci, items_b, idx, n_bins, binning)
        for m in with_ci:
            diffs[m.name].append(db[m.name] - da[m.name])
    out: dict[str, dict[str, float | list[float] | None]] = {}
    for m in chosen:
        a = float(m.point(items_a, n_bins, binning))
        b = float(m.point(items_b, n_bins, binning))
        ci = percentile_interval(np.concatenate(diffs[m.name]), level) if m.name in diffs else None
        out[m.name] = {"a": a, "b": b, "delta": b - a, "ci95": ci}
    return out


def paired_bootstrap(
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    labels: np.ndarray,
    *,
    metrics: MetricChoice = None,
    draws: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
    binning: str = "width",
    level: float = 0.95,
    n_choices: np.ndarray | None = None,
) -> dict[str, dict[str, float | list[float] | None]]:
    """:func:`paired_bootstrap_items` on choice probabilities.

    ``probs_a`` and ``probs_b`` are (n, k) choice probabilities (rows padded with 0 where an
    item has fewer choices; ``n_choices`` says how many it has, default k, which matters to
    the classwise ECE only) for the same questions in the same order; ``labels`` the gold
    indices.
    """
    y = np.asarray(labels, dtype=np.int64)
    pa, pb = _check(probs_a, y, "probs_a"), _check(probs_b, y, "probs_b")
    return paired_bootstrap_items(
        ItemArrays.from_probs(pa, y, n_choices),
        ItemArrays.from_probs(pb, y, n_choices),
        metrics=metrics,
        draws=draws,
        seed=seed,
        n_bins=n_bins,
        binning=binning,
        level=level,
    )


def two_level_bootstrap(
    probs_a: Sequence[np.ndarray],
    probs_b: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    metrics: MetricChoice = None,
    draws: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
    binning: str = "width",
    level: float = 0.95,
    return_draws: bool = False,
) -> dict[str, dict[str, float | list[float] | None]]:
    """Paired seed-and-question bootstrap of mean(metric(B_s)) - mean(metric(A_s)).

    ``probs_a[s]`` and ``probs_b[s]`` are the (n, k) probabilities of seed s's two models (A
    and B trained with the same seed; pass the same array for every A when A is one shared
    model, such as a base). Each draw resamples seeds with replacement, then the n questions,
    and averages the per-seed differences on those questions. ``a``/``b`` are the seed means
    on all questions. The seed draws depend only on (``draws``, ``seed``, number of seeds), so
    calls for several tasks with the same arguments resample the same seeds in each draw;
    ``return_draws`` adds each metric's per-draw differences (``"draws"``), e.g. to average
    over tasks draw by draw. Metrics as in :func:`paired_bootstrap_items` (one without an
    interval gets ``ci95`` None and no draws).
    """
    y = np.asarray(labels, dtype=np.int64)
    if len(probs_a) != len(probs_b) or not probs_a:
        raise ValueError("two_level_bootstrap needs the same number (>= 1) of A and B seeds")
    if draws < 1:
        raise ValueError(f"bootstrap draws must be at least 1, got {draws}")
    s = len(probs_a)
    items_a = [
        ItemArrays.from_probs(_check(p, y, f"probs_a[{i}]"), y) for i, p in enumerate(probs_a)
    ]
    items_b = [
        ItemArrays.from_probs(_check(p, y, f"probs_b[{i}]"), y) for i, p in enumerate(probs_b)
    ]
    if y.shape[0] < 1:
        raise ValueError("cannot bootstrap an empty sample")
    chosen = paired_metrics(metrics)
    with_ci = [m for m in chosen if m.has_ci]
    width = max(p.probs.shape[1] for p in items_a + items_b)
    # Per metric, (draws, seeds) paired differences on the question resamples.
    per: dict[str, list[np.ndarray]] = {m.name: [] for m in with_ci}
    for idx in index_chunks(y.shape[0], draws, seed, width) if with_ci else ():
        chunk = {m.name: np.empty((idx.shape[0], s)) for m in with_ci}
        for j, (ia, ib) in enumerate(zip(items_a, items_b)):
            da = metric_draws(with_ci, ia, idx, n_bins, binning)
            db = metric_draws(with_ci, ib, idx, n_bins, binning)
            for m in with_ci:
                chunk[m.name][:, j] = db[m.name] - da[m.name]
        for m in with_ci:
            per[m.name].append(chunk[m.name])
    seeds = np.random.default_rng(seed + 1).integers(0, s, size=(draws, s))
    rows = np.arange(draws)[:, None]
    out: dict[str, dict[str, float | list[float] | None]] = {}
    for m in chosen:
        a = float(np.mean([m.point(it, n_bins, binning) for it in items_a]))
        b = float(np.mean([m.point(it, n_bins, binning) for it in items_b]))
        out[m.name] = {"a": a, "b": b, "delta": b - a, "ci95": None}
        if m.has_ci:
            drawn = np.concatenate(per[m.name])[rows, seeds].mean(axis=1)
            out[m.name]["ci95"] = percentile_interval(drawn, level)
            if return_draws:
                out[m.name]["draws"] = drawn
    return out
