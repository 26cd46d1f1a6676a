"""The run-folder lock: a second process is refused with one sentence naming the holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from calibrated_lm.cli import main
from calibrated_lm.errors import UserError
from calibrated_lm.runlock import LOCK_NAME, run_lock

HOLDER = """
import sys
from calibrated_lm.runlock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # hold until the parent closes our stdin
"""


class Holder:
    """Another process holding the lock on ``folder`` until :meth:`release` (or a kill)."""

    def __init__(self, folder: Path) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", self.proc.stderr.read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


@pytest.fixture
def holder(tmp_path: Path):
    held: list[Holder] = []

    def start(folder: Path) -> Holder:
        h = Holder(folder)
        held.append(h)
        return h

    yield start
    for h in held:
        if h.proc.poll() is None:
            h.kill()


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path, holder) -> None:
    folder = tmp_path / "run"
    h = holder(folder)
    assert (folder / LOCK_NAME).read_text().strip() == str(h.pid)
    with pytest.raises(UserError) as exc:
        with run_lock(folder):
            pass
    assert str(exc.value) == f"{folder} is in use by process {h.pid}"
    h.release()
    assert not (folder / LOCK_NAME).exists()  # an idle folder has no lock file
    with run_lock(folder) as path:
        assert path.read_text().strip() == str(os.getpid())
    assert not path.exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path, holder) -> None:
    folder = tmp_path / "run"
    h = holder(folder)
    h.kill()  # the lock file stays (with the dead PID), the kernel dropped the lock
    assert (folder / LOCK_NAME).exists()
    with run_lock(folder) as path:
        assert path.read_text().strip() == str(os.getpid())


def test_lock_is_released_on_error_and_is_not_reentrant(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(RuntimeError):
        with run_lock(folder):
            raise RuntimeError("boom")
    with run_lock(folder):
        with pytest.raises(UserError, match=f"is in use by process {os.getpid()}"):
            with run_lock(folder):
                pass
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_a_folder_the_lock_created_is_removed_when_still_empty(tmp_path: Path) -> None:
    with run_lock(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b").is_dir()
    assert not (tmp_path / "a").exists()
    with run_lock(tmp_path / "c") as path:
        (path.parent / "result.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["result.json"]
    with run_lock(tmp_path / "d", active=False):  # the other ranks of a launch: nothing
        assert not (tmp_path / "d").exists()


def _quiz(tmp_path: Path) -> Path:
    task = tmp_path / "quiz.jsonl"
    rows = [{"context": f"Q{i}?", "choices": ["a", "b"], "label": i % 2} for i in range(4)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return task


def test_commands_refuse_a_folder_in_use(tmp_path: Path, holder, capsys) -> None:
    from helpers_tiny_lm import build_tiny_lm

    model = build_tiny_lm(tmp_path / "model")
    task = _quiz(tmp_path)
    run = tmp_path / "run"
    base = ["eval", "--model", str(model), "--tasks", str(task), "--output", str(run)]
    base += ["--bootstrap", "0", "--device", "cpu", "--no-progress"]
    assert main(base) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    samples = run / "samples.jsonl"

    h = holder(run)
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err == f"error: {run} is in use by process {h.pid}\n"
    h.release()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before

    metrics_out = tmp_path / "metrics"
    h = holder(metrics_out)
    assert main(["metrics", str(samples), "--output", str(metrics_out), "--bootstrap", "0"]) == 2
    assert capsys.readouterr().err == f"error: {metrics_out} is in use by process {h.pid}\n"
    h.release()

    cmp_out = tmp_path / "cmp"
    h = holder(cmp_out)
    assert main(["compare", str(run), "--output", str(cmp_out), "--bootstrap", "0"]) == 2
    assert capsys.readouterr().err == f"error: {cmp_out} is in use by process {h.pid}\n"
    h.release()

    cap_out = tmp_path / "cap"
    h = holder(cap_out)
    assert (
        main(["capacity", "--model", str(model), "--samples", "2", "--output", str(cap_out)]) == 2
    )
    assert capsys.readouterr().err == f"error: {cap_out} is in use by process {h.pid}\n"
    h.release()


def test_train_refuses_an_output_in_use(tmp_path: Path, holder) -> None:
    from calibrated_lm.training.loop import TrainConfig, train

    out = tmp_path / "train"
    h = holder(out)
    cfg = TrainConfig(
        model=str(tmp_path / "no-such-model"),
        data=str(tmp_path / "no-such-data.jsonl"),
        output=str(out),
        progress=False,
        device="cpu",
    )
    with pytest.raises(UserError, match=f"^{out} is in use by process {h.pid}$"):
        train(cfg)
    h.release()
    assert not out.exists()  # the holder created it, and left it empty


def test_an_output_path_that_is_a_file_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text("{}\n")
    with pytest.raises(UserError, match="is a file, not a folder"):
        with run_lock(path):
            pass
    assert path.read_text() == "{}\n"
