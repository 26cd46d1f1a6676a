"""Closed-form quantities of label smoothing and of a bounded linear output head.

Everything here is derived step by step in ``docs/theory.md``; the section names below refer to
it. Conventions follow PyTorch: ``F.cross_entropy(z, y, label_smoothing=eps)`` trains against
``q = (1 - eps) * onehot(y) + eps / V`` over all V classes (the target included).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "entropy_floor_from_range",
    "ls_loss_identity",
    "ls_target_gap",
    "ls_target_prob",
    "max_prob_from_range",
    "softcap_gap_bound",
]


def ls_target_prob(eps: float, vocab: int) -> float:
    """Target probability at the label-smoothed optimum: ``1 - eps + eps / V`` (section 1.2)."""
    _check_eps(eps, vocab)
    return 1.0 - eps + eps / vocab


def ls_target_gap(eps: float, vocab: int) -> float:
    """Logit gap ``z_y - z_j`` (the same for every j != y) at the LS optimum (section 1.2).

    ``log(p_y / p_j) = log((1 - eps + eps/V) / (eps/V)) = log(1 + (1 - eps) V / eps)``;
    infinite for eps = 0.
    """
    _check_eps(eps, vocab)
    if eps == 0:
        return math.inf
    return math.log1p((1.0 - eps) * vocab / eps)


def ls_loss_identity(logits: np.ndarray, target: int, eps: float) -> tuple[float, float]:
    """Both sides of the identity of section 1.1, for one row of logits (float64).

    Left: ``-sum_j q_j log p_j`` with ``q = (1 - eps) e_y + eps/V``. Right:
    ``CE + eps * (z_y - mean_j z_j)``, where CE = ``-log p_y`` and the mean runs over all V
    logits (the target included). They are equal for any logits.
    """
    z = np.asarray(logits, dtype=np.float64)
    vocab = z.shape[-1]
    lse = np.logaddexp.reduce(z)
    logp = z - lse
    q = np.full(vocab, eps / vocab)
    q[target] += 1.0 - eps
    left = float(-(q * logp).sum())
    right = float(-logp[target] + eps * (z[target] - z.mean()))
    return left, right


def max_prob_from_range(logit_range: float, vocab: int) -> float:
    """Largest softmax probability when all V logits lie in an interval of width ``logit_range``.

    ``p_max <= e^R / (e^R + V - 1)`` (section 2.2): the top logit at most R above every other.
    """
    r = float(logit_range)
    # 1 / (1 + (V - 1) e^{-R}), written to stay finite for large R
    return 1.0 / (1.0 + (vocab - 1) * math.exp(-r)) if r < 700 else 1.0


def entropy_floor_from_range(logit_range: float, vocab: int) -> float:
    """Smallest softmax entropy (nats) when all V logits lie in an interval of width R.

    Section 2.3 shows the minimum over the box ``[a, a + R]^V`` sits at a vertex: k logits at
    the top, V - k at the bottom. With ``Z_k = k e^R + V - k`` its entropy is
    ``H_k = log Z_k - k R e^R / Z_k``; we return ``min_k H_k`` over k = 1..V-1, evaluated exactly.
    """
    r = float(logit_range)
    if vocab < 2:
        return 0.0
    if r <= 0:
        return math.log(vocab)
    k = np.arange(1, vocab, dtype=np.float64)
    # log Z_k = R + log(k + (V - k) e^{-R}); k R e^R / Z_k = k R / (k + (V - k) e^{-R})
    e = math.exp(-r) if r < 700 else 0.0
    denom = k + (vocab - k) * e
    h = r + np.log(denom) - k * r / denom
    return float(max(h.min(), 0.0))


def softcap_gap_bound(gap: np.ndarray | float, cap: float | None) -> np.ndarray | float:
    """Bound on a logit gap after softcapping ``c * tanh(z / c)`` (section 3.2).

    ``c tanh(a/c) - c tanh(b/c) <= min(a - b, 2c)`` for a >= b, because tanh is 1-Lipschitz
    and bounded by 1. ``cap=None`` means no softcapping.
    """
    if cap is None:
        return gap
    return np.minimum(gap, 2.0 * cap)


def _check_eps(eps: float, vocab: int) -> None:
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label smoothing eps must be in [0, 1), got {eps}")
    if vocab < 2:
        raise ValueError(f"vocabulary size must be at least 2, got {vocab}")
