"""Result files are strict JSON: an infinite NLL is written as null, never as Infinity."""

from __future__ import annotations

import json

import numpy as np

from calibrated_lm.calibration import nll
from calibrated_lm.calibration.jsonfile import json_safe, write_json


def test_non_finite_values_become_null_and_the_rest_is_kept():
    obj = {"a": float("inf"), "b": [1.5, float("nan"), np.float64(2.0)], "c": (np.int64(3),)}
    assert json_safe(obj) == {"a": None, "b": [1.5, None, 2.0], "c": [3]}


def test_infinite_nll_from_a_zero_probability_gold_choice_is_written_as_null(tmp_path):
    # The gold choice 1 of item 0 has probability exactly 0, so the NLL is infinite.
    probs = np.array([[1.0, 0.0], [0.7, 0.3]])
    value = nll(probs, [1, 0])
    assert value == np.inf
    path = write_json(tmp_path / "summary.json", {"tasks": {"t": {"nll": value, "n": 2}}})
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"tasks": {"t": {"nll": None, "n": 2}}}
    assert not (tmp_path / "summary.json.tmp").exists()
