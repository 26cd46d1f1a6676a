"""Invariances that must hold for any input (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calibrated_lm.calibration import (
    bin_table,
    calibration_error,
    choice_probabilities,
    smooth_ece,
    summarize,
)

FAST = settings(max_examples=60, deadline=None)
unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def outcomes(draw, max_n: int = 60):
    n = draw(st.integers(1, max_n))
    c = draw(arrays(np.float64, n, elements=unit))
    y = draw(arrays(np.int64, n, elements=st.integers(0, 1)))
    return c, y


@st.composite
def scored(draw, max_n: int = 30):
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(2, 5))
    s = draw(arrays(np.float64, (n, k), elements=st.floats(-30, 0, allow_nan=False)))
    labels = draw(arrays(np.int64, n, elements=st.integers(0, k - 1)))
    return s, labels


@FAST
@given(outcomes(), st.integers(1, 20), st.sampled_from(["width", "mass"]))
def test_ece_le_rms_le_mce_within_unit_interval(data, n_bins, binning):
    c, y = data
    ece = calibration_error(c, y, n_bins=n_bins, binning=binning)
    rms = calibration_error(c, y, n_bins=n_bins, binning=binning, norm="l2")
    mce = calibration_error(c, y, n_bins=n_bins, binning=binning, norm="max")
    assert 0.0 <= ece <= rms + 1e-12 <= mce + 2e-12 <= 1.0 + 2e-12


@FAST
@given(outcomes(), st.integers(1, 20), st.sampled_from(["width", "mass"]))
def test_ece_bounds_the_overall_gap_with_equality_when_one_signed(data, n_bins, binning):
    c, y = data
    ece = calibration_error(c, y, n_bins=n_bins, binning=binning)
    overall = c.mean() - y.mean()
    assert ece >= abs(overall) - 1e-12
    gaps = bin_table(c, y, n_bins=n_bins, binning=binning).gap
    gaps = gaps[~np.isnan(gaps)]
    if np.all(gaps >= 0) or np.all(gaps <= 0):
        assert ece == pytest.approx(abs(overall), abs=1e-12)


@FAST
@given(outcomes(), st.integers(1, 20), st.randoms(use_true_random=False))
def test_item_order_and_duplication_do_not_matter_for_width_bins(data, n_bins, rnd):
    c, y = data
    order = list(range(c.shape[0]))
    rnd.shuffle(order)
    base = calibration_error(c, y, n_bins=n_bins)
    assert calibration_error(c[order], y[order], n_bins=n_bins) == pytest.approx(base, abs=1e-12)
    doubled = calibration_error(np.tile(c, 2), np.tile(y, 2), n_bins=n_bins)
    assert doubled == pytest.approx(base, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(outcomes(max_n=40))
def test_smooth_ece_bounded_by_mean_absolute_residual(data):
    c, y = data
    value = smooth_ece(c, y)
    # |sum_i K r_i| <= sum_i K |r_i| and the kernel integrates to 1 over [0, 1].
    assert -1e-9 <= value <= np.abs(c - y).mean() + 1e-6


@settings(max_examples=40, deadline=None)
@given(scored(), st.floats(-50, 50), st.randoms(use_true_random=False))
def test_scores_shift_and_choice_permutation_invariance(data, shift, rnd):
    s, labels = data
    base = summarize(s, labels, bootstrap=0, n_bins=5)
    shifted = summarize(s + shift, labels, bootstrap=0, n_bins=5)
    for key in ("brier", "nll", "mean_confidence"):
        assert shifted[key] == pytest.approx(base[key], abs=1e-9)
    # ECE depends on which choice is the argmax: a near-tie (scores a rounding error apart,
    # e.g. -2.2e-16 and 0) can become an exact tie once shifted, and argmax then picks
    # another choice. Checked only where the top choice is unambiguous.
    top2 = np.sort(s, axis=1)[:, -2:]
    if np.all(top2[:, 1] - top2[:, 0] > 1e-6):
        assert shifted["ece"] == pytest.approx(base["ece"], abs=1e-9)
    perm = list(range(s.shape[1]))
    rnd.shuffle(perm)
    inverse = np.argsort(perm)
    permuted = summarize(s[:, perm], inverse[labels], bootstrap=0, n_bins=5)
    # Tie-free quantities only: which tied choice argmax picks depends on the order.
    for key in ("brier", "nll", "mean_confidence"):
        assert permuted[key] == pytest.approx(base[key], abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(scored())
def test_probabilities_and_scores_stay_in_range(data):
    s, labels = data
    p, _ = choice_probabilities(s)
    assert np.allclose(p.sum(axis=1), 1.0)
    out = summarize(s, labels, bootstrap=0, n_bins=5)
    assert 0.0 <= out["brier"] <= 2.0
    assert 0.0 <= out["top_label_brier"] <= 1.0
    assert out["nll"] >= 0.0
    assert 1.0 / s.shape[1] - 1e-12 <= out["mean_confidence"] <= 1.0
    assert 0.0 <= out["classwise_ece"] <= 1.0
