"""Calibration metrics inside lm-evaluation-harness (0.4.x) runs: ECE, RMS-CE, smooth ECE, ...

An lm-eval multiple-choice task scores each choice's log-likelihood and reports ``acc`` and
``acc_norm``. This plugin adds the calibration of the same predictions, from the same numbers,
in the harness's own results table: a task that names
``class: !function calibrated_lm.integrations.lm_eval.CalibratedMultipleChoiceTask`` may list
these metrics in its ``metric_list`` (each with the aggregation of the same name). They are the
metrics registry's ``lm_eval`` view (:mod:`calibrated_lm.calibration.registry`; a metric added
to that view is offered here too), each its registered point function:

===================  ==========================================================================
metric               aggregated over the task's questions
===================  ==========================================================================
``mean_confidence``  mean top-label probability (compare with ``acc``)
``ece``              top-label ECE, 15 equal-width bins (``calibration_error``, norm l1)
``rms_ce``           RMS calibration error, same bins (norm l2)
``smooth_ece``       smooth ECE (Blasiok and Nakkiran 2023), no bins
``brier``            multiclass Brier score, mean over questions of sum_k (p_k - 1[k = gold])^2
``nll``              mean -log p_gold
===================  ==========================================================================

Per question, the probabilities are p = softmax(ll) over the choices' summed log-likelihoods
ll, the confidence max(p) and the prediction argmax(ll), i.e. the prediction of ``acc``. The
``_norm`` variants (``ece_norm`` ...) use ll / len(choice) instead, the prediction of
``acc_norm``. These are the numbers `calibrated-lm eval` computes with ``--normalization none``
(or ``chars``) on the same per-choice scores.

Example task file (``include`` is a path, absolute or relative to this file)::

    include: /path/to/site-packages/lm_eval/tasks/arc/arc_easy.yaml
    task: arc_easy_calibration
    class: !function calibrated_lm.integrations.lm_eval.CalibratedMultipleChoiceTask
    metric_list:
      - metric: acc
        aggregation: mean
        higher_is_better: true
      - metric: ece
        aggregation: !function calibrated_lm.integrations.lm_eval.ece
        higher_is_better: false
      - metric: smooth_ece
        aggregation: !function calibrated_lm.integrations.lm_eval.smooth_ece
        higher_is_better: false

Importing this module also registers the metrics and aggregations under these names in
lm-eval's registry, so ``aggregation: ece`` works as well once it is imported.

Standard errors. lm-eval 0.4.x writes ``<metric>_stderr,<filter>`` beside every metric, from
``lm_eval.api.metrics.stderr_for_metric(aggregation, bootstrap_iters)``, which knows only its
own aggregation functions (``mean`` in closed form; ``median``, ``f1``, ``bleu`` ... through
``bootstrap_stderr``: the sample standard deviation of the statistic over resamples of the
items with replacement) and answers "N/A" for any other, such as a plugin's. Importing this
module therefore wraps that lookup, in ``lm_eval.api.metrics`` and in
``lm_eval.evaluator_utils`` (which holds its own reference): for this plugin's aggregations it
returns :func:`bootstrap_stderr`, the same estimator as the harness's own, i.e.

    SE = sqrt( sum_b (m_b - mean(m))^2 / (B - 1) ),   m_b = metric(items resampled, draw b),

over B = min(``--bootstrap_iters``, :data:`STDERR_DRAWS_MAX`) draws, computed vectorised by
:func:`calibrated_lm.calibration.metric_draws.metric_draws` (the draws ``calibrated-lm eval``
makes for its intervals); every other metric is passed to lm-eval's own lookup unchanged, and
``--bootstrap_iters 0`` gives "N/A" as for the harness's metrics. The cap plays the part of
lm-eval's own cap of 100 draws for BLEU and chrF: its default of 100,000 draws would take
minutes for smooth ECE, while the Monte-Carlo error of a bootstrap standard deviation from B
draws is about 1 / sqrt(2 (B - 1)) of it, 2% at 1,000. A group (``mmlu``) combines its
subtasks' standard errors as lm-eval does for every metric (``pooled_sample_stderr``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from calibrated_lm.calibration.items import ItemArrays
from calibrated_lm.calibration.registry import get as _registry_get
from calibrated_lm.calibration.registry import metrics as _registry_metrics

try:
    from lm_eval.api.registry import register_aggregation, register_metric
    from lm_eval.api.task import ConfigurableTask
except ImportError as exc:  # the plugin is only for lm-eval users
    raise ImportError(
        "calibrated_lm.integrations.lm_eval needs lm-evaluation-harness 0.4.13 or later 0.4.x: "
        "pip install 'lm_eval>=0.4.13,<0.5'"
    ) from exc

Item = tuple[int, Sequence[float]]  # (gold index, per-choice scores) of one question
N_BINS = 15  # equal-width bins of ECE and RMS-CE, calibrated-lm eval's default
STDERR_DRAWS_MAX = 1000
"""At most this many bootstrap draws per standard error (see the module docstring)."""


def _item_arrays(items: Sequence[Item]) -> ItemArrays:
    """The questions as the metrics registry's functions see them: p = softmax(scores) over
    each question's own choices, the prediction argmax(scores) (ties: the first choice, as
    lm-eval's ``acc``)."""
    from calibrated_lm.calibration.scores import choice_log_probabilities

    logp, k = choice_log_probabilities([list(scores) for _, scores in items])
    return ItemArrays(logp, k, np.array([int(gold) for gold, _ in items], dtype=np.int64))


