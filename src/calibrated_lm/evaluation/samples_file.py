"""``samples.jsonl`` as an append-only, crash-safe journal: the basis of resume.

Each scored question is one JSON line (the format ``calibrated-lm metrics`` reads: ``task``,
``id``, ``choice_logprobs``, ``label``, optional ``subject``, ``choice_char_lengths``,
``choices``, ``prompt``, plus ``split``). Lines are appended and flushed to disk after every
batch of questions, so a crash loses at most the batch in flight. On reopening, a trailing
fragment without its newline (a write cut short) is discarded; a damaged line elsewhere is an
error naming its line, and nothing is deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from calibrated_lm.errors import UserError

Key = tuple[str, str]


def record_key(record: dict[str, Any]) -> Key:
    return (str(record["task"]), str(record["id"]))


def read_records(path: Path, *, repair: bool = True) -> list[dict[str, Any]]:
    """All complete records of ``path`` ([] when absent).

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
    records: list[dict[str, Any]] = []
    for lineno, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            raise UserError(
                f"{path}:{lineno}: damaged line (not JSON); fix or delete that line to resume"
            ) from None
        if not isinstance(obj, dict) or "task" not in obj or "id" not in obj:
            raise UserError(f"{path}:{lineno}: not a samples record (needs task and id)")
        records.append(obj)
    return records


class SamplesWriter:
    """Appends records to a samples file; each :meth:`write` ends flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        # ASCII escapes keep every record on one line for any reader (U+2028 and friends are
        # line breaks to str.splitlines).
        text = "".join(json.dumps(r) + "\n" for r in records)
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
