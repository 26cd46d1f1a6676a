"""Calibration metrics inside lm-evaluation-harness (0.4.x) runs: ECE, RMS-CE, smooth ECE.

An lm-eval multiple-choice task scores each choice's log-likelihood and reports ``acc`` and
``acc_norm``. This plugin adds the calibration of the same predictions, from the same numbers,
in the harness's own results table: a task that names
``class: !function calibrated_lm.integrations.lm_eval.CalibratedMultipleChoiceTask`` may list
these metrics in its ``metric_list`` (each with its aggregation, below):

===================  ==========================================================================
metric               aggregated over the task's questions
===================  ==========================================================================
``ece``              top-label ECE, 15 equal-width bins (``calibration_error``, norm l1)
``rms_ce``           RMS calibration error, same bins (norm l2)
``smooth_ece``       smooth ECE (Blasiok and Nakkiran 2023), no bins
``mean_confidence``  mean top-label probability (compare with ``acc``)
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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from calibrated_lm.calibration.metrics import calibration_error
from calibrated_lm.calibration.registry import get as _registry_get
from calibrated_lm.calibration.smooth import smooth_ece as _smooth_ece

try:
    from lm_eval.api.registry import register_aggregation, register_metric
    from lm_eval.api.task import ConfigurableTask
except ImportError as exc:  # the plugin is only for lm-eval users
    raise ImportError(
        "calibrated_lm.integrations.lm_eval needs lm-evaluation-harness 0.4.13 or later 0.4.x: "
        "pip install 'lm_eval>=0.4.13,<0.5'"
    ) from exc

Item = tuple[int, Sequence[float]]  # (gold index, per-choice scores) of one question


def _confidence_and_correct(items: Sequence[Item]) -> tuple[np.ndarray, np.ndarray]:
    conf = np.empty(len(items))
    correct = np.empty(len(items))
    for i, (gold, scores) in enumerate(items):
        s = np.asarray(scores, dtype=np.float64)
        p = np.exp(s - s.max())
        p /= p.sum()
        conf[i] = p.max()
        correct[i] = float(int(np.argmax(s)) == gold)
    return conf, correct


def ece(items: Sequence[Item]) -> float:
    """Top-label ECE (15 equal-width bins) of (gold, per-choice scores) items."""
    c, y = _confidence_and_correct(items)
    return calibration_error(c, y, n_bins=15, norm="l1")


def rms_ce(items: Sequence[Item]) -> float:
    """RMS calibration error (15 equal-width bins)."""
    c, y = _confidence_and_correct(items)
    return calibration_error(c, y, n_bins=15, norm="l2")


def smooth_ece(items: Sequence[Item]) -> float:
    """Smooth ECE with its self-consistent bandwidth."""
    c, y = _confidence_and_correct(items)
    return float(_smooth_ece(c, y))


def mean_confidence(items: Sequence[Item]) -> float:
    """Mean top-label probability."""
    c, _ = _confidence_and_correct(items)
    return float(c.mean())


AGGREGATIONS = {"ece": ece, "rms_ce": rms_ce, "smooth_ece": smooth_ece,
                "mean_confidence": mean_confidence}  # fmt: skip
# From the metrics registry's directions: None (mean confidence) is left unregistered, so
# lm-eval does not claim a better direction for it.
HIGHER_IS_BETTER = {m: _registry_get(m).higher_is_better for m in AGGREGATIONS}
METRIC_NAMES = tuple(AGGREGATIONS) + tuple(f"{m}_norm" for m in AGGREGATIONS)


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