def _point(name: str, items: Sequence[Item]) -> float:
    return float(_registry_get(name).point(_item_arrays(items), N_BINS, "width"))


def _aggregation(name: str) -> Callable[[Sequence[Item]], float]:
    """lm-eval's aggregation for the registry metric ``name``: its point function on the
    task's (gold, per-choice scores) items (binned metrics: 15 equal-width bins)."""

    def aggregate(items: Sequence[Item]) -> float:
        return _point(name, items)

    aggregate.__name__ = aggregate.__qualname__ = name
    aggregate.__doc__ = (
        f"{_registry_get(name).label} of (gold, per-choice scores) items (the metrics "
        f"registry's {name!r}, {N_BINS} equal-width bins where binned)."
    )
    # What the stderr lookup recognises (an attribute, not identity: it survives a reload of
    # this module, after which lm-eval's registry still holds the first functions).
    aggregate._calibrated_lm_metric = name  # type: ignore[attr-defined]
    return aggregate


AGGREGATIONS = {m.name: _aggregation(m.name) for m in _registry_metrics("lm_eval")}
# Module attributes, for ``aggregation: !function calibrated_lm.integrations.lm_eval.<name>``.
globals().update(AGGREGATIONS)
# From the metrics registry's directions: None (mean confidence) is left unregistered, so
# lm-eval does not claim a better direction for it.
HIGHER_IS_BETTER = {m: _registry_get(m).higher_is_better for m in AGGREGATIONS}
METRIC_NAMES = tuple(AGGREGATIONS) + tuple(f"{m}_norm" for m in AGGREGATIONS)


def bootstrap_stderr(name: str, items: Sequence[Item], iters: int, *, seed: int = 0) -> float:
    """Bootstrap standard error of the registry metric ``name`` on ``items``: the sample
    standard deviation (divisor B - 1, as lm-eval's ``bootstrap_stderr``) of the metric over
    B = min(``iters``, :data:`STDERR_DRAWS_MAX`) seeded resamples of the items with
    replacement. NaN for fewer than two items or draws (lm-eval then writes "N/A" itself
    for one item)."""
    from calibrated_lm.calibration.metric_draws import index_chunks, metric_draws

    draws = min(int(iters), STDERR_DRAWS_MAX)
    if len(items) < 2 or draws < 2:
        return float("nan")
    arrays = _item_arrays(items)
    metric = _registry_get(name)
    values = np.concatenate(
        [
            metric_draws([metric], arrays, idx, N_BINS, "width")[name]
            for idx in index_chunks(arrays.n, draws, seed, arrays.probs.shape[1])
        ]
    )
    return float(np.std(values, ddof=1))


