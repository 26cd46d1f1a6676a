"""From scored questions to ``summary.json``, reliability diagrams and ``report.md``.

Metrics come from :mod:`calibrated_lm.calibration` (``summarize_tasks``), with the same task
naming as ``calibrated-lm metrics``: a question with a subject belongs to task
``<task>_<subject>`` and to the group ``<task>`` pooling its subjects (MMLU), so the summary
has the same schema whichever command wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibrated_lm import durable
from calibrated_lm.calibration.record import SampleRecord, groups_of, records_by_name


def group_records(
    records: Sequence[SampleRecord], normalization: str = "chars"
) -> tuple[dict[str, tuple[list[list[float]], list[int]]], dict[str, list[list[float]]], dict]:
    """(tasks -> (scores, labels), tasks -> the lengths ``normalization`` divides by (character
    lengths for none/chars), groups -> member tasks), tasks named by
    :func:`calibrated_lm.calibration.record.task_name`."""
    tasks: dict[str, tuple[list[list[float]], list[int]]] = {}
    lengths: dict[str, list[list[float]]] = {}
    for name, recs in records_by_name(records).items():
        tasks[name] = ([list(r.choice_logprobs) for r in recs], [r.label for r in recs])
        lengths[name] = [record_lengths(r, normalization) for r in recs]
    return tasks, lengths, groups_of(records)


def record_lengths(record: SampleRecord, normalization: str) -> list | None:
    """The record's per-choice lengths for ``normalization`` (token counts for "tokens",
    character lengths otherwise); a UserError names what is missing
    (records of runs before token counts were stored have none). With "none" nothing is
    required: None when the record holds no character lengths."""
    from calibrated_lm.errors import UserError

    # "none" divides by nothing: the character lengths stand in where the record has them
    # (eval's always do), and a hand-written samples file without them is fine.
    wanted = normalization
    normalization = "tokens" if normalization == "tokens" else "chars"
    value = record.lengths(normalization)
    if value is None and wanted != "none":
        raise UserError(
            f"question {record.task}/{record.id} has no per-choice "
            f"{'token counts' if normalization == 'tokens' else 'character lengths'} for "
            f"--normalization {normalization} (scored before they were stored: rescore it)"
        )
    return None if value is None else list(value)


def top_level_tasks(records: Sequence[SampleRecord]) -> list[str]:
    """Task names as the user gave them (a group counts once), in first-seen order."""
    seen: list[str] = []
    for r in records:
        if r.task not in seen:
            seen.append(r.task)
    return seen


def record_probabilities(
    records: Sequence[SampleRecord], normalization: str
) -> tuple[np.ndarray, np.ndarray]:
    """((n, k_max) choice probabilities under ``normalization``, 0 past an item's choices;
    gold indices)."""
    from calibrated_lm.calibration import choice_probabilities

    probs, _ = choice_probabilities(
        [r.choice_logprobs for r in records],
        choice_char_lengths=[record_lengths(r, normalization) for r in records],
        normalization=normalization,
    )
    return np.nan_to_num(probs, nan=0.0), np.array([r.label for r in records])


def confidence_correct(
    records: Sequence[SampleRecord], normalization: str
) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence (softmax over the choices' scores) and correctness per question."""
    from calibrated_lm.calibration import choice_probabilities, top_label

    probs, _ = choice_probabilities(
        [r.choice_logprobs for r in records],
        choice_char_lengths=[record_lengths(r, normalization) for r in records],
        normalization=normalization,
    )
    conf, pred = top_label(probs)
    labels = np.array([r.label for r in records])
    return conf, (pred == labels).astype(np.float64)


