"""Softmax over choices (ragged, padded, length-normalised) and the proper scores, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibrated_lm.calibration import (
    accuracy,
    brier_score,
    choice_probabilities,
    mean_confidence,
    nll,
    summarize,
    top_label,
    top_label_brier,
)

NEG = -np.inf


def test_softmax_over_choices_by_hand():
    probs, k = choice_probabilities([[math.log(1.0), math.log(3.0)]])
    assert probs[0].tolist() == pytest.approx([0.25, 0.75])
    assert k.tolist() == [2]


def test_ragged_lists_equal_padded_array():
    ragged = [[-1.0, -2.0, -3.0], [-2.0, -0.5], [-4.0, -1.0, -1.5, -3.0]]
    padded = np.array([[-1, -2, -3, NEG], [-2, -0.5, NEG, NEG], [-4, -1, -1.5, -3]], dtype=float)
    p1, k1 = choice_probabilities(ragged)
    p2, k2 = choice_probabilities(padded)
    assert np.allclose(p1, p2) and k1.tolist() == k2.tolist() == [3, 2, 4]
    assert p1[1, 2:].tolist() == [0.0, 0.0]
    assert np.allclose(p1.sum(axis=1), 1.0)
    s1 = summarize(ragged, [0, 1, 2], bootstrap=0, n_bins=4)
    s2 = summarize(padded, [0, 1, 2], bootstrap=0, n_bins=4)
    for key in ("ece", "brier", "nll", "classwise_ece", "accuracy"):
        assert s1[key] == pytest.approx(s2[key])


def test_chars_normalization_is_acc_norm():
    # raw: choice 0 wins (-4 > -6); per character: -4/2 = -2 < -6/6 = -1, so choice 1 wins.
    probs, _ = choice_probabilities(
        [[-4.0, -6.0]], choice_char_lengths=[[2, 6]], normalization="chars"
    )
    assert probs[0].tolist() == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)])
    raw, _ = choice_probabilities([[-4.0, -6.0]])
    assert raw[0, 0] > 0.5
    s = summarize(
        [[-4.0, -6.0]], [1], choice_char_lengths=[[2, 6]], normalization="chars", bootstrap=0
    )
    assert s["accuracy"] == 1.0


def test_brier_nll_top_label_by_hand():
    probs = [[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]]
    labels = [0, 2]
    # (.3^2 + .2^2 + .1^2) = .14 and (.7^2 + .2^2 + .9^2) = 1.34
    assert brier_score(probs, labels) == pytest.approx(0.74)
    assert brier_score([[1.0, 0.0]], [1]) == pytest.approx(2.0)
    assert nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.1)) / 2)
    assert accuracy(probs, labels) == 0.5
    assert mean_confidence(probs) == pytest.approx(0.7)
    conf, pred = top_label(probs)
    assert conf.tolist() == [0.7, 0.7] and pred.tolist() == [0, 0]
    assert top_label_brier([0.7, 0.5], [1, 0]) == pytest.approx((0.09 + 0.25) / 2)


def test_summary_scores_match_the_functions():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 4)) * 3
    labels = rng.integers(0, 4, 200)
    s = summarize(scores, labels, bootstrap=0)
    p = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    assert s["brier"] == pytest.approx(brier_score(p, labels))
    assert s["nll"] == pytest.approx(nll(p, labels))
    assert s["accuracy"] == pytest.approx(accuracy(p, labels))
    conf, pred = top_label(p)
    assert s["top_label_brier"] == pytest.approx(top_label_brier(conf, pred == labels))
    assert s["overconfidence"] == pytest.approx(s["mean_confidence"] - s["accuracy"])


def test_nll_stays_finite_for_very_unlikely_gold_from_scores():
    # log-softmax on scores keeps -1000 nats exact where exp() would underflow to 0.
    s = summarize([[0.0, -1000.0]], [1], bootstrap=0)
    assert s["nll"] == pytest.approx(1000.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: brier_score([[0.5, 0.6]], [0]), "sum to 1"),
        (lambda: brier_score([[0.5, 0.5]], [2]), "label out of range"),
        (lambda: brier_score([[0.5, 0.5]], [0, 1]), "length mismatch"),
        (lambda: brier_score([[0.5, float("nan")]], [0]), "NaN"),
        (lambda: nll([[1.2, -0.2]], [0]), r"\[0, 1\]"),
        (lambda: choice_probabilities([]), "empty"),
        (lambda: choice_probabilities([[NEG, NEG]]), "no finite score"),
        (lambda: choice_probabilities([[0.0, float("nan")]]), "NaN"),
        (lambda: choice_probabilities([[0.0, np.inf]]), r"\+inf"),
        (lambda: choice_probabilities([[0.0]], normalization="words"), "unknown normalization"),
        (
            lambda: choice_probabilities([[0.0, 1.0]], normalization="chars"),
            "needs per-choice character lengths",
        ),
        (
            lambda: choice_probabilities(
                [[0.0, 1.0]], choice_char_lengths=[[3, 0]], normalization="chars"
            ),
            "positive length",
        ),
        (lambda: summarize([[0.0, 1.0]], [2], bootstrap=0), "label out of range"),
        (lambda: summarize([[0.0, 1.0], [0.0]], [0], bootstrap=0), "length mismatch"),
        (lambda: summarize([[0.0, 1.0]], [0], bootstrap=-1), "bootstrap"),
    ],
)
def test_bad_scores_raise_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
