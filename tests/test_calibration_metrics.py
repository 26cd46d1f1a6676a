"""Hand-computed values for every binned metric, the smooth ECE, and the over-confidence identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm as normal

from calibrated_lm.calibration import (
    bin_indices,
    bin_table,
    calibration_error,
    classwise_calibration_error,
    debiased_calibration_error,
    smooth_ece,
    smooth_ece_sigma,
)

C6 = [0.1, 0.3, 0.35, 0.8, 0.9, 1.0]
Y6 = [0, 1, 0, 1, 0, 1]


def test_equal_width_ece_rms_mce_by_hand():
    # bin [0, .5): conf .25, acc 1/3, gap 1/12; bin [.5, 1]: conf .9, acc 2/3, gap 7/30
    assert calibration_error(C6, Y6, n_bins=2) == pytest.approx(19 / 120, abs=1e-12)
    rms = math.sqrt(((1 / 12) ** 2 + (7 / 30) ** 2) / 2)
    assert calibration_error(C6, Y6, n_bins=2, norm="l2") == pytest.approx(rms, abs=1e-12)
    assert calibration_error(C6, Y6, n_bins=2, norm="max") == pytest.approx(7 / 30, abs=1e-12)


def test_equal_mass_bins_by_hand():
    c = [0.5, 0.1, 0.4, 0.2, 0.3]
    y = [1, 1, 1, 0, 0]
    # sorted: .1(1) .2(0) .3(0) | .4(1) .5(1): sizes 3 and 2 (numpy.array_split sizes)
    assert bin_indices(np.array(c), 2, "mass").tolist() == [1, 0, 1, 0, 0]
    ece = 3 / 5 * abs(1 / 3 - 0.2) + 2 / 5 * abs(1 - 0.45)
    assert calibration_error(c, y, n_bins=2, binning="mass") == pytest.approx(ece, abs=1e-12)
    assert calibration_error(c, y, n_bins=2, binning="mass", norm="max") == pytest.approx(0.55)


def test_width_bin_edges_include_zero_and_one():
    idx = bin_indices(np.array([0.0, 0.4999, 0.5, 0.99, 1.0]), 2, "width")
    assert idx.tolist() == [0, 0, 1, 1, 1]
    assert bin_indices(np.array([0.0, 1.0]), 15, "width").tolist() == [0, 14]


def test_bin_table_rows():
    table = bin_table(C6, Y6, n_bins=4)
    assert table.count.tolist() == [1, 2, 0, 3]
    assert table.lower.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert table.accuracy[1] == pytest.approx(0.5)
    assert table.confidence[3] == pytest.approx(0.9)
    rows = table.rows()
    assert rows[2] == {
        "lower": 0.5,
        "upper": 0.75,
        "count": 0,
        "accuracy": None,
        "confidence": None,
    }
    mass = bin_table([0.5, 0.1, 0.4, 0.2, 0.3], [1, 1, 1, 0, 0], n_bins=2, binning="mass")
    assert mass.lower.tolist() == [0.1, 0.4] and mass.upper.tolist() == [0.3, 0.5]


def test_one_bin_is_the_overall_gap():
    c = np.array([0.9, 0.6, 0.7])
    y = np.array([1, 0, 1])
    assert calibration_error(c, y, n_bins=1) == pytest.approx(abs(c.mean() - y.mean()))


def test_over_confident_in_every_bin_gives_mean_confidence_minus_accuracy():
    rng = np.random.default_rng(3)
    c = rng.uniform(0.3, 1.0, 5000)
    y = (rng.uniform(size=5000) < c - 0.25).astype(float)
    table = bin_table(c, y, n_bins=15)
    assert np.all(table.gap[table.count > 0] > 0)  # the premise
    expected = c.mean() - y.mean()
    assert calibration_error(c, y, n_bins=15) == pytest.approx(expected, abs=1e-12)
    # smooth ECE integrates signed residuals of one sign: the same identity holds.
    assert smooth_ece(c, y) == pytest.approx(expected, abs=1e-9)


def test_classwise_ece_by_hand_with_ragged_choices():
    probs = [[0.7, 0.2, 0.1], [0.5, 0.5], [0.2, 0.3, 0.5]]
    labels = [0, 1, 2]
    # class 0: 2/15, class 1: 1/3, class 2 (items 0 and 2 only): 3/10
    value = classwise_calibration_error(probs, labels, n_choices=[3, 2, 3], n_bins=2)
    assert value == pytest.approx(23 / 90, abs=1e-12)


def test_classwise_ece_binary_equals_top_label_for_symmetric_case():
    # With two classes, class 1 mirrors class 0: classwise ECE equals class-0 ECE.
    p0 = np.array([0.7, 0.4, 0.9])
    y = np.array([0, 1, 1])
    probs = np.stack([p0, 1 - p0], axis=1)
    class0 = calibration_error(p0, (y == 0).astype(float), n_bins=2)
    assert classwise_calibration_error(probs, y, n_bins=2) == pytest.approx(class0)


def test_debiased_l2_by_hand():
    # one bin: acc .2, conf .9, n 5: (.7)^2 - .2 * .8 / 4 = .45
    c, y = [0.9] * 5, [1, 0, 0, 0, 0]
    assert debiased_calibration_error(c, y, n_bins=1) == pytest.approx(math.sqrt(0.45))
    # the bias correction can exceed the squared gap: clipped at 0
    c, y = [0.9] * 4, [1, 1, 0, 1]
    assert debiased_calibration_error(c, y, n_bins=1) == 0.0


def test_debiased_l1_matches_numerical_expectation_and_simulation():
    c = np.array([0.9] * 5 + [0.3] * 4)
    y = np.array([1, 0, 0, 0, 0, 1, 1, 0, 1])
    got = debiased_calibration_error(c, y, n_bins=2, norm="l1")
    expected = 0.0
    for conf, acc, n_b in ((0.9, 0.2, 5), (0.3, 0.75, 4)):
        sd = math.sqrt(acc * (1 - acc) / n_b)
        e_abs = integrate.quad(lambda x, m=acc - conf, s=sd: abs(x) * normal.pdf(x, m, s), -5, 5)[0]
        expected += n_b / 9 * (2 * abs(acc - conf) - e_abs)
    assert got == pytest.approx(expected, abs=1e-7)
    # Kumar et al.'s simulated version converges to the same number.
    rng = np.random.default_rng(0)
    sims = []
    for conf, acc, n_b in ((0.9, 0.2, 5), (0.3, 0.75, 4)):
        draws = rng.normal(acc, math.sqrt(acc * (1 - acc) / n_b), 400_000)
        sims.append(n_b / 9 * (2 * abs(acc - conf) - np.abs(draws - conf).mean()))
    assert sum(sims) == pytest.approx(got, abs=2e-3)


def _smooth_reference(c: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Direct evaluation of the reflected-kernel integral on a fine mesh (no FFT, no grid)."""
    t = np.linspace(0.0, 1.0, 4001)
    kernel = np.zeros((t.size, c.size))
    gauss = lambda d: np.exp(-0.5 * (d / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    for m in range(-2, 3):  # images of the reflections at 0 and 1
        kernel += gauss(t[:, None] - c[None, :] - 2 * m) + gauss(t[:, None] + c[None, :] - 2 * m)
    smoothed = kernel @ (c - y)
    return float(np.trapezoid(np.abs(smoothed), t) / c.size)


@pytest.mark.parametrize("sigma", [0.03, 0.1, 0.4])
def test_smooth_ece_at_fixed_bandwidth_matches_direct_integral(sigma):
    rng = np.random.default_rng(1)
    c = rng.uniform(0, 1, 120)
    y = (rng.uniform(size=120) < c**1.5).astype(float)
    c[:3] = [0.0, 1.0, 0.5]  # boundary masses
    assert smooth_ece_sigma(c, y, sigma) == pytest.approx(_smooth_reference(c, y, sigma), abs=2e-5)


def test_smooth_ece_is_the_fixed_point_of_its_bandwidth():
    rng = np.random.default_rng(2)
    c = rng.uniform(0, 1, 2000)
    y = (rng.uniform(size=2000) < np.clip(c + 0.2 * np.sin(8 * c), 0, 1)).astype(float)
    value, sigma = smooth_ece(c, y, return_bandwidth=True)
    assert value == pytest.approx(sigma, abs=1e-5)
    assert smooth_ece_sigma(c, y, sigma) == pytest.approx(value, abs=1e-6)
    assert 0.0 < value < calibration_error(c, y, n_bins=15) + 0.05


def test_smooth_ece_small_for_calibrated_sample():
    rng = np.random.default_rng(4)
    c = rng.uniform(0, 1, 20000)
    y = (rng.uniform(size=20000) < c).astype(float)
    assert smooth_ece(c, y) < 0.02


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"confidence": [0.5, 0.2], "correct": [1]}, "length mismatch"),
        ({"confidence": [], "correct": []}, "empty"),
        ({"confidence": [0.5, float("nan")], "correct": [1, 0]}, "NaN or infinite"),
        ({"confidence": [0.5, float("inf")], "correct": [1, 0]}, "NaN or infinite"),
        ({"confidence": [0.5, 1.2], "correct": [1, 0]}, r"must lie in \[0, 1\]"),
        ({"confidence": [0.5, -0.1], "correct": [1, 0]}, r"must lie in \[0, 1\]"),
        ({"confidence": [0.5, 0.2], "correct": [1, 2]}, "0/1"),
        ({"confidence": [0.5], "correct": [1], "n_bins": 0}, "n_bins must be at least 1"),
        ({"confidence": [0.5], "correct": [1], "binning": "quantile"}, "unknown binning"),
        ({"confidence": [0.5], "correct": [1], "norm": "l3"}, "unknown norm"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibration_error(**kwargs)
