"""Per-task calibration summaries with bootstrap intervals: the numbers behind summary.json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibrated_lm.calibration.binning import bin_sums, bin_table
from calibrated_lm.calibration.bootstrap import bootstrap_indices, percentile_interval
from calibrated_lm.calibration.metrics import _error_from_sums
from calibrated_lm.calibration.scores import ChoiceScores, choice_log_probabilities
from calibrated_lm.calibration.smooth import smooth_ece, smooth_ece_resampled
from calibrated_lm.calibration.validation import as_labels, check_bins

# Metrics with a bootstrap interval, in the order tables and JSON list them.
METRICS = (
    "accuracy",
    "mean_confidence",
    "overconfidence",
    "ece",
    "rms_ce",
    "mce",
    "classwise_ece",
    "debiased_ece",
    "debiased_rms_ce",
    "smooth_ece",
    "brier",
    "top_label_brier",
    "nll",
)
DEBIAS_RESAMPLES = 200


class _Items:
    """Validated per-item arrays that every metric is computed from."""

    def __init__(self, logp: np.ndarray, n_choices: np.ndarray, labels: np.ndarray):
        self.logp = logp
        self.n_choices = n_choices
        self.labels = labels
        self.probs = np.exp(logp)
        self.pred = self.probs.argmax(axis=1)
        rows = np.arange(logp.shape[0])
        self.confidence = self.probs[rows, self.pred]
        self.correct = (self.pred == labels).astype(np.float64)
        self.gold_logp = logp[rows, labels]


def _metrics(items: _Items, idx: np.ndarray | None, n_bins: int, binning: str, seed: int) -> dict:
    """Every metric except smooth ECE on the items ``idx`` (all items when None)."""
    take = (lambda a: a) if idx is None else (lambda a: a[idx])
    conf, corr = take(items.confidence), take(items.correct)
    probs, labels, k_i = take(items.probs), take(items.labels), take(items.n_choices)
    _, count, conf_sum, acc_sum = bin_sums(conf, corr, n_bins, binning)
    out = {
        "accuracy": float(corr.mean()),
        "mean_confidence": float(conf.mean()),
        "ece": _error_from_sums(count, conf_sum, acc_sum, "l1"),
        "rms_ce": _error_from_sums(count, conf_sum, acc_sum, "l2"),
        "mce": _error_from_sums(count, conf_sum, acc_sum, "max"),
    }
    out["overconfidence"] = out["mean_confidence"] - out["accuracy"]
    out.update(_debiased(count, conf_sum, acc_sum, seed))
    # Classwise ECE over choice positions, each over the items that have that position.
    errs = []
    for k in range(probs.shape[1]):
        has = k_i > k
        if has.any():
            yk = (labels[has] == k).astype(np.float64)
            _, c_k, cs_k, as_k = bin_sums(probs[has, k], yk, n_bins, binning)
            errs.append(_error_from_sums(c_k, cs_k, as_k, "l1"))
    out["classwise_ece"] = float(np.mean(errs))
    py = np.exp(take(items.gold_logp))
    out["brier"] = float(np.mean(np.einsum("ij,ij->i", probs, probs) - 2.0 * py + 1.0))
    out["top_label_brier"] = float(np.mean((conf - corr) ** 2))
    out["nll"] = float(-np.mean(take(items.gold_logp)))
    return out


def _debiased(count: np.ndarray, conf_sum: np.ndarray, acc_sum: np.ndarray, seed: int) -> dict:
    """Kumar et al. (2019) debiased l1 (simulated) and l2 (closed form) errors from bin sums;
    the same estimators as metrics.debiased_calibration_error."""
    nonempty = count > 0
    n_b = count[nonempty]
    w = n_b / n_b.sum()
    acc = acc_sum[nonempty] / n_b
    conf = conf_sum[nonempty] / n_b
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(n_b >= 2, acc * (1.0 - acc) / (n_b - 1.0), 0.0)
    sq = np.where(n_b >= 2, (acc - conf) ** 2 - var, 0.0)
    rng = np.random.default_rng(seed)
    draws = rng.normal(acc, np.sqrt(acc * (1.0 - acc) / n_b), size=(DEBIAS_RESAMPLES, acc.size))
    l1 = 2.0 * float(np.dot(w, np.abs(acc - conf))) - float((np.abs(draws - conf) @ w).mean())
    return {"debiased_ece": l1, "debiased_rms_ce": float(np.sqrt(max(float(np.dot(w, sq)), 0.0)))}


def summarize(
    choice_scores: ChoiceScores,
    labels: Sequence[int] | np.ndarray,
    *,
    choice_char_lengths: ChoiceScores | None = None,
    normalization: str = "none",
    n_bins: int = 15,
    binning: str = "width",
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Calibration summary of one task.

    Confidence is the softmax over each item's choices of ``choice_scores`` (log-likelihoods,
    ragged lists or a -inf-padded array), after ``normalization`` ("none" or "chars", which
    divides by ``choice_char_lengths``). Returns a JSON-ready dict with ``n``, every metric in
    ``METRICS``, ``<metric>_ci95`` = [lo, hi] percentile bootstrap intervals over ``bootstrap``
    seeded item resamples (None when bootstrap = 0), ``smooth_ece_bandwidth``, and the per-bin
    table ``bins``. ``overconfidence`` is mean_confidence - accuracy; ``debiased_ece`` /
    ``debiased_rms_ce`` are the Kumar et al. (2019) estimators (l1 simulated with a fixed seed,
    l2 closed form).
    """
    check_bins(n_bins, binning)
    if isinstance(bootstrap, bool) or int(bootstrap) != bootstrap or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    logp, n_choices = choice_log_probabilities(
        choice_scores, choice_char_lengths=choice_char_lengths, normalization=normalization
    )
    y = as_labels(labels, logp.shape[0], n_choices)
    items = _Items(logp, n_choices, y)
    point = _metrics(items, None, n_bins, binning, seed)
    point["smooth_ece"], bandwidth = smooth_ece(
        items.confidence, items.correct, return_bandwidth=True
    )
    out: dict[str, Any] = {"n": int(y.shape[0])}
    for name in METRICS:
        out[name] = point[name]
    if bootstrap:
        idx = bootstrap_indices(y.shape[0], int(bootstrap), seed)
        draws: dict[str, list[float]] = {name: [] for name in METRICS}
        for b, row in enumerate(idx):
            for name, value in _metrics(items, row, n_bins, binning, seed + b + 1).items():
                draws[name].append(value)
        draws["smooth_ece"] = list(smooth_ece_resampled(items.confidence, items.correct, idx))
        for name in METRICS:
            out[f"{name}_ci95"] = percentile_interval(np.asarray(draws[name]))
    else:
        for name in METRICS:
            out[f"{name}_ci95"] = None
    out["smooth_ece_bandwidth"] = bandwidth
    out["n_choices"] = {"min": int(n_choices.min()), "max": int(n_choices.max())}
    out["bins"] = bin_table(items.confidence, items.correct, n_bins=n_bins, binning=binning).rows()
    return out


