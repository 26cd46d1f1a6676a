"""The metrics registry: every calibration metric once, with what tables and JSON need.

A :class:`Metric` carries its ``name`` (the key in ``summary.json``, ``compare.json`` and
``results_*.json``), its column ``label`` (and a ``short`` one for the narrow terminal table
of ``calibrated-lm metrics``), whether it has a bootstrap interval (``has_ci``: the summary
then carries ``<name>_ci95``), its ``direction`` (``"higher"`` or ``"lower"`` is better, None
when neither is, such as mean confidence), the function computing it from an
:class:`~calibrated_lm.calibration.items.ItemArrays`, and the ``views`` it appears in, each
with whether that view prints its interval.

Views (the tables and JSON summaries that iterate :func:`metrics`):

* ``report``: ``eval``'s table (``report.md`` and the terminal);
* ``metrics``: the terminal table of ``calibrated-lm metrics``;
* ``compare``: ``compare``'s per-run table; ``after_T``: what ``compare`` recomputes after
  temperature scaling (JSON; its table shows those also in ``compare``);
* ``paired``: ``compare``'s paired differences, and what
  :func:`calibrated_lm.calibration.paired.paired_bootstrap` computes by default (any registered
  metric can be given to it; its table prints a metric's difference with its interval);
* ``lm_eval``: the calibration metrics of the harness-style ``results_*.json``.

``summary.json`` holds every registered metric. The registry's order is the order of every
table and JSON object. :func:`register` adds a metric (e.g. a plugin's); it then shows up in
the summaries and in the views it names without any other edit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from calibrated_lm.calibration.items import ItemArrays

Direction = Literal["higher", "lower"] | None
PointFn = Callable[[ItemArrays, int, str], float]
VIEWS = ("report", "metrics", "compare", "after_T", "paired", "lm_eval")


@dataclass(frozen=True)
class Metric:
    """One metric. ``point(items, n_bins, binning)`` returns its value on the items (a float,
    +inf allowed, e.g. NLL of a gold choice of probability 0). ``views`` maps a view name
    (:data:`VIEWS`) to whether that view prints the interval."""

    name: str
    label: str
    point: PointFn
    direction: Direction = "lower"
    has_ci: bool = True
    short: str | None = None
    views: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.views) - set(VIEWS)
        if unknown:
            raise ValueError(f"metric {self.name!r}: unknown views {sorted(unknown)}")
        if self.direction not in ("higher", "lower", None):
            raise ValueError(f"metric {self.name!r}: direction must be higher, lower or None")

    @property
    def higher_is_better(self) -> bool | None:
        """lm-evaluation-harness's flag: True, False, or None without a better direction."""
        return None if self.direction is None else self.direction == "higher"

    @property
    def short_label(self) -> str:
        return self.short or self.label

    def shows_ci(self, view: str) -> bool:
        """Whether ``view`` prints this metric's interval (never without ``has_ci``)."""
        return self.has_ci and bool(self.views.get(view))

    def heading(self, view: str, *, short: bool = False, ci_suffix: bool = True) -> str:
        """The column heading in ``view``: the label (``short``: the short one), plus
        " [95% CI]" when the view prints the interval and ``ci_suffix``."""
        text = self.short_label if short else self.label
        return text + (" [95% CI]" if ci_suffix and self.shows_ci(view) else "")

    def cell(self, entry: Mapping[str, Any], view: str, key: str | None = None) -> str:
        """``entry[key]`` (default: this metric's name) to 3 decimals, "-" when absent or
        NaN, followed by its ``<key>_ci95`` interval where ``view`` prints it."""
        key = key or self.name
        text = _number(entry.get(key))
        ci = entry.get(f"{key}_ci95")
        if ci and self.shows_ci(view):
            text += f" [{_number(ci[0])}, {_number(ci[1])}]"
        return text


def _number(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}"


_REGISTRY: dict[str, Metric] = {}


