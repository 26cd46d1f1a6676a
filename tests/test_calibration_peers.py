"""Agreement with netcal and torchmetrics where their definitions coincide with ours.

torchmetrics' *binary* calibration error bins P(y = 1), not the top-label confidence, so the
comparison uses its multiclass (top-label) mode. torchmetrics puts a confidence of exactly 1.0
into an extra bin of its own, where we count it in the last bin (as the issue specifies), so
the data here avoid exact 1.0.
"""

from __future__ import annotations

import numpy as np
import pytest

from calibrated_lm.calibration import calibration_error, top_label

netcal_metrics = pytest.importorskip("netcal.metrics")
torch = pytest.importorskip("torch")
tm_cls = pytest.importorskip("torchmetrics.functional.classification")


def _probs(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 2.0
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = rng.integers(0, k, n)
    return p, y


@pytest.mark.parametrize("n_bins", [5, 15])
def test_netcal_ece_and_mce(n_bins):
    p, y = _probs(2000, 4, seed=n_bins)
    conf, pred = top_label(p)
    ours = calibration_error(conf, pred == y, n_bins=n_bins)
    assert ours == pytest.approx(netcal_metrics.ECE(bins=n_bins).measure(p, y), abs=1e-9)
    ours_max = calibration_error(conf, pred == y, n_bins=n_bins, norm="max")
    assert ours_max == pytest.approx(netcal_metrics.MCE(bins=n_bins).measure(p, y), abs=1e-9)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_torchmetrics_multiclass_top_label(norm):
    p, y = _probs(3000, 5, seed=7)
    conf, pred = top_label(p)
    ours = calibration_error(conf, pred == y, n_bins=15, norm=norm)
    theirs = tm_cls.multiclass_calibration_error(
        torch.tensor(p), torch.tensor(y), num_classes=5, n_bins=15, norm=norm
    )
    assert ours == pytest.approx(float(theirs), abs=2e-6)  # torchmetrics works in float32
