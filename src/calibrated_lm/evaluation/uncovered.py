"""Questions a head subset cannot score: refuse them (``--uncovered error``) or leave them out
(``--uncovered skip``), counted per task (issue 12, claim 3's amendment).

Under a head subset S the softmax gives a token outside S no probability, so a choice holding
one has no score (``scoring.check_in_subset``). The amended claim-3 protocol keeps every
answer token of the primary tasks in S but scores HellaSwag "on the questions whose choices
the subset covers, the share reported". With ``skip`` a question is *uncovered* when any
continuation token of any of its choices (as the scorer tokenises it) lies outside S; such
questions are not scored and not written as samples, and per task

    left_out = #uncovered,   questions = #questions of the run,   share = left_out / questions

is recorded in run.json's protocol summary (``uncovered_questions``), the report and one
printed line per task. A task whose every question is uncovered is refused: its metrics
would be those of zero questions. ``error`` (the default) keeps the earlier behaviour: the
first uncovered question is refused before anything is scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.items import Item
from calibrated_lm.models.head_subset import HeadSubset

MODES = ("error", "skip")
DEFAULT = "error"


def check_mode(mode: Any) -> None:
    """:class:`UserError` unless ``mode`` is one of :data:`MODES` (reads nothing)."""
    if mode not in MODES:
        raise UserError(f"--uncovered must be error or skip, not {mode!r}")


def check_mode_with_subset(mode: str, has_subset: bool) -> None:
    """``skip`` needs a head subset: without one every question is covered, and a folder
    recorded as ``skip`` would claim a selection that never happened."""
    if mode == "skip" and not has_subset:
        raise UserError(
            "--uncovered skip leaves out questions with a choice token outside the head "
            "subset, but this run has none (no --head-subset and no head_subset.json in the "
            "model folder); give a subset or leave --uncovered out"
        )


def key(mode: str, has_subset: bool) -> dict[str, str]:
    """The protocol key's entry: recorded with a head subset only (without one nothing can be
    uncovered), as ``head_subset`` itself is."""
    return {"uncovered": mode} if has_subset else {}


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Always compared, a missing entry meaning the default: a folder scored with ``skip``
    lacks questions a run with ``error`` would refuse, and the other way round."""
    a, b = old.get("uncovered", DEFAULT), new.get("uncovered", DEFAULT)
    return [] if a == b else [f"uncovered: {a!r} -> {b!r}"]


def is_covered(encoded: Sequence[tuple[list[int], list[int]]], index_map: Any) -> bool:
    """Whether every continuation token of every choice is kept (``index_map[t] >= 0``,
    :meth:`HeadSubset.index_map`); ``encoded`` is one question's ``(ctx_ids, cont_ids)``."""
    return all(index_map[t] >= 0 for _, cont in encoded for t in cont)


def partition(
    encoder: Any, items: Sequence[Item], subset: HeadSubset
) -> tuple[list[Item], list[Item]]:
    """(covered, uncovered) ``items``, each in the given order, as ``encoder``
    (``scoring.Encoder``) tokenises their requests."""
    index_map = subset.index_map()
    covered: list[Item] = []
    uncovered: list[Item] = []
    step = 1024  # questions per tokenizer call: bounded memory on large tasks
    for s in range(0, len(items), step):
        chunk = items[s : s + step]
        for item, encoded in zip(chunk, encoder.encode_many([it.requests for it in chunk])):
            (covered if is_covered(encoded, index_map) else uncovered).append(item)
    return covered, uncovered


def counts(
    items: Sequence[Item], uncovered: Sequence[Item], tasks: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per task of ``tasks`` (in that order): questions, left_out and share (module
    docstring); ``items`` are all of the run's questions, ``uncovered`` those left out."""
    total = dict.fromkeys(tasks, 0)
    left = dict.fromkeys(tasks, 0)
    for it in items:
        total[it.task] = total.get(it.task, 0) + 1
    for it in uncovered:
        left[it.task] = left.get(it.task, 0) + 1
    return {
        t: {
            "questions": total[t],
            "left_out": left.get(t, 0),
            "share": round(left.get(t, 0) / total[t], 6) if total[t] else None,
        }
        for t in total
    }


def refuse_empty(per_task: dict[str, dict[str, Any]], subset_size: int) -> None:
    """:class:`UserError` naming the first task none of whose questions is covered (and its
    ``split``, when the counts carry one)."""
    for task, c in per_task.items():
        if c["questions"] and c["left_out"] == c["questions"]:
            where = f" ({c['split']} split)" if c.get("split") else ""
            raise UserError(
                f"task {task}{where}: all {c['questions']} questions have a choice token "
                f"outside the head subset (V' = {subset_size}), so none can be scored with "
                "--uncovered skip; leave the task out or choose a subset that keeps its "
                "answer tokens"
            )


def describe(task: str, c: dict[str, Any]) -> str:
    """One line per task, for the terminal and the report."""
    share = f"{100 * c['share']:.1f}%" if c["share"] is not None else "-"
    return (
        f"{task}: {c['left_out']} of {c['questions']} questions ({share}) left out, a choice "
        f"token outside the head subset (--uncovered skip); {c['questions'] - c['left_out']} "
        "kept"
    )
