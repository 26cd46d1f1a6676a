"""One scored question: :class:`SampleRecord`, the typed form of a samples line, and the one
rule that names the task a question is reported under.

On disk a record is one JSON object per line (``samples.jsonl``, or ``.jsonl.gz``)::

    {"task": "mmlu", "id": "anatomy/17", "choice_logprobs": [-4.1, -2.3, -7.0, -5.5],
     "label": 1, "subject": "anatomy", "choice_char_lengths": [12, 9, 15, 11],
     "choice_token_counts": [3, 2, 4, 3], "choices": [...], "prompt": "...",
     "split": "test", "request_sha256": "..."}

``task``, ``id``, ``choice_logprobs`` and ``label`` are required; the rest is optional (files
shipped from device runs keep only the fields metrics need, older runs lack token counts or
question hashes). :meth:`SampleRecord.from_json` is the one parser of that object,
:meth:`SampleRecord.to_json` the one serialiser; ``to_json(from_json(obj))`` equals ``obj``
for every object ``eval`` writes (fields outside the format are not kept).

A question with a ``subject`` is reported under ``<task>_<subject>`` and pooled into the group
``<task>`` (MMLU's 57 subjects into ``mmlu``): :func:`task_name` is that rule, written once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from calibrated_lm.errors import UserError

# Serialisation order of the optional fields (the order ``eval`` has always written them).
OPTIONAL_FIELDS = (
    "subject",
    "choice_char_lengths",
    "choice_token_counts",
    "choices",
    "prompt",
    "split",
    "request_sha256",
)
REQUIRED_FIELDS = ("task", "id", "choice_logprobs", "label")


def task_name(task: str, subject: str | None) -> str:
    """The name a question is reported under: ``<task>_<subject>`` when it has a subject (a
    member of group ``task``), else ``task``."""
    return f"{task}_{subject}" if subject else task


@dataclass(frozen=True)
class SampleRecord:
    """One scored multiple-choice question.

    ``choice_logprobs`` holds each choice's summed log-likelihood (-inf allowed: a choice of
    probability 0); ``label`` the 0-based gold index. Lengths keep the numbers as written
    (ints from ``eval``). ``source`` ("file:line") says where the record was read; it is not
    part of the record on disk and does not take part in equality.
    """

    task: str
    id: Any
    choice_logprobs: tuple[float, ...]
    label: int
    subject: str | None = None
    choice_char_lengths: tuple[float, ...] | None = None
    choice_token_counts: tuple[float, ...] | None = None
    choices: tuple[str, ...] | None = None
    prompt: str | None = None
    split: str | None = None
    request_sha256: str | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """The task this question is reported under (:func:`task_name`)."""
        return task_name(self.task, self.subject)

    @property
    def group(self) -> str | None:
        """The group pooling this question's task (``task`` when it has a subject)."""
        return self.task if self.subject else None

    @property
    def key(self) -> tuple[str, str]:
        """(task, id as text): what identifies the question within a run."""
        return (self.task, str(self.id))

    @property
    def n_choices(self) -> int:
        return len(self.choice_logprobs)

    def char_lengths(self) -> tuple[float, ...] | None:
        """Per-choice character lengths: the stored ones, else those of the choice texts."""
        if self.choice_char_lengths is not None:
            return self.choice_char_lengths
        if self.choices is not None and all(self.choices):
            return tuple(float(len(c)) for c in self.choices)
        return None

    def lengths(self, normalization: str) -> tuple[float, ...] | None:
        """What ``normalization`` divides by: token counts for ``tokens``, character lengths
        for ``chars``, None for ``none`` (or when the record lacks them)."""
        if normalization == "tokens":
            return self.choice_token_counts
        if normalization == "chars":
            return self.char_lengths()
        return None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this record, required fields first, absent ones left out."""
        out: dict[str, Any] = {
            "task": self.task,
            "id": self.id,
            "choice_logprobs": list(self.choice_logprobs),
            "label": self.label,
        }
        for key in OPTIONAL_FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "record") -> SampleRecord:
        """Parse and check one JSON object; every problem is a ``UserError`` starting with
        ``where`` (``file:line``). Fields outside the format are ignored."""

        def fail(msg: str) -> UserError:
            return UserError(f"{where}: {msg}")

        for key in REQUIRED_FIELDS:
            if key not in obj:
                raise fail(f'missing field "{key}"')
        task = obj["task"]
        if not isinstance(task, str) or not task:
            raise fail('"task" must be a non-empty string')
        scores = _numbers(obj["choice_logprobs"], "choice_logprobs", fail)
        if len(scores) < 2:  # as task files and the harness-format reader require
            raise fail(
                f'"choice_logprobs" needs at least 2 choices, got {len(scores)}: a question '
                "with one choice is always right, whatever the model's confidence"
            )
        label = obj["label"]
        if not isinstance(label, int) or isinstance(label, bool):
            raise fail(f'"label" must be an integer, got {label!r}')
        if not 0 <= label < len(scores):
            raise fail(f"label {label} is outside the {len(scores)} choices (0-based)")
        subject = obj.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise fail('"subject" must be a string or null')
        choices = obj.get("choices")
        # Choice texts are informative only (prompt and choices are dropped for transport);
        # a list that is not all strings is not used for lengths.
        if not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            choices = None
        record = cls(
            task=task,
            id=obj["id"],
            choice_logprobs=scores,
            label=label,
            subject=subject or None,
            choice_char_lengths=_lengths(obj, "choice_char_lengths", len(scores), fail),
            choice_token_counts=_lengths(obj, "choice_token_counts", len(scores), fail),
            choices=tuple(choices) if choices is not None else None,
            prompt=obj.get("prompt") if isinstance(obj.get("prompt"), str) else None,
            split=obj.get("split") if isinstance(obj.get("split"), str) else None,
            request_sha256=(
                obj.get("request_sha256") if isinstance(obj.get("request_sha256"), str) else None
            ),
            source=where,
        )
        derived = record.char_lengths()
        if record.choice_char_lengths is None and derived is not None:
            if len(derived) != len(scores):
                raise fail(f"{len(derived)} choice lengths for {len(scores)} choice_logprobs")
        return record


def _numbers(value: Any, key: str, fail: Any) -> tuple[float, ...]:
    """A non-empty list of numbers, none NaN or +inf (-inf is a real score)."""
    if not isinstance(value, list) or not value:
        raise fail(f'"{key}" must be a non-empty list of numbers')
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise fail(f'"{key}" must contain only numbers')
    if any(math.isnan(v) or v == math.inf for v in value):
        raise fail(f'"{key}" contains NaN or +infinity')
    return tuple(value)


def _lengths(obj: Mapping[str, Any], key: str, k: int, fail: Any) -> tuple[float, ...] | None:
    """Positive per-choice lengths under ``key``, one per choice, or None when absent."""
    value = obj.get(key)
    if value is None:
        return None
    out = _numbers(value, key, fail)
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise fail(f'"{key}" must hold positive lengths')
    if len(out) != k:
        what = "choice lengths" if key == "choice_char_lengths" else "choice token counts"
        raise fail(f"{len(out)} {what} for {k} choice_logprobs")
    return out


def records_by_name(records: Sequence[SampleRecord]) -> dict[str, list[SampleRecord]]:
    """Records per reported task name (:func:`task_name`), in first-seen order."""
    out: dict[str, list[SampleRecord]] = {}
    for r in records:
        out.setdefault(r.name, []).append(r)
    return out


def groups_of(records: Sequence[SampleRecord]) -> dict[str, list[str]]:
    """Group name -> member task names (e.g. ``mmlu`` -> ``mmlu_anatomy``, ...), first-seen
    order."""
    groups: dict[str, list[str]] = {}
    for r in records:
        if r.group is not None:
            members = groups.setdefault(r.group, [])
            if r.name not in members:
                members.append(r.name)
    return groups
