"""Samples files: reading and writing :class:`~calibrated_lm.calibration.record.SampleRecord`
questions, and grouping them into per-task :class:`TaskSamples`.

Two formats are read, told apart by a file's first record: ours (one
:class:`~calibrated_lm.calibration.record.SampleRecord` JSON object per line, see
:mod:`calibrated_lm.calibration.record`; plain ``.jsonl`` or gzip-compressed ``.jsonl.gz``,
recognised by its content) and lm-evaluation-harness ``--log_samples`` files
(:mod:`calibrated_lm.calibration.lm_eval_samples`). :func:`read_sample_records` is the one
reader of both; :func:`write_sample_records` the one file writer (the eval journal appends
with :class:`calibrated_lm.evaluation.samples_file.SamplesWriter`, through the same
:func:`dumps_records`).

Items with a ``subject`` are reported per ``<task>_<subject>`` and pooled into ``<task>``
(:func:`calibrated_lm.calibration.record.task_name`). An item has exactly as many choices as it
lists scores. A log-likelihood of -infinity (``-Infinity`` in JSON, ``"-inf"`` in harness files)
is a real score, a choice of probability 0, wherever it sits; it is never taken for padding (see
:mod:`calibrated_lm.calibration.scores`). A gold choice scored -infinity is simply wrong with
probability 0 (NLL +inf). Only an item whose every choice is -infinity is refused.

Every problem raises ``UserError`` naming the file and line.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibrated_lm.calibration.lm_eval_samples import (
    is_lm_eval_record,
    lm_eval_task_name,
    read_lm_eval_records,
)
from calibrated_lm.calibration.record import SampleRecord
from calibrated_lm.errors import UserError

__all__ = [
    "BadLine",
    "SampleRecord",
    "TaskSamples",
    "decode_json_line",
    "dumps_records",
    "group_samples",
    "json_lines",
    "lm_eval_task_name",
    "read_sample_records",
    "read_samples",
    "task_groups",
    "write_sample_records",
]
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class TaskSamples:
    """All items of one task: raw per-choice log-likelihoods (ragged: one 1-D array per item,
    of the item's own length, -inf scores kept), gold indices, and where each item came from.

    Pass ``choice_scores`` on as this list (not stacked into a padded array), so that every
    item keeps its real number of choices."""

    name: str
    choice_scores: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    choice_char_lengths: list[np.ndarray | None] = field(default_factory=list)
    choice_token_counts: list[np.ndarray | None] = field(default_factory=list)
    ids: list[Any] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    group: str | None = None

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def n_choices(self) -> np.ndarray:
        """Each item's number of choices: the length of its score list, -inf scores included."""
        return np.array([s.shape[0] for s in self.choice_scores], dtype=np.int64)

    def has_char_lengths(self) -> bool:
        return all(x is not None for x in self.choice_char_lengths)

    def lengths(self, normalization: str) -> list[np.ndarray | None] | None:
        """What ``normalization`` divides by: character lengths, token counts, or None."""
        if normalization == "chars":
            return self.choice_char_lengths
        if normalization == "tokens":
            return self.choice_token_counts
        return None

    def first_missing_char_lengths(self, normalization: str = "chars") -> str | None:
        lengths = self.lengths(normalization) or []
        for src, x in zip(self.sources, lengths):
            if x is None:
                return src
        return None


def _fail(path: Path, line: int, msg: str) -> UserError:
    return UserError(f"{path}:{line}: {msg}")


def _open(path: Path) -> Any:
    """A binary handle on ``path``, decompressing gzip (recognised by its magic bytes, so a
    ``.jsonl.gz`` renamed ``.jsonl`` reads too)."""
    try:
        with path.open("rb") as probe:
            magic = probe.read(2)
        return gzip.open(path, "rb") if magic == _GZIP_MAGIC else path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a .jsonl samples file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


class BadLine(ValueError):
    """One line of a JSON Lines file that is not UTF-8, not JSON or not an object; the
    message says which (and where on the line), without file and line number; ``advice``
    what to do about it where that does not depend on the file ("" otherwise)."""

    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message)
        self.advice = advice


