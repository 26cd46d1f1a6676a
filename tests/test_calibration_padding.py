"""-inf is a score, not padding, for per-item (ragged) inputs; only a 2-D array is padded.

A choice scored -inf has probability 0. Before, ragged rows were padded and then the trailing
-inf entries stripped as padding, so a gold last choice scored -inf failed with "label 3 but the
item has 3 choices" and a wrong last choice scored -inf silently disappeared.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from calibrated_lm.calibration import choice_probabilities, summarize
from calibrated_lm.calibration.report import summarize_tasks
from calibrated_lm.calibration.samples import read_samples
from calibrated_lm.calibration.scores import padded_scores
from calibrated_lm.cli import main

NEG = -np.inf


def test_ragged_rows_count_every_listed_choice():
    rows = [[-1.0, -2.0, NEG], [NEG, -1.0], [-0.5, NEG, -3.0, NEG]]
    s, k = padded_scores(rows)
    assert k.tolist() == [3, 2, 4]
    probs, k2 = choice_probabilities(rows)
    assert k2.tolist() == [3, 2, 4]
    assert probs[0, 2] == 0.0 and probs[1, 0] == 0.0 and probs[2, 3] == 0.0
    assert np.allclose(probs.sum(axis=1), 1.0)
    # Equal lengths, tuples and 1-D arrays are per-item rows just the same.
    assert padded_scores([[0.0, NEG], [0.0, -1.0]])[1].tolist() == [2, 2]
    assert padded_scores(((0.0, NEG),))[1].tolist() == [2]
    assert padded_scores([np.array([0.0, NEG, NEG])])[1].tolist() == [3]
    rows_as_objects = np.empty(2, dtype=object)
    rows_as_objects[:] = [np.array([0.0, NEG]), np.array([1.0])]
    assert padded_scores(rows_as_objects)[1].tolist() == [2, 1]


def test_a_2d_array_still_uses_trailing_minus_inf_as_padding():
    padded = np.array([[-1.0, -2.0, NEG], [-1.0, NEG, -3.0]])
    _, k = padded_scores(padded)
    assert k.tolist() == [2, 3]  # interior -inf is a choice, trailing -inf is padding
    with pytest.raises(ValueError, match="label 2 but the item has 2 choices"):
        summarize(padded, [2, 0], bootstrap=0)


def test_gold_last_choice_at_minus_inf_is_wrong_with_infinite_nll():
    """The issue's case: 3 choices, gold 2, scored -inf."""
    rows = [[-1.0, -2.0, NEG], [-1.0, -2.0, -3.0], [-3.0, -1.0, -2.0], [-1.0, -5.0]]
    labels = [2, 0, 1, 0]
    s = summarize(rows, labels, bootstrap=200, n_bins=5)
    assert s["accuracy"] == pytest.approx(0.75)  # item 0 counts as wrong
    assert s["nll"] == math.inf
    assert s["nll_ci95"][1] == math.inf and s["nll_ci95"][0] <= s["nll_ci95"][1]
    assert s["n_choices"] == {"min": 2, "max": 3}
    # Brier counts the gold's probability 0 in full: item 0 adds p0^2 + p1^2 + 1.
    p0 = math.exp(-1.0) / (math.exp(-1.0) + math.exp(-2.0))
    finite = summarize(rows[1:], labels[1:], bootstrap=0, n_bins=5)
    item0 = p0**2 + (1 - p0) ** 2 + 1.0
    assert s["brier"] == pytest.approx((item0 + 3 * finite["brier"]) / 4)
    for key in ("ece", "classwise_ece", "smooth_ece", "brier", "mean_confidence"):
        assert math.isfinite(s[key]), key


def test_wrong_last_choice_at_minus_inf_is_kept_as_a_choice():
    # Item 0 has 3 choices, the last with probability 0: classwise ECE sees class 2 for it.
    with_choice = summarize([[0.0, -1.0, NEG], [-2.0, 0.0, -1.0]], [0, 2], bootstrap=0, n_bins=3)
    assert with_choice["n_choices"] == {"min": 3, "max": 3}
    dropped = summarize(
        np.array([[0.0, -1.0, NEG], [-2.0, 0.0, -1.0]]), [0, 2], bootstrap=0, n_bins=3
    )
    assert dropped["n_choices"] == {"min": 2, "max": 3}  # the 2-D array reading
    assert with_choice["classwise_ece"] != pytest.approx(dropped["classwise_ece"])
    for key in ("accuracy", "brier", "nll", "ece"):  # p = 0 changes none of these
        assert with_choice[key] == pytest.approx(dropped[key])


def test_length_normalisation_keeps_minus_inf_choices():
    probs, k = choice_probabilities(
        [[-4.0, NEG], [-6.0, -3.0, NEG]],
        choice_char_lengths=[[2, 3], [6, 3, 1]],
        normalization="chars",
    )
    assert k.tolist() == [2, 3] and probs[0, :2].tolist() == [1.0, 0.0] and probs[1, 2] == 0.0
    with pytest.raises(ValueError, match="positive length for each of its 2 choices"):
        choice_probabilities([[-4.0, NEG]], choice_char_lengths=[[2]], normalization="chars")


