"""Task-file templates evaluated without Jinja's machinery (taskfile's fast paths) give exactly
what Jinja gives: every built-in task's questions, and the same failures on bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation import taskfile
from calibrated_lm.evaluation.taskfile import (
    BUILTIN_DIR,
    RowError,
    Scope,
    builtin_stems,
    compile_expression,
    compile_template,
    read_task_file,
)
from calibrated_lm.evaluation.tasks import Task


def _docs(stem: str, fast: bool, monkeypatch: pytest.MonkeyPatch, limit: int | None) -> dict:
    monkeypatch.setattr(taskfile, "FAST_PATHS", fast)
    task = Task(read_task_file(BUILTIN_DIR / f"{stem}.yaml", builtin=True), stem)
    return {
        split: [
            (d.id, d.query, d.choices, d.label, d.subject, d.description, d.contexts)
            for d in task.docs(split, limit)
        ]  # fmt: skip
        for split in task.definition.splits
    }


@pytest.mark.parametrize("stem", builtin_stems())
def test_builtin_tasks_build_the_same_questions_with_and_without_fast_paths(
    stem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HellaSwag whole (its choices go through map/replace/regex_replace); others in part.
    limit = None if stem == "hellaswag" else 3 if stem == "mmlu" else 300
    try:
        slow = _docs(stem, False, monkeypatch, limit)
    except (UserError, FileNotFoundError) as exc:  # pragma: no cover - data not installed here
        pytest.skip(f"{stem}: {exc}")
    fast = _docs(stem, True, monkeypatch, limit)
    assert fast == slow


EXPRESSIONS = [
    "endings | map('trim') | map('replace', ' [title]', '. ') | list",
    "endings | map('regex_replace', '\\\\[.*?\\\\]', '') | map('upper') | list",
    "(a ~ ': ' ~ b | capitalize) | trim | replace('  ', ' ')",
    "a ~ n ~ 1.5",
    "'constant'",
    "n | int",
    "empty | map('trim') | list",
    "missing | trim",
    "a ~ missing",
    "n | trim | lower",
]


@pytest.mark.parametrize("text", EXPRESSIONS)
def test_fast_expressions_match_jinja_values_and_failures(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = {"endings": [" a [title]b ", "[x] c  d", "E"], "a": " Hi  there ", "b": "yes [z]",
           "n": "7", "empty": []}  # fmt: skip
    results = []
    for fast in (False, True):
        monkeypatch.setattr(taskfile, "FAST_PATHS", fast)
        f = compile_expression(Path("t.yaml"), "choices", text)
        try:
            results.append(("value", f(Scope(dict(row)))))
        except RowError as exc:
            results.append(("error", str(exc), exc.missing))
    assert results[0] == results[1]


def test_fast_templates_render_expressions_as_jinja(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "Q: {{ (a ~ ' ' ~ b | capitalize) | trim }}? {{ n }}{{ 3 }}\n"
    out = []
    for fast in (False, True):
        monkeypatch.setattr(taskfile, "FAST_PATHS", fast)
        t = compile_template(Path("t.yaml"), "text", text)
        out.append(t(Scope({"a": " x ", "b": "yes", "n": 2})))
    assert out[0] == out[1] == "Q: x  Yes? 23\n"


def test_a_hellaswag_expression_takes_the_fast_path() -> None:
    # The point of the fast path: HellaSwag's choices do not go through Jinja's renderer.
    text = "endings | map('trim') | map('regex_replace', '\\\\[.*?\\\\]', '') | list"
    f = compile_expression(Path("t.yaml"), "choices", text)
    scope = Scope({"endings": [" a[b] "]})
    assert f(scope) == ["a"]
    assert scope._context is None  # no Jinja context was made
