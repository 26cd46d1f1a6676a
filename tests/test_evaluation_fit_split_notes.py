"""``eval --fit-split`` says which tasks it scores nothing extra for (no split to fit a
temperature on, or that split is the one scored) instead of leaving them out silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_eval import eval_config
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.evaluation.runner import EvalConfig, fit_split_notes, run_eval
from calibrated_lm.evaluation.tasks import resolve_tasks


def _notes(**kw) -> list[str]:
    cfg = EvalConfig(model="m", tasks=["hellaswag", "arc_easy"], output=Path("o"), **kw)
    return fit_split_notes(cfg, resolve_tasks("hellaswag,arc_easy"))


def test_builtin_tasks() -> None:
    # HellaSwag names no fit split; ARC-Easy fits on validation while test is scored.
    (note,) = _notes(fit_split=True)
    assert note.startswith("note: --fit-split: task hellaswag names no split")
    # Scoring ARC-Easy's validation split leaves nothing to fit on either.
    notes = _notes(fit_split=True, split="validation")
    assert (
        len(notes) == 2 and "arc_easy would fit on validation, the split being scored" in notes[1]
    )


def test_run_prints_the_note_and_writes_no_fit_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_tiny_lm(tmp_path / "tiny")
    task = tmp_path / "tiny_task.jsonl"  # a JSONL task: no fit split
    rows = [
        {"context": f"Q{i}:", "choices": ["a", "b"], "label": i % 2, "id": f"q{i}"}
        for i in range(4)
    ]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_eval(eval_config(model, task, tmp_path / "out", fit_split=True))
    err = capsys.readouterr().err
    assert "note: --fit-split: task tiny_task names no split" in err
    assert not (tmp_path / "out" / "samples_validation.jsonl").exists()
    capsys.readouterr()
    run_eval(eval_config(model, task, tmp_path / "out2"))  # no --fit-split: no note
    assert "--fit-split" not in capsys.readouterr().err
