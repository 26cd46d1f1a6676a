"""Per-task calibration summaries with bootstrap intervals: the numbers behind summary.json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibrated_lm.calibration.binning import bin_table
from calibrated_lm.calibration.bootstrap import percentile_interval
from calibrated_lm.calibration.items import ItemArrays
from calibrated_lm.calibration.metric_draws import draws_bar, index_chunks, metric_draws
from calibrated_lm.calibration.registry import BUILTIN
from calibrated_lm.calibration.registry import metrics as registered_metrics
from calibrated_lm.calibration.scores import ChoiceScores, choice_log_probabilities
from calibrated_lm.calibration.validation import as_labels, check_bins

# The built-in metrics, in the order tables and JSON list them (the registry may hold more:
# summarize reports every registered metric).
METRICS = BUILTIN


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
    ragged lists or a -inf-padded array), after ``normalization`` ("none", "chars" or "tokens", which
    divides by ``choice_char_lengths``). Returns a JSON-ready dict with ``n``, every metric in
    ``METRICS``, ``<metric>_ci95`` = [lo, hi] percentile bootstrap intervals over ``bootstrap``
    seeded item resamples (None when bootstrap = 0), ``smooth_ece_bandwidth``, and the per-bin
    table ``bins``. ``overconfidence`` is mean_confidence - accuracy; ``debiased_ece`` /
    ``debiased_rms_ce`` are the Kumar et al. (2019) estimators (l1 with the exact expectation,
    l2 closed form).
    """
    check_bins(n_bins, binning)
    if isinstance(bootstrap, bool) or int(bootstrap) != bootstrap or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    logp, n_choices = choice_log_probabilities(
        choice_scores, choice_char_lengths=choice_char_lengths, normalization=normalization
    )
    y = as_labels(labels, logp.shape[0], n_choices)
    items = ItemArrays(logp, n_choices, y)
    registry = registered_metrics()
    with_ci = [m for m in registry if m.has_ci]
    out: dict[str, Any] = {"n": int(y.shape[0])}
    for m in registry:
        out[m.name] = m.point(items, n_bins, binning)
    bandwidth = items.smooth[1]
    if bootstrap:
        # Draws are made chunk by chunk (index_chunks: the indices of one
        # bootstrap_indices(n, bootstrap, seed) call), each through metric_draws: the
        # built-ins' shared sums, any other registered metric through its own function.
        draws: dict[str, list[np.ndarray]] = {m.name: [] for m in with_ci}
        for idx in index_chunks(y.shape[0], int(bootstrap), seed, items.probs.shape[1]):
            for name, values in metric_draws(with_ci, items, idx, n_bins, binning).items():
                draws[name].append(values)
        for m in with_ci:
            out[f"{m.name}_ci95"] = percentile_interval(np.concatenate(draws[m.name]))
    else:
        for m in with_ci:
            out[f"{m.name}_ci95"] = None
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
        if normalization in ("chars", "tokens"):
            if name not in lengths:
                raise ValueError(
                    f'normalization="{normalization}" needs per-choice lengths for {name!r}'
                )
            lens = _strip_lengths(lengths[name], [r.shape[0] for r in rows])
        stripped[name] = (rows, np.asarray(labels), lens)

    def pooled(names: Sequence[str]) -> tuple[list, np.ndarray, list | None]:
        rows = [r for n in names for r in stripped[n][0]]
        labels = np.concatenate([stripped[n][1] for n in names])
        lens = (
            [r for n in names for r in stripped[n][2]]
            if normalization in ("chars", "tokens")
            else None
        )
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
            with draws_bar(int(bootstrap), f"{name} bootstrap", enabled=progress):
                results[name] = summarize(rows, labels, choice_char_lengths=lens, **settings)
        except ValueError as exc:
            raise ValueError(f"task {name!r}: {exc}") from exc
    if "all" not in results:
        results["all"] = results[next(iter(tasks))]
    return {"protocol": {**dict(protocol), **settings}, "tasks": results}
