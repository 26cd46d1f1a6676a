"""The unit of evaluation: one multiple-choice question, as data.

A task file's templates (:mod:`calibrated_lm.evaluation.taskfile`) turn each row of its data
(Arrow folders, OLMES request files, JSON Lines, JSON) into a :class:`Doc`;
:func:`calibrated_lm.evaluation.tasks.build_items` turns docs into the requests the model scores.
Keeping the two apart lets few-shot examples reuse a question's own prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class Doc:
    """One question in harness terms.

    ``query`` is ``doc_to_text`` (the prompt without few-shot examples or description),
    ``choices`` is ``doc_to_choice`` (the strings scored, e.g. answer texts or letters) and
    ``label`` the index of the right choice. ``contexts`` is set only for tasks whose choices
    differ in the context rather than in the continuation (Winogrande: one context per option,
    one shared continuation, ``choices`` then holds that single continuation per option).
    ``description`` is prepended once before any few-shot examples (MMLU's subject line).
    """

    id: str
    query: str
    choices: tuple[str, ...]
    label: int
    subject: str | None = None
    description: str = ""
    contexts: tuple[str, ...] | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Item:
    """A question ready to score: one ``(context, continuation)`` request per choice."""

    task: str
    id: str
    requests: tuple[tuple[str, str], ...]
    label: int
    choices: tuple[str, ...]
    subject: str | None = None
    split: str = "test"

    @cached_property
    def requests_sha256(self) -> str:
        """:func:`calibrated_lm.evaluation.samples_file.request_sha256` of the requests,
        computed once (a resumed run compares it with every stored record, then stores it)."""
        from calibrated_lm.evaluation.samples_file import request_sha256

        return request_sha256(self.requests)

    @property
    def choice_char_lengths(self) -> list[int]:
        """Characters per choice, the length lm-evaluation-harness' acc_norm divides by."""
        return [len(c) for c in self.choices]
