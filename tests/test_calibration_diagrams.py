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
