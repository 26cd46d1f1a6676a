"""summarize_tasks: per-task entries, groups, the pooled ``all`` entry and the protocol."""

from __future__ import annotations

import numpy as np
import pytest

from calibrated_lm.calibration import summarize, summarize_tasks

A = ([[-1.0, -2.0, -3.0], [-2.0, -0.5], [-0.5, -3.0, -2.0, -1.0]], [0, 1, 3])
B = (np.array([[-1.0, -2.0, -np.inf], [-3.0, -1.0, -2.0]]), [1, 1])


def test_tasks_groups_and_pooled_all():
    out = summarize_tasks(
        {"a": A, "b": B, "c": A}, protocol={"model": "m"}, groups={"ac": ["a", "c"]},
        bootstrap=30, n_bins=4,
    )  # fmt: skip
    assert out["protocol"] == {
        "model": "m", "normalization": "none", "n_bins": 4, "binning": "width", "bootstrap": 30,
        "seed": 0,
    }  # fmt: skip
    tasks = out["tasks"]
    assert list(tasks) == ["a", "b", "c", "ac", "all"]
    assert tasks["ac"]["n"] == 6 and tasks["all"]["n"] == 8
    # "all" pools the items in task order (a, b, c), so its bootstrap draws are reproducible.
    pooled = summarize(A[0] + [r[np.isfinite(r)] for r in B[0]] + A[0], A[1] + B[1] + A[1],
                       bootstrap=30, n_bins=4)  # fmt: skip
    assert tasks["all"]["ece"] == pytest.approx(pooled["ece"])
    assert tasks["all"]["ece_ci95"] == pytest.approx(pooled["ece_ci95"])
    assert tasks["b"]["accuracy"] == 0.5 and tasks["b"]["n_choices"] == {"min": 2, "max": 3}


def test_each_task_s_bootstrap_is_counted_on_a_bar(monkeypatch):
    from helpers_progress import recording_bars

    bars = recording_bars(monkeypatch)
    summarize_tasks({"a": A, "b": B}, protocol={}, bootstrap=30, progress=True)
    draws = [b for b in bars if b["desc"] != "tasks"]
    assert draws == [
        {"desc": f"{name} bootstrap", "total": 30, "n": 30} for name in ("a", "b", "all")
    ]
    bars.clear()
    summarize_tasks({"a": A}, protocol={}, bootstrap=30)  # no progress asked: no bars
    assert bars == []


def test_single_task_all_equals_the_task_and_chars_lengths_are_per_task():
    lengths = {"a": [[1, 2, 3], [1, 1], [2, 2, 2, 2]]}
    out = summarize_tasks({"a": A}, protocol={}, choice_char_lengths=lengths,
                          normalization="chars", bootstrap=0)  # fmt: skip
    assert out["tasks"]["all"] == out["tasks"]["a"]
    direct = summarize(*A, choice_char_lengths=lengths["a"], normalization="chars", bootstrap=0)
    assert out["tasks"]["a"]["nll"] == pytest.approx(direct["nll"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": {}}, "no tasks"),
        ({"tasks": {"all": A}}, '"all" is reserved'),
        ({"tasks": {"a": A}, "groups": {"g": ["a", "zzz"]}}, "unknown tasks: zzz"),
        ({"tasks": {"a": A}, "groups": {"a": ["a"]}}, "same name as a task"),
        ({"tasks": {"a": A}, "normalization": "chars"}, "needs per-choice lengths for 'a'"),
        ({"tasks": {"a": A}, "normalization": "tokens"}, "needs per-choice lengths for 'a'"),
        ({"tasks": {"a": (A[0], [0, 1])}}, "task 'a': length mismatch"),
    ],
)
def test_summarize_tasks_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        summarize_tasks(protocol={}, bootstrap=0, **kwargs)
