"""Triton backend: launches the per-row kernels of ``kernels/`` on logit blocks.

The logit blocks themselves come from cuBLAS products (see ``engine.py``); these kernels are
the fused epilogues (statistics, in-place gradient), each reading the block once.
"""

from __future__ import annotations

import os

import torch
import triton

from calibrated_lm.loss.config import LossConfig
from calibrated_lm.loss.kernels.row_grad import row_grad_kernel
from calibrated_lm.loss.kernels.row_update import row_update_kernel


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    block = min(4096, triton.next_power_of_2(max(n_cols, 16)))
    if os.environ.get("TRITON_INTERPRET") == "1":
        return block, 1
    return block, 8 if block >= 2048 else 4


class TritonBackend:
    """Epilogues as Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``)."""

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
        rows, cols = block.shape
        if rows == 0:
            return
        assert block.stride(1) == 1 and acc.stride(1) == 1 and targets.stride(0) == 1
        size, warps = _block_and_warps(cols)
        row_update_kernel[(rows,)](
            block,
            block.stride(0),
            col0,
            bias if bias is not None else block,
            targets,
            acc,
            acc.stride(0),
            idx,
            cfg.ignore_index,
            cfg.softcap or 1.0,
            N_COLS=cols,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=cfg.softcap is not None,
            BLOCK=size,
            num_warps=warps,
        )

    def grad_(
        self,
        block: torch.Tensor,
        lse: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None,
        row_scale: torch.Tensor,
        cfg: LossConfig,
    ) -> None:
        rows, cols = block.shape
        if rows == 0:
            return
        eps = cfg.label_smoothing
        size, warps = _block_and_warps(cols)
        row_grad_kernel[(rows,)](
            block,
            block.stride(0),
            bias if bias is not None else block,
            targets,
            lse.contiguous(),
            row_scale.contiguous(),
            cfg.ignore_index,
            eps / cols,
            1.0 - eps,
            2.0 * cfg.z_loss,
            cfg.softcap or 1.0,
            N_COLS=cols,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=cfg.softcap is not None,
            BLOCK=size,
            num_warps=warps,
        )
