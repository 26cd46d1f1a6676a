"""``samples.jsonl`` as an append-only, crash-safe journal: the basis of resume.

Each scored question is one JSON line (the format ``calibrated-lm metrics`` reads: ``task``,
``id``, ``choice_logprobs``, ``label``, optional ``subject``, ``choice_char_lengths``,
``choices``, ``prompt``, plus ``split``). Lines are appended and flushed to disk after every
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
from typing import Any

from calibrated_lm.errors import UserError

Key = tuple[str, str]


def record_key(record: dict[str, Any]) -> Key:
    return (str(record["task"]), str(record["id"]))


def request_sha256(requests: Sequence[tuple[str, str]]) -> str:
    """sha256 of a question's scoring requests, each (context, continuation), in order."""
    text = json.dumps([[str(c), str(k)] for c, k in requests], separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def latest_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per key, the last one written (in the order keys first appear)."""
    latest: dict[Key, dict[str, Any]] = {}
    for r in records:
        latest[record_key(r)] = r
    return list(latest.values())


def rewrite_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` by exactly ``records``, atomically: a temporary file, fsynced, renamed
    over it, so a crash leaves either the old journal or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    from calibrated_lm.durable import fsync_dir

    fsync_dir(path.parent)


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
        except UnicodeDecodeError:
            raise UserError(
                f"{path}:{lineno}: not UTF-8 text (a damaged line); fix or delete that line"
            ) from None
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
