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


def test_a_launched_rank_ends_with_the_commands_status_and_its_output(tmp_path: Path) -> None:
    """Under a launcher (WORLD_SIZE > 1) ``main`` ends the process itself (so that no C++
    thread torn down in interpreter shutdown can turn a finished rank into an abort): the
    status must still be the command's, and piped, block-buffered output must not be lost."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    env.pop("PYTHONUNBUFFERED", None)
    # "before" waits in the pipe's buffer: only a flush before the exit delivers it.
    code = "from calibrated_lm.cli import main; print('before'); main(); print('returned')"
    run = [sys.executable, "-c", code]
    missing = tmp_path / "missing.jsonl"
    proc = subprocess.run(
        [*run, "metrics", str(missing)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and str(missing) in proc.stderr
    assert proc.stdout.startswith("before")
    assert "returned" not in proc.stdout  # ended in main, not after it

    samples = tmp_path / "s.jsonl"
    rows = [
        {"task": "quiz", "id": i, "choice_logprobs": [-0.1 * i, -1.0], "label": i % 2}
        for i in range(1, 9)
    ]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run(
        [*run, "metrics", str(samples), "--output", str(tmp_path / "m")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ece" in proc.stdout.lower()  # the table, flushed before the process ended
    assert "returned" not in proc.stdout
