"""The phases of an eval run before its first scored batch (summary timing; issue 15 asks for
start-to-first-batch on the GPU, so the breakdown must be on record): present, ordered and
consistent, None when a resumed run scores nothing; the process clock counts from the
process's own start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.evaluation.runner import EvalConfig, process_age_s, run_eval

PHASES = ("tasks_read_s", "model_load_s", "prepare_s")


def _task(path: Path, n: int = 6) -> Path:
    rows = [
        {"context": f"Question {i}: which?\nAnswer:", "choices": ["red", "blue"], "label": i % 2}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_phases_before_the_first_batch_are_recorded_and_add_up(tmp_path: Path) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = _task(tmp_path / "t.jsonl")
    cfg = EvalConfig(model=str(model), tasks=[str(task)], output=tmp_path / "out",
                     bootstrap=0, progress=False, batch_size="2", device="cpu")  # fmt: skip
    timing = run_eval(cfg)["protocol"]["timing"]
    assert all(timing[k] >= 0 for k in PHASES)
    first = timing["to_first_batch_s"]
    # The first batch comes after every phase (rounding to 0.01 s each) and before the end.
    assert sum(timing[k] for k in PHASES) <= timing["to_scoring_start_s"] + 0.03
    assert timing["to_scoring_start_s"] <= first
    assert first <= timing["total_s"]
    assert 0 <= timing["weights_load_s"] <= timing["model_load_s"]
    if timing["process_to_first_batch_s"] is not None:  # Linux
        assert timing["process_to_first_batch_s"] >= first
        assert timing["process_start_to_eval_s"] <= timing["process_to_first_batch_s"]
    again = run_eval(cfg)["protocol"]["timing"]  # resumed: nothing to score
    assert again["questions_scored_this_run"] == 0
    assert again["to_first_batch_s"] is None and again["process_to_first_batch_s"] is None
    assert again["weights_load_s"] is None  # nothing to score: the weights were not read


@pytest.mark.skipif(process_age_s() is None, reason="no /proc/self/stat here")
def test_process_age_counts_from_the_process_start() -> None:
    code = (
        "import time; time.sleep(1.5); "
        "from calibrated_lm.evaluation.runner import process_age_s; print(process_age_s())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    age = float(out.stdout.strip())
    assert age >= 1.5  # the sleep happened before the call, in the same process
    assert age < 100  # and not, say, the machine's uptime


def test_on_first_batch_gets_the_phases_once_when_the_first_window_is_on_disk(
    tmp_path: Path,
) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = _task(tmp_path / "t.jsonl")
    calls: list[tuple[dict, int]] = []
    out = tmp_path / "out"

    def hook(phases: dict) -> None:
        lines = (out / "samples.jsonl").read_text().count("\n")
        calls.append((phases, lines))

    cfg = EvalConfig(model=str(model), tasks=[str(task)], output=out, bootstrap=0,
                     progress=False, batch_size="2", device="cpu", on_first_batch=hook)  # fmt: skip
    timing = run_eval(cfg)["protocol"]["timing"]
    assert len(calls) == 1
    phases, lines = calls[0]
    assert lines >= 1  # the first window was written before the hook ran
    for k in (*PHASES, "to_scoring_start_s", "to_first_batch_s", "process_to_first_batch_s"):
        assert phases[k] == timing[k]
    calls.clear()
    run_eval(cfg)  # resumed: nothing scored, no first batch
    assert calls == []


def test_windows_start_small_then_double_up_to_the_window_size() -> None:
    from calibrated_lm.evaluation.runner import window_bounds

    assert window_bounds(0, 512) == []
    assert [e - s for s, e in window_bounds(2000, 512)] == [8, 16, 32, 64, 128, 256, 512, 512, 472]
    assert [e - s for s, e in window_bounds(20, 64)] == [1, 2, 4, 8, 5]
    assert window_bounds(3, 1) == [(0, 1), (1, 2), (2, 3)]
    for n, w in ((2000, 512), (7, 16), (1, 4)):
        bounds = window_bounds(n, w)
        assert bounds[0][0] == 0 and bounds[-1][1] == n  # every question, once, in order
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(e - s for s, e in bounds) <= w


def test_the_first_window_on_disk_holds_the_first_ramp_step(tmp_path: Path) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = _task(tmp_path / "t.jsonl")
    out = tmp_path / "out"
    lines: list[int] = []

    def hook(phases: dict) -> None:
        lines.append((out / "samples.jsonl").read_text().count("\n"))

    # batch 2: windows of max(16, 4) = 16 questions, so the first holds one question.
    cfg = EvalConfig(model=str(model), tasks=[str(task)], output=out, bootstrap=0,
                     progress=False, batch_size="2", device="cpu", on_first_batch=hook)  # fmt: skip
    run_eval(cfg)
    assert lines == [1]


def test_questions_sort_by_their_widest_row_packed_or_not() -> None:
    from calibrated_lm.evaluation.items import Item
    from calibrated_lm.evaluation.runner import _row_chars

    shared = Item(
        task="t", id="a", requests=(("Q?", " yes"), ("Q?", " no")), label=0, choices=("yes", "no")
    )
    apart = Item(
        task="t",
        id="b",
        requests=(("Q1?", " yes"), ("Q22?", " no")),
        label=0,
        choices=("yes", "no"),
    )
    assert _row_chars(shared, packs=True) == 2 + 4 + 3  # one row: context, both choices
    assert _row_chars(shared, packs=False) == 6  # one row per choice, the widest
    assert _row_chars(apart, packs=True) == _row_chars(apart, packs=False) == 7
