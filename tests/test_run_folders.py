"""run_folders: each command's marker files are the names its own code writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.run_file import RUN_FILE
from calibrated_lm.run_folders import MARKERS, refuse_other_runs
from calibrated_lm.training.checkpoint import checkpoint_root
from calibrated_lm.training.loop import METRICS_FILE


def test_markers_are_the_commands_own_file_names() -> None:
    assert MARKERS["eval"] == (RUN_FILE,)
    assert MARKERS["train"] == (METRICS_FILE, checkpoint_root(Path(".")).name)


def test_a_command_is_refused_only_in_another_commands_folder(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    refuse_other_runs(tmp_path, "train")  # its own folder
    for command in ("eval", "metrics", "capacity"):
        with pytest.raises(UserError, match=r"holds a calibrated-lm train run \(checkpoints\)"):
            refuse_other_runs(tmp_path, command)
    refuse_other_runs(tmp_path / "missing", "eval")  # a fresh folder