def decode_json_line(raw: bytes) -> dict | None:
    """The JSON object on one line of a samples file (bytes, newline or not), None for a
    blank line; :class:`BadLine` when the line is not UTF-8, not JSON or not an object. The
    one line decoder of our samples files: :func:`json_lines` and the eval journal's reader
    (:func:`calibrated_lm.evaluation.samples_file.read_records`) both use it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
            "save the file as UTF-8",
        ) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"invalid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise BadLine("expected a JSON object per line")
    return obj


def _is_json_document(path: Path, limit: int = 64 << 20) -> bool:
    """Whether ``path`` (at most ``limit`` bytes, plain text) parses whole as one JSON value:
    a summary.json given where samples are expected."""
    try:
        if path.stat().st_size > limit or path.suffix == ".gz":
            return False
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file (gzip or plain);
    a line that is not UTF-8, not JSON or not an object is a ``UserError`` naming it."""
    handle = _open(path)
    with handle:
        lineno = 0
        try:
            # Binary, decoded line by line: a text-mode handle would raise
            # UnicodeDecodeError from the iteration itself, outside any line's handling.
            for lineno, raw in enumerate(handle, start=1):
                try:
                    obj = decode_json_line(raw)
                except BadLine as exc:
                    advice = f"; {exc.advice}" if exc.advice else ""
                    if lineno == 1 and _is_json_document(path):
                        advice = (
                            "; the file is one JSON document (a summary or report?), not JSON "
                            "Lines: give the samples file (samples.jsonl, one object per line)"
                        )
                    raise _fail(path, lineno, f"{exc}{advice}") from None
                if obj is not None:
                    yield lineno, obj
        except (OSError, EOFError, zlib.error) as exc:  # a damaged or truncated .gz
            raise _fail(path, lineno + 1, f"damaged gzip data ({exc})") from None


def read_sample_records(path: str | Path) -> list[SampleRecord]:
    """Every question of one samples file, ours or lm-evaluation-harness's (detected by the
    first record), each with ``source`` = "file:line". An empty file is an error."""
    path = Path(path)
    lines = json_lines(path)
    first = next(lines, None)
    if first is None:
        raise UserError(f"{path}: no samples (the file is empty)")
    line, obj = first

    def chained() -> Iterator[tuple[int, dict]]:
        yield first
        yield from lines

    if "choice_logprobs" in obj:
        return [SampleRecord.from_json(o, f"{path}:{n}") for n, o in chained()]
    if is_lm_eval_record(obj):
        return list(read_lm_eval_records(path, chained()))
    raise _fail(
        path,
        line,
        'unrecognised samples format: expected our JSONL ("task", "id", '
        '"choice_logprobs", "label") or lm-evaluation-harness --log_samples '
        '("doc_id", "filtered_resps", "target")',
    )


def dumps_records(records: Iterable[SampleRecord]) -> str:
    """JSON Lines text of ``records`` (one line each, newline-terminated). ASCII escapes keep
    every record on one line for any reader (U+2028 and friends are line breaks to
    ``str.splitlines``)."""
    return "".join(json.dumps(r.to_json()) + "\n" for r in records)


def write_sample_records(path: str | Path, records: Iterable[SampleRecord]) -> Path:
    """Replace ``path`` by exactly ``records``, atomically (a temporary file, fsynced, renamed
    over it, the folder fsynced: :func:`calibrated_lm.durable.write_bytes`): a crash leaves
    the old file or the new one, never a mix, and a full disk keeps the old one. A name ending
    in ``.gz`` is written gzip-compressed (without a timestamp, so equal records give equal
    bytes)."""
    from calibrated_lm.durable import write_bytes

    path = Path(path)
    data = dumps_records(records).encode("ascii")
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, data)


