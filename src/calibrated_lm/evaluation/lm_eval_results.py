"""An lm-evaluation-harness 0.4-style ``results_<date>.json`` of an eval run.

Tools built around the harness (leaderboards, result aggregators, notebooks) read its
``results_*.json``. ``calibrated-lm eval`` writes one beside ``summary.json`` so that they can
read our runs too: per task, under the harness's ``"<metric>,<filter>"`` keys (filter
``none``),

* ``acc`` / ``acc_norm``: accuracy of the argmax of the summed / per-character log-likelihoods
  (the harness's two multiple-choice accuracies), each with ``_stderr`` = sample standard
  deviation / sqrt(n), the harness's ``mean_stderr``;
* our calibration metrics as in ``summary.json`` (the ``lm_eval`` view of
  :mod:`calibrated_lm.calibration.registry`: ``mean_confidence``, ``ece``, ``rms_ce``,
  ``smooth_ece``, ``brier``, ``nll``), under the run's ``--normalization``; their
  stderr is ``"N/A"`` as the harness writes for metrics it does not bootstrap (our 95%
  intervals stay in ``summary.json``);

plus ``group_subtasks`` (MMLU's subjects), ``n-shot``, ``n-samples``, ``higher_is_better``
(each metric's direction in the registry; null for ``mean_confidence``, which has none),
``versions`` and a ``config`` naming the model. ``summary.json`` stays the full record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from calibrated_lm.calibration.record import SampleRecord


def higher_is_better() -> dict[str, bool | None]:
    """The harness's ``higher_is_better`` of every metric written: ``acc``/``acc_norm`` (our
    accuracy) and the registry's ``lm_eval`` view, from each metric's direction (None for a
    metric without a better direction, such as mean confidence)."""
    from calibrated_lm.calibration.registry import get, metrics

    acc = get("accuracy").higher_is_better
    return {"acc": acc, "acc_norm": acc} | {m.name: m.higher_is_better for m in metrics("lm_eval")}


def _accuracy(records: Sequence[SampleRecord], normalization: str) -> tuple[float, float | None]:
    from calibrated_lm.evaluation.report import record_probabilities

    probs, y = record_probabilities(records, normalization)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    n = correct.size
    stderr = float(correct.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return float(correct.mean()), stderr


def lm_eval_results(summary: dict[str, Any], records: Sequence[SampleRecord]) -> dict[str, Any]:
    """The harness-style results object of a run (``summary`` from ``build_summary``,
    ``records`` the scored questions it summarises)."""
    from calibrated_lm.calibration.registry import metrics
    from calibrated_lm.evaluation.report import group_records

    proto = summary.get("protocol", {})
    _, _, groups = group_records(records, "none")
    by_task: dict[str, list[SampleRecord]] = {}
    for r in records:
        by_task.setdefault(r.name, []).append(r)
        if r.group is not None:
            by_task.setdefault(r.group, []).append(r)
    results: dict[str, dict[str, Any]] = {}
    for task, entry in summary.get("tasks", {}).items():
        recs = by_task.get(task)
        if not recs:
            continue  # a pooled entry ("all") that is no task of its own
        acc, acc_se = _accuracy(recs, "none")
        acc_n, acc_n_se = _accuracy(recs, "chars")
        row: dict[str, Any] = {"alias": task, "acc,none": acc, "acc_stderr,none": acc_se,
                               "acc_norm,none": acc_n, "acc_norm_stderr,none": acc_n_se}  # fmt: skip
        for key in (m.name for m in metrics("lm_eval")):
            if key in entry:
                row[f"{key},none"] = entry[key]
                row[f"{key}_stderr,none"] = "N/A"
        results[task] = row
    shots = proto.get("num_fewshot", 0)
    # Each task's whole split (a summary from before split_sizes: the questions scored).
    sizes = {
        name: n
        for t in proto.get("tasks", {}).values()
        if isinstance(t, dict)
        for name, n in (t.get("split_sizes") or {}).items()
    }
    return {
        "results": results,
        "group_subtasks": {
            t: sorted(groups.get(t, []))
            for t in results
            if t not in {m for ms in groups.values() for m in ms}
        },  # fmt: skip
        "n-shot": {t: shots for t in results},
        "n-samples": {
            t: {"original": sizes.get(t, len(by_task[t])), "effective": len(by_task[t])}
            for t in results
        },  # fmt: skip
        "higher_is_better": {t: higher_is_better() for t in results},
        "versions": {
            t: proto.get("tasks", {}).get(t, {}).get("metadata", {}).get("version") for t in results
        },  # fmt: skip
        "config": {
            "model": "calibrated-lm",
            "model_args": f"pretrained={proto.get('model')},dtype={proto.get('dtype')}",
            "batch_size": proto.get("timing", {}).get("batch_size"),
            "device": proto.get("device"),
            "limit": proto.get("limit"),
            "normalization_of_calibration_metrics": proto.get("normalization", "none"),
            "apply_chat_template": bool(proto.get("chat_template_used")),
        },
        "date": time.time(),
        "calibrated_lm_version": proto.get("versions", {}).get("calibrated_lm"),
        "full_summary": "summary.json",
    }


def results_file_name(now: float | None = None) -> str:
    """``results_<date>.json`` with the harness's timestamp format."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(now))
    frac = f"{(now or time.time()) % 1:.6f}"[1:]
    return f"results_{stamp}{frac}.json"
