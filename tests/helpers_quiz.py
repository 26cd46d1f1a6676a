"""A small multiple-choice quiz for the head-subset and scoring-transform tests: answer words,
their token ids, a JSONL task file of them and scorer items (shared so that each test file
states only what it changes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calibrated_lm.evaluation.items import Item

WORDS = ["carbon dioxide", "water", "the sun", "Paris", "France"]
CONTEXT = "Question {i}: which one?\nAnswer:"


def answer_token_ids(tok: Any, words: list[str] = WORDS) -> list[int]:
    """Sorted ids of every token of " " + word, as the scorer's continuations hold them."""
    return sorted({t for w in words for t in tok(" " + w).input_ids})


def write_quiz(path: Path, n: int) -> Path:
    """``n`` questions; question i offers the first 2 + i % 4 words, gold i % 2."""
    rows = [
        {"context": CONTEXT.format(i=i), "choices": WORDS[: 2 + i % 4], "label": i % 2,
         "id": f"q{i}"}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_choice_sets(path: Path, choice_sets: list[list[str]]) -> Path:
    """One question per choice list, gold the first choice."""
    rows = [
        {"context": CONTEXT.format(i=i), "choices": c, "label": 0, "id": f"q{i}"}
        for i, c in enumerate(choice_sets)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gas_items() -> list[Item]:
    """Three scorer items on one context, with the last 5, 4 and 3 words as choices."""
    ctx = "Question: which gas do plants take in?\nAnswer:"
    return [
        Item(task="t", id=str(i), requests=tuple((ctx, " " + w) for w in WORDS[i:]), label=0,
             choices=tuple(WORDS[i:]))
        for i in range(3)
    ]  # fmt: skip
