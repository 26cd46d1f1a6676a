"""Readable oracle: materialises the logits in float64. For tests and small problems only.

Loss at a valid position with target y (eps = label_smoothing, V = vocabulary size):

    z = softcap(h @ W.T + b),  lse = log sum_j exp(z_j)
    loss = -sum_j q_j log softmax(z)_j + z_loss * lse**2,  q = (1 - eps) onehot(y) + eps / V
         = lse - (1 - eps) z_y - (eps / V) sum_j z_j + z_loss * lse**2

which is ``F.cross_entropy(z, y, label_smoothing=eps)`` plus the z-loss term.
"""

from __future__ import annotations

import torch

from calibrated_lm.loss.stats import LinearCrossEntropyStats


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    z_loss: float = 0.0,
    shift: bool = False,
    return_stats: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, LinearCrossEntropyStats]:
    """Same contract as :func:`calibrated_lm.loss.linear_cross_entropy`, computed in ``dtype``
    with the full logit matrix; differentiable through ordinary autograd."""
    if shift:
        hidden = hidden[..., :-1, :]
        targets = targets[..., 1:]
    out_shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    y = targets.reshape(-1)
    z = h @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    per = torch.nn.functional.cross_entropy(
        z, y_safe, reduction="none", label_smoothing=label_smoothing
    )
    lse = torch.logsumexp(z, dim=-1)
    if z_loss:
        per = per + z_loss * lse.square()
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "mean":
        loss = per.sum() / valid.sum().clamp(min=1)
    elif reduction == "sum":
        loss = per.sum()
    else:
        loss = per.reshape(out_shape)
    if not return_stats:
        return loss
    with torch.no_grad():
        logp = torch.log_softmax(z, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        confidence = logp.max(-1).values.exp()
        correct = (z.argmax(-1) == y) & valid
    stats = LinearCrossEntropyStats(
        lse.detach().float().reshape(out_shape),
        entropy.float().reshape(out_shape),
        confidence.float().reshape(out_shape),
        correct.reshape(out_shape),
    )
    return loss, stats
