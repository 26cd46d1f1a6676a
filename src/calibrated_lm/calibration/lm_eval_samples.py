"""lm-evaluation-harness ``--log_samples`` files as :class:`SampleRecord` questions.

lm-evaluation-harness 0.4.x writes ``samples_<task>_<date>.jsonl`` with one object per
document: ``doc_id``, ``doc``, ``target`` (a string since 0.4.3), ``arguments`` (per choice
request ``{"gen_args_i": {"arg_0": context, "arg_1": target_delimiter + choice}}``, a list of
pairs in older versions), ``resps`` / ``filtered_resps`` (per request ``["-1.23", "False"]``:
log-likelihood and is-greedy, as strings since 0.4.3). The task name comes from the file name;
``mmlu_<subject>`` tasks become questions of task ``mmlu`` with that subject (so the one naming
rule, :func:`calibrated_lm.calibration.record.task_name`, gives ``mmlu_<subject>`` back). The
gold index is ``target`` read as an index or matched against the choice texts (the harness's
own rule), falling back to the doc's ``label``/``gold``/``answer``; when both readings are
possible, the one that agrees with the logged ``acc`` wins. Choice texts (for ``--normalization
chars``) are the request continuations without the leading target delimiter, as the harness's
``acc_norm`` uses. Every problem raises ``UserError`` naming the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from calibrated_lm.calibration.record import SampleRecord
from calibrated_lm.errors import UserError

_LM_EVAL_NAME = re.compile(
    r"^samples_(?P<task>.+?)_(?P<date>\d{4}-\d{2}-\d{2}T\d{2}[-:]\d{2}[-:]\d{2}(?:\.\d+)?)$"
)
_INT = re.compile(r"^\s*-?\d+\s*$")
# The harness's MMLU subtasks, pooled into the group ``mmlu``.
_GROUP_PREFIXES = ("mmlu",)


def is_lm_eval_record(obj: dict) -> bool:
    """Whether a samples line looks like the harness's (``doc_id`` and responses)."""
    return "doc_id" in obj and ("filtered_resps" in obj or "resps" in obj)


def _fail(path: Path, line: int, msg: str) -> UserError:
    return UserError(f"{path}:{line}: {msg}")


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


def read_lm_eval_records(path: Path, records: Iterable[tuple[int, dict]]) -> Iterator[SampleRecord]:
    """The questions of one harness file, from its (line number, object) pairs."""
    name = _lm_eval_task(path)
    group = next((g for g in _GROUP_PREFIXES if name.startswith(g + "_")), None)
    task, subject = (group, name[len(group) + 1 :]) if group else (name, None)
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
        yield SampleRecord(
            task=task,
            id=obj["doc_id"],
            choice_logprobs=tuple(float(x) for x in scores),
            label=_gold(obj, scores, choices, path, line),
            subject=subject,
            choices=tuple(choices) if choices is not None else None,
            source=f"{path}:{line}",
        )