def group_samples(records: Iterable[SampleRecord]) -> dict[str, TaskSamples]:
    """Records per reported task (:attr:`SampleRecord.name`), in first-seen order.

    Refused (``UserError`` naming the record's source): a question id twice in one task, a
    name that is both a group member and a plain task, an item whose every choice is -inf."""
    tasks: dict[str, TaskSamples] = {}
    seen: dict[tuple[str, str], str] = {}
    for r in records:
        where = r.source or f"question {r.task}/{r.id}"
        name = r.name
        key = (name, json.dumps(r.id, sort_keys=True))
        if key in seen:
            raise UserError(
                f"{where}: duplicate id {r.id!r} in task {name!r} (first at {seen[key]})"
            )
        seen[key] = where
        t = tasks.setdefault(name, TaskSamples(name=name, group=r.group))
        if t.group != r.group:
            raise UserError(f"{where}: task {name!r} is both a group member and a task")
        scores = np.asarray(r.choice_logprobs, dtype=np.float64)
        if not np.isfinite(scores).any():
            raise UserError(f"{where}: every choice has log-likelihood -infinity")
        # A 1-D array per item, so its length stays the item's choice count (-inf included).
        t.choice_scores.append(scores)
        t.labels.append(r.label)
        chars = r.char_lengths()
        t.choice_char_lengths.append(None if chars is None else np.asarray(chars, np.float64))
        counts = r.choice_token_counts
        t.choice_token_counts.append(None if counts is None else np.asarray(counts, np.float64))
        t.ids.append(r.id)
        t.sources.append(where)
    return tasks


def _refuse_mixed_splits(records: Sequence[SampleRecord]) -> None:
    """One task's records from two splits (an eval's samples.jsonl with its
    samples_validation.jsonl, say) would be pooled into one set of metrics: refuse that."""
    first: dict[str, SampleRecord] = {}
    for r in records:
        if r.split is None:
            continue
        seen = first.setdefault(r.task, r)
        if seen.split != r.split:
            raise UserError(
                f"task {r.task} has records of split {seen.split} ({seen.source}) and of split "
                f"{r.split} ({r.source}); their metrics would be pooled, so give the files of "
                "one split at a time"
            )


def read_samples(
    paths: Sequence[str | Path] | str | Path, *, normalization: str = "none"
) -> dict[str, TaskSamples]:
    """Read samples files (format detected per file, :func:`read_sample_records`) into tasks
    keyed by name (:func:`group_samples`).

    With ``normalization="chars"`` every item must carry character lengths (ours:
    ``choice_char_lengths`` or ``choices``; harness: the request continuations); with
    ``"tokens"``, token counts (ours: ``choice_token_counts``, written by ``calibrated-lm
    eval``; the harness does not log them).
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    if normalization not in ("none", "chars", "tokens"):
        raise UserError(f"unknown normalization {normalization!r}: choose none, chars or tokens")
    records: list[SampleRecord] = []
    for p in paths:
        records += read_sample_records(p)
    _refuse_mixed_splits(records)
    tasks = group_samples(records)
    if normalization in ("chars", "tokens"):
        need = (
            'choice character lengths ("choice_char_lengths" or "choices")'
            if normalization == "chars"
            else 'choice token counts ("choice_token_counts", written by calibrated-lm eval)'
        )
        for t in tasks.values():
            where = t.first_missing_char_lengths(normalization)
            if where is not None:
                raise UserError(f"{where}: --normalization {normalization} needs {need}")
    return tasks


def task_groups(tasks: dict[str, TaskSamples]) -> dict[str, list[str]]:
    """Group name -> member task names (e.g. mmlu -> its subjects)."""
    groups: dict[str, list[str]] = {}
    for name, t in tasks.items():
        if t.group is not None:
            groups.setdefault(t.group, []).append(name)
    return groups
