"""Bootstrap intervals: the vectorised draws equal a plain loop over resamples."""

from __future__ import annotations

import numpy as np
import pytest

from calibrated_lm.calibration import (
    METRICS,
    bootstrap_ci,
    bootstrap_indices,
    percentile_interval,
    summarize,
)


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = rng.integers(3, 6, n)
    scores = [rng.normal(size=int(m)) * 2.5 for m in k]
    labels = [int(rng.integers(0, m)) for m in k]
    return scores, labels


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_vectorised_bootstrap_equals_loop_over_resamples(binning):
    scores, labels = _data(150)
    s = summarize(scores, labels, bootstrap=60, seed=5, binning=binning, n_bins=6)
    idx = bootstrap_indices(150, 60, 5)
    per_draw = [
        summarize([scores[i] for i in row], [labels[i] for i in row], bootstrap=0, binning=binning,
                  n_bins=6)
        for row in idx
    ]  # fmt: skip
    # Continuous scores: no tied confidences, so equal-mass cuts agree exactly too.
    for name in METRICS:
        expected = percentile_interval(np.array([d[name] for d in per_draw]))
        assert s[f"{name}_ci95"] == pytest.approx(expected, abs=1e-9), name


def test_intervals_are_seeded_and_contain_the_point_estimate():
    scores, labels = _data(400, seed=1)
    a = summarize(scores, labels, bootstrap=200, seed=0)
    b = summarize(scores, labels, bootstrap=200, seed=0)
    c = summarize(scores, labels, bootstrap=200, seed=1)
    assert a == b
    assert a["ece_ci95"] != c["ece_ci95"]
    for name in ("accuracy", "mean_confidence", "brier", "nll"):
        lo, hi = a[f"{name}_ci95"]
        assert lo < a[name] < hi
    none = summarize(scores, labels, bootstrap=0)
    assert none["ece_ci95"] is None and none["ece"] == a["ece"]


def test_interval_width_shrinks_like_one_over_root_n():
    small = summarize(*_data(250, seed=2), bootstrap=300)
    large = summarize(*_data(4000, seed=2), bootstrap=300)
    w_small = np.diff(small["accuracy_ci95"])[0]
    w_large = np.diff(large["accuracy_ci95"])[0]
    assert 2.5 < w_small / w_large < 6.0  # sqrt(16) = 4


def test_percentile_interval_and_generic_bootstrap():
    assert percentile_interval(np.arange(101.0)) == pytest.approx([2.5, 97.5])
    x = np.arange(10.0)
    lo, hi = bootstrap_ci(lambda rows: float(x[rows].mean()), 10, draws=500, seed=0)
    assert lo < 4.5 < hi and hi - lo < 5
    assert bootstrap_indices(7, 3, 0).shape == (3, 7)
    with pytest.raises(ValueError, match="at least 1"):
        bootstrap_indices(7, 0, 0)


def test_zero_probability_gold_gives_infinite_nll_and_interval():
    # -inf marks a choice the model cannot produce; when it is the gold one, NLL is infinite.
    s = summarize([[0.0, -np.inf, 1.0], [0.0, 1.0]] * 5, [1, 0] * 5, bootstrap=50)
    assert s["nll"] == np.inf and s["nll_ci95"] == [np.inf, np.inf]
    assert np.isfinite(s["brier_ci95"]).all()
    assert percentile_interval(np.array([1.0] * 90 + [np.inf] * 10)) == [1.0, np.inf]


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_weighted_bin_sums_match_direct_binning_with_ties_and_masks(binning):
    from calibrated_lm.calibration.binning import bin_sums
    from calibrated_lm.calibration.resampled import multiplicities, weighted_bin_sums

    rng = np.random.default_rng(1)
    n = 101
    c = np.round(rng.uniform(size=n), 1)  # many ties
    y = (rng.uniform(size=n) < c).astype(float)
    values = np.stack([np.ones(n), c, y], axis=1)
    idx = rng.integers(0, n, (6, n))
    weights = multiplicities(idx, n)
    weights[:, :10] = 0.0  # masked items take no part, also not in the equal-mass cuts
    for n_bins in (1, 3, 15, 200):
        got = weighted_bin_sums(c, values, weights, n_bins, binning)
        for b in range(6):
            kept = idx[b][idx[b] >= 10]
            _, count, conf_sum, acc_sum = bin_sums(c[kept], y[kept], n_bins, binning)
            # Between tied copies the outcome sum may differ; counts and confidences may not.
            assert np.allclose(got[b, :, :2], np.stack([count, conf_sum], axis=1))
            if binning == "width":
                assert np.allclose(got[b, :, 2], acc_sum)


def test_chunked_draws_are_the_seeded_bootstrap_indices():
    # 5,000 items x 4 choices are drawn in chunks of 400 resamples (here 400 + 50); still
    # exactly the draws of bootstrap_indices(n, draws, seed).
    rng = np.random.default_rng(9)
    scores = rng.normal(size=(5000, 4))
    labels = rng.integers(0, 4, 5000)
    s = summarize(scores, labels, bootstrap=450, seed=4)
    correct = (scores.argmax(axis=1) == labels).astype(float)
    idx = bootstrap_indices(5000, 450, 4)
    assert s["accuracy_ci95"] == pytest.approx(percentile_interval(correct[idx].mean(axis=1)))
