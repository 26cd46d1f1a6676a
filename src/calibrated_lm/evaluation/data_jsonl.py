"""Rows from user data files: JSON Lines (one object per line) and JSON (a list of objects,
or one under a key, as BIG-bench's ``examples``).

The rows are raw: a task file's templates turn them into questions. Every problem is reported
with the file name and, for JSON Lines, the line number (blank lines are skipped, and counted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.items import Doc


def read_jsonl_rows(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(rows, their 1-based line numbers) of a JSON Lines file."""
    if not path.exists():
        raise UserError(f"task file {path} does not exist")
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    with path.open("rb") as fh:  # decoded per line, so a bad byte names its line
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object")
            rows.append(obj)
            lines.append(lineno)
    return rows, lines


def read_json_rows(path: Path, key: str | None) -> list[dict[str, Any]]:
    """The list of objects at ``key`` (dotted for nested keys; None: the whole document)."""
    if not path.exists():
        raise UserError(f"task file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    rows: Any = doc
    for part in key.split(".") if key else []:
        if not isinstance(rows, dict) or part not in rows:
            raise UserError(f"{path}: no {key!r} in it (expected a list of objects there)")
        rows = rows[part]
    if not isinstance(rows, list):
        raise UserError(f"{path}: {key or 'the document'} is not a list of objects")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: {key or ''}[{i}] is not a JSON object")
    return rows


def read_jsonl_task(path: Path) -> list[Doc]:
    """The questions of a ``{context, choices, label}`` JSON Lines file, as ``--tasks FILE.jsonl``
    reads it (through the format file ``tasks/_jsonl.yaml``)."""
    from calibrated_lm.evaluation.tasks import data_file_task

    return data_file_task(str(path), "jsonl").docs()
