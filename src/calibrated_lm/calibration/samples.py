"""Readers for per-question model outputs: our samples JSON Lines and lm-evaluation-harness
``--log_samples`` files, told apart by their first record.

Our format, one JSON object per line::

    {"task": "arc_challenge", "id": 17, "choice_logprobs": [-4.1, -2.3, -7.0], "label": 1,
     "subject": null, "choice_char_lengths": [12, 9, 15], "prompt": "...", "choices": [...]}

``choice_logprobs`` holds the summed log-likelihood of each choice; ``subject``,
``choice_char_lengths``, ``prompt`` and ``choices`` are optional. Items with a ``subject``
are reported per ``<task>_<subject>`` and pooled into ``<task>``.

An item has exactly as many choices as it lists scores. A log-likelihood of -infinity
(``-Infinity`` in JSON, ``"-inf"`` in harness files) is a real score, a choice of probability
0, wherever it sits; it is never taken for padding (see :mod:`calibrated_lm.calibration.scores`).
A gold choice scored -infinity is simply wrong with probability 0 (NLL +inf). Only an item
whose every choice is -infinity is refused.

lm-evaluation-harness 0.4.x writes ``samples_<task>_<date>.jsonl`` with one object per
document: ``doc_id``, ``doc``, ``target`` (a string since 0.4.3), ``arguments`` (per choice
request ``{"gen_args_i": {"arg_0": context, "arg_1": target_delimiter + choice}}``, a list of
pairs in older versions), ``resps`` / ``filtered_resps`` (per request ``["-1.23", "False"]``:
log-likelihood and is-greedy, as strings since 0.4.3). The task name comes from the file name;
``mmlu_<subject>`` tasks are pooled into ``mmlu``. The gold index is ``target`` read as an
index or matched against the choice texts (the harness's own rule), falling back to the doc's
``label``/``gold``/``answer``; when both readings are possible, the one that agrees with the
logged ``acc`` wins. Character lengths (for ``--normalization chars``) are those of the choice
texts without the leading target delimiter, as the harness's ``acc_norm`` uses.

Every problem raises ``UserError`` naming the file and line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibrated_lm.errors import UserError

_LM_EVAL_NAME = re.compile(
    r"^samples_(?P<task>.+?)_(?P<date>\d{4}-\d{2}-\d{2}T\d{2}[-:]\d{2}[-:]\d{2}(?:\.\d+)?)$"
)
_INT = re.compile(r"^\s*-?\d+\s*$")


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


def _records(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        # Binary, decoded line by line inside the try below: a text-mode handle would raise
        # UnicodeDecodeError from the iteration itself, outside any line's error handling.
        handle = path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a .jsonl samples file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _fail(
                    path,
                    lineno,
                    f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); save the file as UTF-8",
                ) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _fail(path, lineno, f"invalid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise _fail(path, lineno, "expected a JSON object per line")
            yield lineno, obj


def _number_list(value: Any, path: Path, line: int, key: str, positive: bool = False) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise _fail(path, line, f'"{key}" must be a non-empty list of numbers')
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise _fail(path, line, f'"{key}" must contain only numbers')
    a = np.asarray(value, dtype=np.float64)
    if np.isnan(a).any() or np.isposinf(a).any():
        raise _fail(path, line, f'"{key}" contains NaN or +infinity')
    if positive and not (np.isfinite(a).all() and (a > 0).all()):
        raise _fail(path, line, f'"{key}" must hold positive lengths')
    return a


def _add(
    tasks: dict[str, TaskSamples],
    name: str,
    group: str | None,
    item_id: Any,
    scores: np.ndarray,
    label: int,
    lengths: np.ndarray | None,
    path: Path,
    line: int,
    seen: dict[tuple[str, str], str],
    token_counts: np.ndarray | None = None,
) -> None:
    key = (name, json.dumps(item_id, sort_keys=True))
    if key in seen:
        raise _fail(path, line, f"duplicate id {item_id!r} in task {name!r} (first at {seen[key]})")
    seen[key] = f"{path}:{line}"
    t = tasks.setdefault(name, TaskSamples(name=name, group=group))
    if t.group != group:
        raise _fail(path, line, f"task {name!r} is both a group member and a task")
    if not np.isfinite(scores).any():
        raise _fail(path, line, "every choice has log-likelihood -infinity")
    # A 1-D array per item, so its length stays the item's choice count (-inf included).
    t.choice_scores.append(np.asarray(scores, dtype=np.float64).reshape(-1))
    t.labels.append(label)
    t.choice_char_lengths.append(lengths)
    t.choice_token_counts.append(token_counts)
    t.ids.append(item_id)
    t.sources.append(f"{path}:{line}")


def _read_ours(path: Path, records, tasks, seen) -> None:
    for line, obj in records:
        for key in ("task", "id", "choice_logprobs", "label"):
            if key not in obj:
                raise _fail(path, line, f'missing field "{key}"')
        task = obj["task"]
        if not isinstance(task, str) or not task:
            raise _fail(path, line, '"task" must be a non-empty string')
        scores = _number_list(obj["choice_logprobs"], path, line, "choice_logprobs")
        label = obj["label"]
        if not isinstance(label, int) or isinstance(label, bool):
            raise _fail(path, line, f'"label" must be an integer, got {label!r}')
        if not 0 <= label < scores.shape[0]:
            raise _fail(
                path, line, f"label {label} is outside the {scores.shape[0]} choices (0-based)"
            )
        lengths = None
        if obj.get("choice_char_lengths") is not None:
            lengths = _number_list(
                obj["choice_char_lengths"], path, line, "choice_char_lengths", positive=True
            )
        elif isinstance(obj.get("choices"), list) and all(
            isinstance(c, str) and c for c in obj["choices"]
        ):
            lengths = np.array([len(c) for c in obj["choices"]], dtype=np.float64)
        if lengths is not None and lengths.shape != scores.shape:
            raise _fail(
                path,
                line,
                f"{lengths.shape[0]} choice lengths for {scores.shape[0]} choice_logprobs",
            )
        counts = None
        if obj.get("choice_token_counts") is not None:
            counts = _number_list(
                obj["choice_token_counts"], path, line, "choice_token_counts", positive=True
            )
            if counts.shape != scores.shape:
                raise _fail(
                    path,
                    line,
                    f"{counts.shape[0]} choice token counts for {scores.shape[0]} choice_logprobs",
                )
        subject = obj.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise _fail(path, line, '"subject" must be a string or null')
        name, group = (f"{task}_{subject}", task) if subject else (task, None)
        _add(tasks, name, group, obj["id"], scores, label, lengths, path, line, seen, counts)


def _loglik(entry: Any, path: Path, line: int) -> float:
    """The log-likelihood of one harness request response: ["-1.23", "False"] or similar."""
    value = entry
    while isinstance(value, list | tuple) and value:
        value = value[0]
    if isinstance(value, str):
        m = re.match(r"^\s*\(?\s*([-+0-9.eEinfINFna]+)", value)
        value = m.group(1) if m else value
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise _fail(path, line, f"cannot read a log-likelihood from {entry!r}") from None
    if np.isnan(x) or x == np.inf:
        raise _fail(path, line, f"log-likelihood {entry!r} is not a number below +infinity")
    return x


def _continuations(arguments: Any, k: int) -> list[str] | None:
    if isinstance(arguments, dict):
        reqs = [arguments.get(f"gen_args_{i}") for i in range(k)]
        conts = [r.get("arg_1") if isinstance(r, dict) else None for r in reqs]
    elif isinstance(arguments, list) and len(arguments) >= k:
        conts = [a[1] if isinstance(a, list) and len(a) > 1 else None for a in arguments[:k]]
    else:
        return None
    if not all(isinstance(c, str) for c in conts):
        return None
    # The harness prepends its target delimiter (a space by default) to every choice.
    return [c[1:] if c.startswith(" ") else c for c in conts]


def _gold(obj: dict, scores: np.ndarray, choices: list[str] | None, path: Path, line: int) -> int:
    k = scores.shape[0]
    target = obj.get("target")
    if isinstance(target, list) or (isinstance(target, str) and target.strip().startswith("[")):
        raise _fail(path, line, f"multiple gold answers (target {target!r}) are not supported")
    as_index = None
    as_text = None
    if isinstance(target, int) and not isinstance(target, bool):
        as_index = target
    elif isinstance(target, str):
        if _INT.match(target):
            as_index = int(target)
        if choices is not None:
            stripped = [c.strip() for c in choices]
            if target in choices:
                as_text = choices.index(target)
            elif target.strip() in stripped:
                as_text = stripped.index(target.strip())
    if as_index is not None and not 0 <= as_index < k:
        if as_text is None:
            raise _fail(path, line, f"target {target!r} is outside the {k} choices (0-based)")
        as_index = None
    if as_index is not None and as_text is not None and as_index != as_text:
        acc = obj.get("acc")
        pred = int(np.argmax(scores))
        if isinstance(acc, int | float) and (pred == as_text) == bool(acc) != (pred == as_index):
            return as_text
        return as_index
    if as_index is not None:
        return as_index
    if as_text is not None:
        return as_text
    doc = obj.get("doc") if isinstance(obj.get("doc"), dict) else {}
    for key in ("label", "gold", "answer"):
        v = doc.get(key)
        if isinstance(v, str) and _INT.match(v):
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < k:
            return v
    raise _fail(path, line, f"cannot find the gold choice (target {target!r}, {k} choices)")


def lm_eval_task_name(path: Path) -> str:
    """The task of an lm-eval ``samples_<task>_<date>.jsonl`` file, from its name."""
    return _lm_eval_task(path)


def _lm_eval_task(path: Path) -> str:
    m = _LM_EVAL_NAME.match(path.stem)
    if m:
        return m.group("task")
    return path.stem[len("samples_") :] if path.stem.startswith("samples_") else path.stem


def _read_lm_eval(path: Path, records, tasks, seen) -> None:
    name = _lm_eval_task(path)
    group = "mmlu" if name.startswith("mmlu_") else None
    first_filter = None
    for line, obj in records:
        if "filter" in obj:
            first_filter = obj["filter"] if first_filter is None else first_filter
            if obj["filter"] != first_filter:
                continue  # one filter per report: the first one in the file
        if "doc_id" not in obj:
            raise _fail(path, line, 'missing field "doc_id"')
        resps = obj.get("filtered_resps", obj.get("resps"))
        if not isinstance(resps, list) or not resps:
            raise _fail(path, line, 'missing or empty "filtered_resps"/"resps"')
        scores = np.array([_loglik(r, path, line) for r in resps])
        if scores.shape[0] < 2:
            raise _fail(
                path, line, "one response per document: not a multiple-choice task's samples"
            )
        choices = _continuations(obj.get("arguments"), scores.shape[0])
        if choices is not None and len(set(choices)) == 1:
            # Multiple-input tasks (winogrande) put the choices in the contexts and log the
            # shared continuation as target, so the file does not say which index is gold.
            raise _fail(
                path,
                line,
                "every choice has the same continuation (a multiple-input task such as "
                "winogrande): the gold choice cannot be read from this file",
            )
        label = _gold(obj, scores, choices, path, line)
        lengths = None
        if choices is not None and all(choices):
            lengths = np.array([len(c) for c in choices], dtype=np.float64)
        _add(tasks, name, group, obj["doc_id"], scores, label, lengths, path, line, seen)


def read_samples(
    paths: Sequence[str | Path] | str | Path, *, normalization: str = "none"
) -> dict[str, TaskSamples]:
    """Read samples files (format detected per file) into tasks keyed by name.

    With ``normalization="chars"`` every item must carry character lengths (ours:
    ``choice_char_lengths`` or ``choices``; harness: the request continuations); with
    ``"tokens"``, token counts (ours: ``choice_token_counts``, written by ``calibrated-lm
    eval``; the harness does not log them).
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    if normalization not in ("none", "chars", "tokens"):
        raise UserError(f"unknown normalization {normalization!r}: choose none, chars or tokens")
    tasks: dict[str, TaskSamples] = {}
    seen: dict[tuple[str, str], str] = {}
    for p in paths:
        path = Path(p)
        records = iter(_records(path))
        first = next(records, None)
        if first is None:
            raise UserError(f"{path}: no samples (the file is empty)")
        line, obj = first

        def chained(first=first, records=records):
            yield first
            yield from records

        if "choice_logprobs" in obj:
            _read_ours(path, chained(), tasks, seen)
        elif "doc_id" in obj and ("filtered_resps" in obj or "resps" in obj):
            _read_lm_eval(path, chained(), tasks, seen)
        else:
            raise _fail(
                path,
                line,
                'unrecognised samples format: expected our JSONL ("task", "id", '
                '"choice_logprobs", "label") or lm-evaluation-harness --log_samples '
                '("doc_id", "filtered_resps", "target")',
            )
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
