"""Reliability diagrams: both files written, series and their ECE in the legend."""

from __future__ import annotations

import numpy as np
import pytest

from calibrated_lm.calibration import reliability_diagram


def test_png_and_svg_with_ece_in_legend(tmp_path):
    c = [0.1, 0.3, 0.35, 0.8, 0.9, 1.0]
    y = [0, 1, 0, 1, 0, 1]
    rng = np.random.default_rng(0)
    c2 = rng.uniform(0.2, 1.0, 300)
    y2 = rng.uniform(size=300) < c2
    paths = reliability_diagram(
        {"hand": (c, y), "random model": (c2, y2)}, tmp_path / "sub" / "rd", n_bins=2, title="T"
    )
    assert [p.name for p in paths] == ["rd.png", "rd.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = paths[1].read_text()
    assert "hand: ECE 0.158 (n=6)" in svg  # 19/120, computed by hand in test_calibration_metrics
    assert "random model: ECE" in svg and "(n=300)" in svg
    assert "perfect calibration" in svg


def test_equal_mass_diagram_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    c = rng.uniform(0, 1, 200)
    paths = reliability_diagram(
        {"m": (c, rng.uniform(size=200) < c)}, tmp_path / "m", binning="mass"
    )
    assert all(p.stat().st_size > 1000 for p in paths)
    assert "15 equal-mass bins" in paths[1].read_text()
    with pytest.raises(ValueError, match="at least one series"):
        reliability_diagram({}, tmp_path / "x")
    with pytest.raises(ValueError, match="length mismatch"):
        reliability_diagram({"bad": ([0.5, 0.6], [1])}, tmp_path / "x")


def test_wilson_interval_known_values():
    from calibrated_lm.calibration import wilson_interval

    lo, hi = wilson_interval([3, 0, 161], [3, 10, 161])
    # 3/3 and 161/161: upper 1, lower n / (n + z^2); 0/10: lower 0, upper z^2 / (n + z^2).
    z2 = 1.96**2
    assert lo[0] == pytest.approx(3 / (3 + z2)) and hi[0] == pytest.approx(1.0)
    assert lo[1] == pytest.approx(0.0) and hi[1] == pytest.approx(z2 / (10 + z2))
    assert lo[2] == pytest.approx(161 / (161 + z2)) and lo[2] > 0.97 > lo[0] + 0.5


def test_plot_into_given_axes_returns_the_figure_with_counts_intervals_and_title():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibrated_lm.calibration import plot_reliability

    rng = np.random.default_rng(2)
    c = rng.uniform(0.3, 1.0, 400)
    y = rng.uniform(size=400) < c
    fig, (ax, hx) = plt.subplots(1, 2)
    got = plot_reliability({"m": (c, y)}, ax=ax, hist_ax=hx, n_bins=10, normalization="tokens")
    assert got is fig
    assert ax.get_title() == "Reliability diagram (n=400, scores: per token)"
    texts = [t.get_text() for t in ax.texts]
    table_counts = np.bincount(np.minimum((c * 10).astype(int), 9), minlength=10)
    assert sorted(int(t) for t in texts) == sorted(int(k) for k in table_counts if k)
    assert len(ax.collections) >= 1  # the Wilson error bars
    assert len(hx.patches) == int((table_counts > 0).sum())
    plt.close(fig)
    # Main axes alone: no histogram panel is needed.
    fig2, ax2 = plt.subplots()
    assert plot_reliability({"m": (c, y)}, ax=ax2, title="T").axes == [ax2]
    assert ax2.get_title() == "T (n=400)"
    plt.close(fig2)


def test_bins_at_accuracy_zero_and_one_draw(tmp_path):
    # All-correct and all-wrong bins: the Wilson bounds meet the accuracy up to rounding.
    # (an all-correct bin of 127 items has its Wilson upper bound 1.1e-16 below 1.0)
    c = np.array([0.95] * 127 + [0.15] * 9 + [0.55] * 3)
    y = np.array([1] * 127 + [0] * 9 + [1, 0, 1])
    paths = reliability_diagram({"m": (c, y)}, tmp_path / "edge", n_bins=10)
    assert paths[0].stat().st_size > 1000
