"""Read published multiple-choice letter logits (one CSV per MMLU subject) as samples records.

The input is not our samples format (it is CSV, not JSON Lines), so this is a reader of its own;
what it returns is the one typed samples record,
:class:`~calibrated_lm.calibration.record.SampleRecord` (task ``mmlu``, the subject, so that
:func:`~calibrated_lm.calibration.record.task_name` groups it like any MMLU question), which
the rest of the package reads, groups and writes like any other.

The layout is the one of the calibration study whose Llama-3.1-70B base and Instruct MMLU
logits ``../shared/data/public_logits/`` holds: a folder of ``<subject>_test_logits.csv``, each
with a header row and one row per question::

    0,1,2,3,4,5,Logit_A,Logit_B,Logit_C,Logit_D,Predicted,Correct
    question, choice A, choice B, choice C, choice D, gold letter, 4 logits, predicted, (unused)

Column ``5`` is the gold letter (A-D) and ``Logit_X`` the next-token logit of letter X after a
5-shot prompt. Confidence is the softmax over the four letters, so the logits serve directly as
``choice_logprobs`` (the softmax is invariant to a shift shared by the four). Question ids are
``<subject>/<row>`` (row counted from 0 after the header), the same for every model, so two
folders pair question by question.

Every problem raises :class:`~calibrated_lm.errors.UserError` as ``FILE:LINE: what is wrong``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from calibrated_lm.calibration.record import SampleRecord
from calibrated_lm.errors import UserError

LETTERS = ("A", "B", "C", "D")
LOGIT_COLUMNS = tuple(f"Logit_{x}" for x in LETTERS)
GOLD_COLUMN = "5"
SUFFIX = "_test_logits.csv"


def _fail(path: Path, line: int, msg: str) -> UserError:
    return UserError(f"{path}:{line}: {msg}")


def read_letter_logits_file(path: str | Path, subject: str | None = None) -> list[SampleRecord]:
    """Records (task ``mmlu``, ``subject``, ``id``, ``choice_logprobs``, ``label``,
    ``choices``, ``source`` = "file:line") of one CSV.

    ``subject`` defaults to the file name without ``_test_logits.csv``. Line numbers in errors
    are the file's own (the header is line 1).
    """
    path = Path(path)
    subject = subject or path.name.removesuffix(SUFFIX)
    try:
        handle = path.open(encoding="utf-8", newline="")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    records: list[SampleRecord] = []
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise _fail(path, 1, "empty file: expected a header row")
            col = {name: i for i, name in enumerate(header)}
            missing = [c for c in (GOLD_COLUMN, *LOGIT_COLUMNS) if c not in col]
            if missing:
                raise _fail(
                    path, 1, f"missing column {', '.join(repr(m) for m in missing)} in the header"
                )
            choice_cols = [col.get(str(k)) for k in range(1, 5)]
            width = max(col[c] for c in (GOLD_COLUMN, *LOGIT_COLUMNS)) + 1
            for row_no, row in enumerate(reader):
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) < width:
                    raise _fail(path, line, f"{len(row)} fields, expected at least {width}")
                logits = []
                for name in LOGIT_COLUMNS:
                    text = row[col[name]].strip()
                    try:
                        value = float(text)
                    except ValueError:
                        raise _fail(path, line, f"{name} is not a number: {text!r}") from None
                    if not math.isfinite(value):
                        raise _fail(path, line, f"{name} is not finite: {text!r}")
                    logits.append(value)
                gold = row[col[GOLD_COLUMN]].strip()
                if gold not in LETTERS:
                    raise _fail(path, line, f"gold letter {gold!r} is not one of A, B, C, D")
                records.append(
                    SampleRecord(
                        task="mmlu",
                        id=f"{subject}/{row_no}",
                        choice_logprobs=tuple(logits),
                        label=LETTERS.index(gold),
                        subject=subject,
                        choices=tuple(row[c] if c is not None else "" for c in choice_cols),
                        source=f"{path}:{line}",
                    )
                )
        except UnicodeDecodeError:
            raise _fail(path, reader.line_num + 1, "not UTF-8 text") from None
        except csv.Error as exc:
            raise _fail(path, reader.line_num, f"malformed CSV ({exc})") from None
    if not records:
        raise UserError(f"{path}: no question rows after the header")
    return records


def read_letter_logits(folder: str | Path) -> list[SampleRecord]:
    """Records of every ``*_test_logits.csv`` in ``folder``, subjects in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of *{SUFFIX} files")
    files = sorted(folder.glob(f"*{SUFFIX}"))
    if not files:
        raise UserError(f"{folder}: holds no *{SUFFIX} file")
    out: list[SampleRecord] = []
    for f in files:
        out.extend(read_letter_logits_file(f))
    return out