def register(metric: Metric, *, replace: bool = False) -> Metric:
    """Add ``metric`` (last in every table); a second metric of one name is an error unless
    ``replace``, which keeps the first one's position."""
    if metric.name in _REGISTRY and not replace:
        raise ValueError(f"a metric named {metric.name!r} is registered already")
    _REGISTRY[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    """Remove a metric (a plugin's, or a test's temporary one)."""
    del _REGISTRY[name]


def metrics(view: str | None = None) -> list[Metric]:
    """The registered metrics in table order; with ``view``, those that appear in it."""
    if view is not None and view not in VIEWS:
        raise ValueError(f"unknown view {view!r}: one of {', '.join(VIEWS)}")
    return [m for m in _REGISTRY.values() if view is None or view in m.views]


def get(name: str) -> Metric:
    return _REGISTRY[name]


# ----------------------------------------------------------------------------- built-ins
# Point values, each through the documented public functions.


def _accuracy(it: ItemArrays, n_bins: int, binning: str) -> float:
    return float(it.correct.mean())


def _mean_confidence(it: ItemArrays, n_bins: int, binning: str) -> float:
    return float(it.confidence.mean())


def _overconfidence(it: ItemArrays, n_bins: int, binning: str) -> float:
    return float(it.confidence.mean()) - float(it.correct.mean())


def _binned(norm: str, debiased: bool = False) -> PointFn:
    def fn(it: ItemArrays, n_bins: int, binning: str) -> float:
        from calibrated_lm.calibration.metrics import (
            calibration_error,
            debiased_calibration_error,
        )

        f = debiased_calibration_error if debiased else calibration_error
        return f(it.confidence, it.correct, n_bins=n_bins, binning=binning, norm=norm)

    return fn


def _classwise_ece(it: ItemArrays, n_bins: int, binning: str) -> float:
    from calibrated_lm.calibration.metrics import classwise_calibration_error

    return classwise_calibration_error(
        it.probs, it.labels, n_choices=it.n_choices, n_bins=n_bins, binning=binning
    )


def _smooth_ece(it: ItemArrays, n_bins: int, binning: str) -> float:
    return it.smooth[0]


def _brier(it: ItemArrays, n_bins: int, binning: str) -> float:
    return float(it.brier.mean())


def _top_label_brier(it: ItemArrays, n_bins: int, binning: str) -> float:
    from calibrated_lm.calibration.scores import top_label_brier

    return top_label_brier(it.confidence, it.correct)


def _nll(it: ItemArrays, n_bins: int, binning: str) -> float:
    return float(-np.mean(it.gold_logp))


for _m in (
    Metric("accuracy", "accuracy", _accuracy, "higher", short="acc",
           views={"report": True, "metrics": False, "compare": True, "paired": True}),
    Metric("mean_confidence", "mean conf", _mean_confidence, None, short="conf",
           views={"report": False, "metrics": False, "paired": True, "lm_eval": False}),
    Metric("overconfidence", "overconfidence", _overconfidence, None),
    Metric("ece", "ECE", _binned("l1"),
           views={"report": True, "metrics": True, "compare": True, "after_T": True,
                  "paired": True, "lm_eval": False}),
    Metric("rms_ce", "RMS-CE", _binned("l2"),
           views={"report": True, "metrics": False, "compare": True, "after_T": True,
                  "paired": True, "lm_eval": False}),
    Metric("mce", "MCE", _binned("max"), views={"metrics": False}),
    Metric("classwise_ece", "classwise ECE", _classwise_ece),
    Metric("debiased_ece", "debiased ECE", _binned("l1", debiased=True)),
    Metric("debiased_rms_ce", "debiased RMS-CE", _binned("l2", debiased=True)),
    Metric("smooth_ece", "smooth ECE", _smooth_ece, short="smECE",
           views={"metrics": False, "lm_eval": False}),
    Metric("brier", "Brier", _brier,
           views={"report": False, "metrics": False, "after_T": False, "paired": True,
                  "lm_eval": False}),
    Metric("top_label_brier", "top-label Brier", _top_label_brier),
    Metric("nll", "NLL", _nll,
           views={"report": False, "metrics": False, "after_T": False, "paired": True,
                  "lm_eval": False}),
):  # fmt: skip
    register(_m)
BUILTIN = tuple(_REGISTRY)