def test_pooled_tasks_keep_each_items_choices():
    tasks = {
        "a": ([[-1.0, -2.0, NEG], [-1.0, -2.0, -3.0]], [2, 0]),
        "b": ([[-1.0, NEG], [0.0, -1.0]], [0, 1]),
    }
    out = summarize_tasks(tasks, protocol={}, bootstrap=20)["tasks"]
    assert out["a"]["nll"] == math.inf and out["a"]["accuracy"] == 0.5
    assert out["b"]["n_choices"] == {"min": 2, "max": 2} and math.isfinite(out["b"]["nll"])
    assert out["all"]["n"] == 4 and out["all"]["nll"] == math.inf
    assert out["all"]["n_choices"] == {"min": 2, "max": 3}


def _write_ours(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # -inf -> -Infinity


def test_samples_reader_keeps_real_choice_counts(tmp_path):
    path = tmp_path / "ours.jsonl"
    _write_ours(
        path,
        [
            {"task": "t", "id": 0, "choice_logprobs": [-1.0, -2.0, NEG], "label": 2},
            {"task": "t", "id": 1, "choice_logprobs": [-1.0, NEG], "label": 0},
            {"task": "t", "id": 2, "choice_logprobs": [-3.0, -1.0, -2.0, -4.0], "label": 1},
        ],
    )
    t = read_samples(path)["t"]
    assert t.n_choices.tolist() == [3, 2, 4]
    assert t.choice_scores[0].tolist() == [-1.0, -2.0, NEG]
    s = summarize(t.choice_scores, t.labels, bootstrap=0)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["nll"] == math.inf


def test_lm_eval_minus_inf_strings_are_choices(tmp_path):
    path = tmp_path / "samples_toy_2024-01-01T00-00-00.jsonl"
    record = {
        "doc_id": 0,
        "doc": {},
        "target": "2",
        "filtered_resps": [["-1.5", "False"], ["-0.5", "False"], ["-inf", "False"]],
    }
    path.write_text(json.dumps(record) + "\n")
    t = read_samples(path)["toy"]
    assert t.labels == [2] and t.n_choices.tolist() == [3]
    assert summarize(t.choice_scores, t.labels, bootstrap=0)["accuracy"] == 0.0


def test_metrics_command_reports_infinite_nll(tmp_path, capsys):
    """`calibrated-lm metrics` on the issue's file: no error; NLL inf in the table, null in
    the strict-JSON summary; accuracy counts the item as wrong."""
    path = tmp_path / "ours.jsonl"
    rows = [
        {"task": "t", "id": i, "choice_logprobs": [-1.0, -2.0 - i % 3, -1.5], "label": i % 3}
        for i in range(1, 20)
    ]
    rows.append({"task": "t", "id": 0, "choice_logprobs": [-1.0, -2.0, NEG], "label": 2})
    _write_ours(path, rows)
    out = tmp_path / "out"
    rc = main(["metrics", str(path), "--output", str(out), "--bootstrap", "30"])
    assert rc == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("t "))
    assert row.split()[-1] == "inf"
    summary = json.loads((out / "summary.json").read_text())["tasks"]["t"]
    assert summary["n"] == 20 and summary["nll"] is None
    assert summary["n_choices"] == {"min": 3, "max": 3}
    expected = summarize(
        read_samples(path)["t"].choice_scores, [r["label"] for r in rows], bootstrap=0
    )
    assert summary["accuracy"] == pytest.approx(expected["accuracy"])


def test_non_utf8_samples_and_task_files_name_the_line(tmp_path):
    import pytest

    from calibrated_lm.calibration import read_samples
    from calibrated_lm.errors import UserError
    from calibrated_lm.evaluation.data_jsonl import read_jsonl_task

    good = b'{"task": "t", "id": 1, "choice_logprobs": [-1, -2], "label": 0}\n'
    f = tmp_path / "s.jsonl"
    f.write_bytes(good + b'{"task": "t\xff", "id": 2, "choice_logprobs": [-1], "label": 0}\n')
    with pytest.raises(UserError, match=r"s.jsonl:2: not UTF-8 text \(byte 0xff at column 12\)"):
        read_samples(f)
    t = tmp_path / "task.jsonl"
    t.write_bytes(b'{"context": "Q", "choices": ["a", "b"], "label": 0}\n\xfe\n')
    with pytest.raises(UserError, match=r"task.jsonl:2: not UTF-8 text \(byte 0xfe at column 1\)"):
        read_jsonl_task(t)


def test_compare_keeps_a_minus_inf_choice_as_a_choice(tmp_path):
    import json

    import numpy as np

    from calibrated_lm.evaluation.compare import compare_runs

    run = tmp_path / "r"
    run.mkdir()
    rows = [
        {
            "task": "q",
            "id": str(i),
            "choice_logprobs": [-1.0, -2.0, float("-inf")],
            "label": 2 if i == 0 else 0,
            "choice_char_lengths": [1, 1, 1],
        }  # fmt: skip
        for i in range(20)
    ]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = compare_runs([run], tmp_path / "out", bootstrap=20)
    entry = next(iter(res["tasks"]["q"]["runs"].values()))
    # Question 0's gold answer has p = 0: wrong, and NLL infinite (not "label 2 of 2 choices").
    assert entry["accuracy"] == np.float64(19 / 20)
    assert entry["nll"] == float("inf")
