"""Hyper-parameters shared by every implementation of the loss."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossConfig:
    """``label_smoothing`` eps, ``ignore_index``, ``softcap`` s (None: off), ``z_loss`` weight.

    Gradient of the per-token loss with respect to the (softcapped) logits c:

        dL/dc_j = p_j (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == y]

    and with a softcap, dc/dz = 1 - (c / s)**2.
    """

    label_smoothing: float = 0.0
    ignore_index: int = -100
    softcap: float | None = None
    z_loss: float = 0.0
    # Whether the caller wants per-token statistics (entropy, argmax); kernels may skip them.
    stats: bool = True
    # Floor on the token rows per logit block of the gradient pass (see chunking).
    min_block_rows: int = 0
