"""``samples.jsonl`` as an append-only, crash-safe journal: the basis of resume.

Each scored question is one :class:`~calibrated_lm.calibration.record.SampleRecord`, one JSON
line (the format ``calibrated-lm metrics`` reads, parsed and serialised only by that class).
Lines are appended and flushed to disk (fsync) after every
batch of questions, so a crash loses at most the batch in flight. On reopening, a trailing
fragment without its newline (a write cut short) is discarded; a damaged line elsewhere is an
error naming its line, and nothing is deleted.

Each record also carries ``request_sha256``, a hash of the question's scoring requests (every
(context, continuation) pair, :func:`request_sha256`): a resumed eval reuses a record only when
that hash (and the record's split) still matches the question, so an edited task file re-scores
exactly the questions whose prompts changed. Where a journal holds several records of one key,
the last one counts (:func:`latest_records`); ``eval`` removes superseded records by rewriting
the journal atomically (:func:`rewrite_records`) before it scores their replacements.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from calibrated_lm.calibration.record import SampleRecord
from calibrated_lm.calibration.samples import (
    BadLine,
    decode_json_line,
    dumps_records,
    write_sample_records,
)
from calibrated_lm.durable import fsync_dir
from calibrated_lm.errors import UserError

Key = tuple[str, str]


def record_key(record: SampleRecord) -> Key:
    """(task, id as text): one question of a journal."""
    return record.key


def request_sha256(requests: Sequence[tuple[str, str]]) -> str:
    """sha256 of a question's scoring requests, each (context, continuation), in order."""
    text = json.dumps([[str(c), str(k)] for c, k in requests], separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def latest_records(records: Iterable[SampleRecord]) -> list[SampleRecord]:
    """One record per key, the last one written (in the order keys first appear)."""
    latest: dict[Key, SampleRecord] = {}
    for r in records:
        latest[record_key(r)] = r
    return list(latest.values())


def rewrite_records(path: Path, records: Iterable[SampleRecord]) -> None:
    """Replace ``path`` by exactly ``records``, atomically: a temporary file, fsynced, renamed
    over it, so a crash leaves either the old journal or the new one, never a mix."""
    write_sample_records(path, records)


def read_records(path: Path, *, repair: bool = True) -> list[SampleRecord]:
    """All complete records of ``path`` ([] when absent), each checked by
    :meth:`SampleRecord.from_json` (a bad field is a ``UserError`` naming file and line).

    With ``repair``, a final line cut short by a crash (no trailing newline, or not valid JSON
    at the very end) is truncated away so appending continues on a clean line boundary.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        tail = data[end:]
        try:
            json.loads(tail)
            complete_tail = True
        except ValueError:
            complete_tail = False
        if complete_tail:
            # A whole record whose newline was lost: keep it, restore the newline.
            if repair:
                with path.open("ab") as fh:
                    fh.write(b"\n")
            data = data + b"\n"
            end = len(data)
        elif repair:
            with path.open("r+b") as fh:
                fh.truncate(end)
    # Each line through the samples files' one line decoder and the record's one parser.
    records: list[SampleRecord] = []
    for lineno, raw in enumerate(data[:end].splitlines(), start=1):
        try:
            obj = decode_json_line(raw)
        except BadLine as exc:
            raise UserError(
                f"{path}:{lineno}: {exc}: a damaged line; fix or delete that line to resume"
            ) from None
        if obj is not None:
            records.append(SampleRecord.from_json(obj, f"{path}:{lineno}"))
    return records


class SamplesWriter:
    """Appends records to a samples file; each :meth:`write` ends flushed and fsynced, and a
    journal this writer creates has its folder fsynced too (else a power loss could drop
    the new file's name with every record in it)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        created = not path.exists()
        # Append-only journal (durable.py's module docstring): fsynced per batch below.
        self._fh = path.open("a", encoding="utf-8")
        if created:
            fsync_dir(path.parent)

    def write(self, records: Iterable[SampleRecord]) -> None:
        text = dumps_records(records)
        if not text:
            return
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> SamplesWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