def build_summary(
    records: Sequence[SampleRecord],
    *,
    protocol: dict[str, Any],
    normalization: str,
    n_bins: int,
    binning: str,
    bootstrap: int,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    from calibrated_lm.calibration import summarize_tasks

    tasks, lengths, groups = group_records(records, normalization)
    return summarize_tasks(
        tasks,
        protocol=protocol,
        choice_char_lengths=lengths,
        normalization=normalization,
        n_bins=n_bins,
        binning=binning,
        bootstrap=bootstrap,
        seed=seed,
        groups=groups,
        progress=progress,
    )


def write_diagrams(
    records: Sequence[SampleRecord],
    out_dir: Path,
    *,
    label: str,
    normalization: str,
    n_bins: int,
    binning: str,
) -> dict[str, list[Path]]:
    """One reliability diagram per top-level task: ``reliability_<task>.png`` and ``.svg``."""
    from calibrated_lm.calibration import reliability_diagram

    paths: dict[str, list[Path]] = {}
    for task in top_level_tasks(records):
        sub = [r for r in records if r.task == task]
        conf, correct = confidence_correct(sub, normalization)
        paths[task] = reliability_diagram(
            {label: (conf, correct)},
            out_dir / f"reliability_{task}",
            n_bins=n_bins,
            binning=binning,
            title=f"{task}: {label}",
            normalization=normalization,
        )
    return paths


def report_header() -> list[str]:
    """The heading of ``eval``'s table: task, n, then the registry's ``report`` view."""
    from calibrated_lm.calibration.registry import metrics

    return ["task", "n"] + [m.heading("report") for m in metrics("report")]


def table_rows(summary: dict[str, Any], order: Sequence[str]) -> list[list[str]]:
    """One row per task of ``order`` present in the summary, the columns of
    :func:`report_header`."""
    from calibrated_lm.calibration.registry import metrics

    shown = metrics("report")
    rows = []
    for name in order:
        e = summary["tasks"].get(name)
        if e is None:
            continue
        rows.append([name, str(e["n"])] + [m.cell(e, "report") for m in shown])
    return rows


def report_table(summary: dict[str, Any], records: Sequence[SampleRecord]) -> str:
    """``eval``'s terminal table: top-level tasks and ``all`` (:func:`summary_order`)."""
    return text_table(report_header(), table_rows(summary, summary_order(summary, records)))


# The built-in heading, for callers that import it (the table itself uses report_header()).
HEADER = report_header()


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_order(summary: dict[str, Any], records: Sequence[SampleRecord]) -> list[str]:
    """Top-level tasks (groups pooled) then ``all``; subjects stay in summary.json only."""
    order = top_level_tasks(records)
    if len(order) > 1:
        order.append("all")
    return order


def scoring_notes(proto: dict[str, Any]) -> list[str]:
    """What the report states above its table because the numbers mean something else
    without it: a logit transform applied at scoring time, and the questions
    ``--uncovered skip`` left out (per task, with their share)."""
    from calibrated_lm.evaluation import logit_transform, uncovered

    notes = []
    described = logit_transform.from_key(proto).describe()
    if described:
        notes.append(f"Scored with {described}.")
    for task, c in (proto.get("uncovered_questions") or {}).items():
        notes.append(uncovered.describe(task, c))
    return notes


def write_report(
    out_dir: Path,
    summary: dict[str, Any],
    records: Sequence[SampleRecord],
    diagrams: dict[str, list[Path]],
) -> Path:
    proto = summary["protocol"]
    rows = table_rows(summary, summary_order(summary, records))
    lines = [f"# Calibration report: {proto.get('model')}", ""]
    notes = scoring_notes(proto)
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    lines += [
        markdown_table(report_header(), rows),
        "",
        "## Protocol",
        "",
    ]
    for key in sorted(proto):
        if key in ("timing", "tasks"):
            continue
        lines.append(f"- {key}: {json.dumps(proto[key])}")
    for task, spec in sorted(proto.get("tasks", {}).items()):
        lines.append(f"- task {task}: {json.dumps(spec)}")
    timing = proto.get("timing", {})
    if timing:
        lines += ["", "## Timing", ""]
        lines += [f"- {k}: {v}" for k, v in timing.items()]
    if diagrams:
        lines += ["", "## Reliability diagrams", ""]
        for task, paths in diagrams.items():
            png = [p for p in paths if p.suffix == ".png"][0]
            lines.append(f"![{task}]({png.name})")
    # Atomic like every output: a report torn by a crash would look complete but be wrong.
    return durable.write_text(out_dir / "report.md", "\n".join(lines) + "\n")
