"""Calibration metrics for multiple-choice language-model outputs.

numpy-only at import time (matplotlib is imported when a diagram is drawn), so the
``calibrated-lm metrics`` command starts fast.
"""

from __future__ import annotations

from calibrated_lm.calibration.binning import BinTable, bin_indices, bin_table
from calibrated_lm.calibration.bootstrap import bootstrap_ci, bootstrap_indices, percentile_interval
from calibrated_lm.calibration.diagrams import (
    plot_reliability,
    reliability_diagram,
    wilson_interval,
)
from calibrated_lm.calibration.metrics import (
    calibration_error,
    classwise_calibration_error,
    debiased_calibration_error,
)
from calibrated_lm.calibration.record import SampleRecord, task_name
from calibrated_lm.calibration.report import METRICS, summarize, summarize_tasks
from calibrated_lm.calibration.samples import (
    TaskSamples,
    read_sample_records,
    read_samples,
    task_groups,
    write_sample_records,
)
from calibrated_lm.calibration.scores import (
    accuracy,
    brier_score,
    choice_log_probabilities,
    choice_probabilities,
    mean_confidence,
    nll,
    top_label,
    top_label_brier,
)
from calibrated_lm.calibration.smooth import smooth_ece, smooth_ece_sigma
from calibrated_lm.calibration.temperature import apply_temperature, fit_temperature

__all__ = [
    "METRICS",
    "BinTable",
    "SampleRecord",
    "TaskSamples",
    "accuracy",
    "apply_temperature",
    "bin_indices",
    "bin_table",
    "bootstrap_ci",
    "bootstrap_indices",
    "brier_score",
    "calibration_error",
    "choice_log_probabilities",
    "choice_probabilities",
    "classwise_calibration_error",
    "debiased_calibration_error",
    "fit_temperature",
    "mean_confidence",
    "nll",
    "percentile_interval",
    "plot_reliability",
    "read_sample_records",
    "read_samples",
    "reliability_diagram",
    "smooth_ece",
    "smooth_ece_sigma",
    "summarize",
    "summarize_tasks",
    "task_groups",
    "task_name",
    "top_label",
    "top_label_brier",
    "wilson_interval",
    "write_sample_records",
]