def _strip_padding(choice_scores: ChoiceScores) -> list[np.ndarray]:
    """Per-item 1-D arrays without the -inf padding (so tasks of different widths can pool)."""
    from calibrated_lm.calibration.scores import padded_scores

    s, k = padded_scores(choice_scores)
    return [s[i, : k[i]] for i in range(s.shape[0])]


def _strip_lengths(lengths: ChoiceScores, n_choices: Sequence[int]) -> list[np.ndarray]:
    from calibrated_lm.calibration.validation import pad_ragged

    a = pad_ragged(lengths, fill=np.nan, name="choice_char_lengths")
    return [a[i, :k] for i, k in enumerate(n_choices)]


def summarize_tasks(
    tasks: Mapping[str, tuple[ChoiceScores, Sequence[int] | np.ndarray]],
    *,
    protocol: Mapping[str, Any],
    choice_char_lengths: Mapping[str, ChoiceScores] | None = None,
    normalization: str = "none",
    n_bins: int = 15,
    binning: str = "width",
    bootstrap: int = 1000,
    seed: int = 0,
    groups: Mapping[str, Sequence[str]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Summaries of several tasks: ``{"protocol": {...}, "tasks": {name: summary, ...,
    "all": pooled}}``.

    ``tasks`` maps a name to (choice_scores, labels). ``groups`` (optional) maps an extra entry
    name to member tasks pooled into it (e.g. ``mmlu`` over its subjects); ``all`` pools every
    item of every task once. ``protocol`` is copied into the result next to the metric settings.
    """
    if not tasks:
        raise ValueError("no tasks to summarize")
    groups = dict(groups or {})
    for name in [*tasks, *groups]:
        if name == "all":
            raise ValueError('"all" is reserved for the pooled entry; rename that task')
    for g, members in groups.items():
        if g in tasks:
            raise ValueError(f"group {g!r} has the same name as a task")
        missing = [m for m in members if m not in tasks]
        if missing or not members:
            raise ValueError(f"group {g!r} names unknown tasks: {', '.join(missing) or '(none)'}")
    lengths = dict(choice_char_lengths or {})
    settings = dict(
        normalization=normalization, n_bins=n_bins, binning=binning, bootstrap=bootstrap, seed=seed
    )
    stripped: dict[str, tuple[list[np.ndarray], np.ndarray, list[np.ndarray] | None]] = {}
    for name, (scores, labels) in tasks.items():
        rows = _strip_padding(scores)
        lens = None
        if normalization == "chars":
            if name not in lengths:
                raise ValueError(f'normalization="chars" needs choice_char_lengths for {name!r}')
            lens = _strip_lengths(lengths[name], [r.shape[0] for r in rows])
        stripped[name] = (rows, np.asarray(labels), lens)

    def pooled(names: Sequence[str]) -> tuple[list, np.ndarray, list | None]:
        rows = [r for n in names for r in stripped[n][0]]
        labels = np.concatenate([stripped[n][1] for n in names])
        lens = [r for n in names for r in stripped[n][2]] if normalization == "chars" else None
        return rows, labels, lens

    jobs = [(name, [name]) for name in tasks]
    jobs += list(groups.items())
    if len(tasks) > 1:
        jobs.append(("all", list(tasks)))
    results: dict[str, Any] = {}
    iterator = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc="tasks", unit="task")
    for name, members in iterator:
        rows, labels, lens = pooled(members)
        try:
            results[name] = summarize(rows, labels, choice_char_lengths=lens, **settings)
        except ValueError as exc:
            raise ValueError(f"task {name!r}: {exc}") from exc
    if "all" not in results:
        results["all"] = results[next(iter(tasks))]
    return {"protocol": {**dict(protocol), **settings}, "tasks": results}
