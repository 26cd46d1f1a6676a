"""The dispatcher turns user-caused failures into one sentence and an exit status."""

from __future__ import annotations

import json
from pathlib import Path

from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.cli import main


def test_unwritable_output_is_a_sentence_not_a_traceback(tmp_path: Path, capsys) -> None:
    model = build_tiny_lm(tmp_path / "tiny")
    task = tmp_path / "qa.jsonl"
    task.write_text(json.dumps({"context": "Q?", "choices": ["a", "b"], "label": 0}) + "\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(
        ["eval", "--model", str(model), "--tasks", str(task), "--output", str(blocker / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: Not a directory: {blocker / 'out'}" in err
    assert "Traceback" not in err
