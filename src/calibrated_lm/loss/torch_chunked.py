"""Exact, memory-lean PyTorch backend: float32 epilogues on one logit block at a time.

Used on the CPU and on devices without Triton. Logit blocks are produced in the input dtype
(as ``hidden @ weight.T`` would be) and upcast to float32 here, which is what
``F.cross_entropy(logits.float(), ...)`` does, so results match PyTorch's own computation.
"""

from __future__ import annotations

import torch

from calibrated_lm.loss.config import LossConfig
from calibrated_lm.loss.engine import CY, SUMC, M, S, T


def _capped_logits(
    block: torch.Tensor, col0: int, bias: torch.Tensor | None, cfg: LossConfig
) -> torch.Tensor:
    c = block.float()
    if bias is not None:
        c = c + bias[col0 : col0 + block.shape[1]].float()
    if cfg.softcap is not None:
        c = cfg.softcap * torch.tanh(c / cfg.softcap)
    return c


class TorchBackend:
    """Epilogues written with PyTorch operations (any device)."""

    def update(
        self,
        acc: torch.Tensor,
        idx: torch.Tensor,
        block: torch.Tensor,
        col0: int,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        cfg: LossConfig,
    ) -> None:
        c = _capped_logits(block, col0, bias, cfg)
        blk_max, blk_arg = c.max(dim=1)
        m_old = acc[M].clone()
        m_new = torch.maximum(m_old, blk_max)
        alpha = torch.exp(m_old - m_new)  # 0 on the first tile (m_old = -inf)
        e = torch.exp(c - m_new[:, None])
        acc[S] = acc[S] * alpha + e.sum(1)
        acc[T] = acc[T] * alpha + (e * c).sum(1)
        acc[SUMC] += c.sum(1)
        acc[M] = m_new
        # Strictly greater: ties keep the earlier column, as torch.argmax does.
        idx.copy_(torch.where(blk_max > m_old, blk_arg.int() + col0, idx))
        local = targets - col0
        inside = (targets != cfg.ignore_index) & (local >= 0) & (local < c.shape[1])
        picked = c.gather(1, local.clamp(0, c.shape[1] - 1).long()[:, None])[:, 0]
        acc[CY] += torch.where(inside, picked, torch.zeros_like(picked))

    def grad_(
        self,
        block: torch.Tensor,
        lse: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None,
        row_scale: torch.Tensor,
        cfg: LossConfig,
        col0: int = 0,
        vocab: int | None = None,
    ) -> None:
        cols = block.shape[1]
        eps = cfg.label_smoothing
        c = _capped_logits(block, col0, bias, cfg)
        g = torch.exp(c - lse[:, None])
        if cfg.z_loss:
            g *= (1.0 + 2.0 * cfg.z_loss * lse)[:, None]
        g -= eps / (vocab or cols)
        local = targets - col0  # the target's column in this block, if it is one of them
        inside = (targets != cfg.ignore_index) & (local >= 0) & (local < cols)
        rows = torch.nonzero(inside)[:, 0]
        g[rows, local[rows].long()] -= 1.0 - eps
        if cfg.softcap is not None:
            g *= 1.0 - (c / cfg.softcap).square()
        g *= row_scale[:, None]
        block.copy_(g)
