"""User tasks as JSON Lines: one ``{"context", "choices", "label"}`` object per line.

Optional fields: ``id`` (default: the line number) and ``subject``. The context and choices are
used verbatim under the harness convention (continuation = ``" " + choice``). Every problem is
reported with the file name and line number.
"""

from __future__ import annotations

import json
from pathlib import Path

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.items import Doc


def read_jsonl_task(path: Path) -> list[Doc]:
    """Parse and validate a JSONL task file into docs (the query is the context verbatim)."""
    if not path.exists():
        raise UserError(f"task file {path} does not exist")
    docs: list[Doc] = []
    seen: set[str] = set()
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
            missing = [k for k in ("context", "choices", "label") if k not in obj]
            if missing:
                raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
            context, choices, label = obj["context"], obj["choices"], obj["label"]
            if not isinstance(context, str):
                raise UserError(f"{where}: 'context' must be a string")
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise UserError(f"{where}: 'choices' must be a list of strings")
            if len(choices) < 2:
                raise UserError(f"{where}: needs at least 2 choices, got {len(choices)}")
            if isinstance(label, bool) or not isinstance(label, int):
                raise UserError(f"{where}: 'label' must be an integer choice index")
            if not 0 <= label < len(choices):
                raise UserError(
                    f"{where}: label {label} is outside the {len(choices)} choices (0-based)"
                )
            doc_id = str(obj.get("id", lineno))
            if doc_id in seen:
                raise UserError(f"{where}: duplicate id {doc_id!r}")
            seen.add(doc_id)
            subject = obj.get("subject")
            docs.append(
                Doc(
                    id=doc_id,
                    query=context,
                    choices=tuple(choices),
                    label=label,
                    subject=str(subject) if subject is not None else None,
                )
            )
    if not docs:
        raise UserError(f"task file {path} holds no questions")
    return docs