def _install_stderr() -> None:
    """Wrap lm-eval's ``stderr_for_metric`` so that this plugin's aggregations get
    :func:`bootstrap_stderr` (module docstring); idempotent, other metrics untouched."""
    import lm_eval.api.metrics as lm_metrics
    import lm_eval.evaluator_utils as lm_evaluator_utils

    current = lm_metrics.stderr_for_metric
    if getattr(current, "_calibrated_lm", False):
        return

    def stderr_for_metric(metric: Any, bootstrap_iters: int) -> Any:
        name = getattr(metric, "_calibrated_lm_metric", None)
        if name is None:
            return current(metric, bootstrap_iters)
        if bootstrap_iters <= 0:  # lm-eval's rule: no stderr without bootstrap draws
            return None
        return lambda xs: bootstrap_stderr(name, xs, bootstrap_iters)

    stderr_for_metric._calibrated_lm = True  # type: ignore[attr-defined]
    stderr_for_metric.__wrapped__ = current  # type: ignore[attr-defined]
    stderr_for_metric.__doc__ = current.__doc__
    for module in (lm_metrics, lm_evaluator_utils):
        if getattr(module, "stderr_for_metric", None) is current:
            module.stderr_for_metric = stderr_for_metric


_install_stderr()


def _passthrough(items: Any) -> Any:  # lm-eval's per-item "metric": the item itself
    return items


for _name in METRIC_NAMES:
    _base = _name.removesuffix("_norm")
    try:
        register_aggregation(_name)(AGGREGATIONS[_base])
        _hib = HIGHER_IS_BETTER[_base]
        register_metric(metric=_name, output_type="multiple_choice", aggregation=_name,
                        **({} if _hib is None else {"higher_is_better": _hib}))(_passthrough)  # fmt: skip
    except (AssertionError, ValueError, KeyError):  # registered already (module reloaded)
        pass


class CalibratedMultipleChoiceTask(ConfigurableTask):
    """lm-eval's configurable task, plus the calibration items of :data:`METRIC_NAMES` that
    its ``metric_list`` asks for (the other metrics are lm-eval's own, unchanged)."""

    def __init__(self, config: dict | None = None, **kwargs: Any) -> None:
        # lm-eval hands a ``class:`` task its whole YAML, ``class`` key included, which its
        # TaskConfig does not accept.
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config, **kwargs)

    def process_results(self, doc: dict, results: Sequence[tuple[float, bool]]) -> dict:
        out = super().process_results(doc, results)
        wanted = [m for m in self._metric_fn_list if m in METRIC_NAMES]
        if not wanted:
            return out
        if self.OUTPUT_TYPE != "multiple_choice":
            raise ValueError(
                f"task {self.config.task}: calibration metrics need output_type: "
                f"multiple_choice, not {self.OUTPUT_TYPE}"
            )
        choices = self.doc_to_choice(doc)
        lls = np.array([r[0] for r in results[: len(choices)]], dtype=np.float64)
        gold = self.doc_to_target(doc)
        if isinstance(gold, str):
            gold = choices.index(gold) if gold in choices else -1
        if isinstance(gold, list) or not 0 <= int(gold) < len(choices):
            raise ValueError(
                f"task {self.config.task}: calibration metrics need one gold choice index per "
                f"question, got {gold!r} for {len(choices)} choices"
            )
        lengths = np.array([max(len(c), 1) for c in choices], dtype=np.float64)
        for m in wanted:
            scores = lls / lengths if m.endswith("_norm") else lls
            out[m] = (int(gold), scores.tolist())
        return out
