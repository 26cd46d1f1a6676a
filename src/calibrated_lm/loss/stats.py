"""Per-token statistics returned by ``linear_cross_entropy(..., return_stats=True)``."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LinearCrossEntropyStats(NamedTuple):
    """Statistics of the predictive distribution ``p = softmax(logits)`` at each position.

    Each field has the shape of ``targets`` (with ``shift=True``: ``targets[..., 1:]``, i.e.
    entry t describes the prediction made at position t for target t + 1). Logits are the
    softcapped ones when ``softcap`` is set. Values are computed for every position, ignored
    ones included, except ``correct``, which is False where the target is ``ignore_index``.

    - ``lse``: ``log sum_j exp(z_j)`` (float32).
    - ``entropy``: ``-sum_j p_j log p_j`` in nats (float32).
    - ``confidence``: ``max_j p_j`` (float32).
    - ``correct``: ``argmax_j z_j == target`` (bool).
    """

    lse: torch.Tensor
    entropy: torch.Tensor
    confidence: torch.Tensor
    correct: torch.Tensor
