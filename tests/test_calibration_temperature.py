"""Temperature scaling recovers a known temperature and agrees with a generic optimiser."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from calibrated_lm.calibration import apply_temperature, fit_temperature


def _overconfident(n: int, tau: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4)) * 1.5
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    labels = (rng.uniform(size=(n, 1)) > p.cumsum(axis=1)).sum(axis=1)
    return z / tau, labels


def test_recovers_the_simulated_temperature():
    logits, labels = _overconfident(20000, tau=0.5)
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)


def test_agrees_with_scipy_bounded_minimisation():
    logits, labels = _overconfident(3000, tau=0.7, seed=1)

    def loss(log_t):
        return -log_softmax(logits / np.exp(log_t), axis=1)[np.arange(3000), labels].mean()

    ref = np.exp(minimize_scalar(loss, bounds=(-4, 4), method="bounded", options={"xatol": 1e-9}).x)
    assert fit_temperature(logits, labels) == pytest.approx(ref, rel=1e-5)


def test_padded_and_ragged_logits_fit_the_same_temperature():
    rng = np.random.default_rng(2)
    ragged = [rng.normal(size=int(k)) * 3 for k in rng.integers(3, 6, 500)]
    labels = [int(rng.integers(0, len(r))) for r in ragged]
    padded = np.full((500, 5), -np.inf)
    for i, r in enumerate(ragged):
        padded[i, : len(r)] = r
    t1, t2 = fit_temperature(ragged, labels), fit_temperature(padded, labels)
    assert t1 == pytest.approx(t2, rel=1e-9)
    assert t1 > 1.5  # random labels: the fit flattens the logits a lot


def test_apply_temperature_keeps_padding_and_divides():
    out = apply_temperature([[2.0, -4.0], [1.0]], 2.0)
    assert out[0].tolist() == [1.0, -2.0]
    assert out[1, 0] == 0.5 and out[1, 1] == -np.inf
    with pytest.raises(ValueError, match="positive"):
        apply_temperature([[1.0, 2.0]], 0.0)


def test_flat_logits_give_one_and_separable_data_hits_the_bound():
    assert fit_temperature([[1.0, 1.0], [0.0, 0.0]], [0, 1]) == 1.0
    assert fit_temperature([[5.0, 0.0], [0.0, 5.0]], [0, 1]) == pytest.approx(0.01, rel=1e-4)


def test_items_with_an_impossible_gold_answer_are_left_out_of_the_fit():
    import numpy as np
    import pytest

    from calibrated_lm.calibration import fit_temperature

    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 3)) * 3
    y = rng.integers(0, 3, 200)
    base = fit_temperature(z, y)
    rows = [list(r) for r in z] + [[0.0, 1.0, float("-inf")]]  # gold (2) impossible
    assert fit_temperature(rows, list(y) + [2]) == pytest.approx(base)
    with pytest.raises(ValueError, match="no temperature can be fitted"):
        fit_temperature([[0.0, float("-inf")]], [1])
