"""Triton backend: launches the kernels of ``kernels/``.

In the gradient pass the logit blocks come from cuBLAS products (see ``engine.py``) and two
Triton kernels are their fused epilogues (statistics, then the in-place gradient), each
streaming the block once. Without gradients, one fused kernel computes logit tiles on chip
and reduces them directly (``forward_stats``).
"""

from __future__ import annotations

import os

import torch
import triton

from calibrated_lm.loss.config import LossConfig
from calibrated_lm.loss.engine import S, T, merge_partials, new_accumulators
from calibrated_lm.loss.kernels.fused_forward import fused_forward_kernel
from calibrated_lm.loss.kernels.grad_weight import grad_weight_kernel
from calibrated_lm.loss.kernels.row_grad import row_grad_kernel
from calibrated_lm.loss.kernels.row_update import row_update_kernel

# Aim for this many programs per launch of the row kernels (several per SM, so that enough
# loads are in flight to approach the memory bandwidth).
_ROW_PROGRAMS = 2048
# Vocabulary splits of the fused forward kernel: fixed, so that its compile-time tile count
# depends on V only (no recompilation when N changes); partials cost 24 bytes x splits x N.
_FWD_SPLITS = 8


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _row_launch(rows: int, cols: int) -> tuple[int, int, int, int]:
    """(BLOCK, num_warps, columns per program, splits) for the per-row kernels."""
    # Small blocks in the interpreter so that tests exercise several splits per row.
    block = min(64 if _interpret() else 4096, triton.next_power_of_2(max(cols, 16)))
    warps = 1 if _interpret() else (8 if block >= 2048 else 4)
    splits = max(1, min(triton.cdiv(_ROW_PROGRAMS, rows), triton.cdiv(cols, block)))
    per_prog = triton.cdiv(triton.cdiv(cols, splits), block) * block
    return block, warps, per_prog, triton.cdiv(cols, per_prog)


def _forward_tiles(vocab: int, bn: int) -> int:
    """BN-wide tiles per split."""
    return triton.cdiv(triton.cdiv(vocab, bn), _FWD_SPLITS)


# Hopper-friendly tile shapes; the fastest is picked once per (V, D) on first use.
_FWD_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 256, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 256, "BK": 64}, num_warps=8, num_stages=4),
    triton.Config({"BM": 256, "BN": 128, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 256, "BK": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 128, "BN": 64, "BK": 64}, num_warps=4, num_stages=5),
]
_fused_forward_tuned = triton.autotune(_FWD_CONFIGS, key=["N_COLS", "D"])(
    triton.heuristics({"TILES": lambda a: _forward_tiles(a["N_COLS"], a["BN"])})(
        fused_forward_kernel
    )
)

# The weight-gradient update's tiles. The autotuner times each config on the real C, so it
# restores C after each trial (an accumulating kernel would otherwise add the block many times).
_GRAD_W_CONFIGS = [
    triton.Config({"BM": 128, "BN": 256, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 256, "BK": 64}, num_warps=8, num_stages=4),
    triton.Config({"BM": 256, "BN": 128, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 128, "BN": 128, "BK": 32}, num_warps=4, num_stages=5),
]
# Keyed on C's row count rounded up to a power of two (``m_bucket``), not the count itself:
# the hidden-gradient use has C's rows = N tokens, and a new N per batch would retune each time.
# Only the accumulating variant restores C (its trials would otherwise add up); the writing
# one needs no copy of C, which for the weight gradient is V x D.
_grad_weight_tuned = {
    beta: triton.autotune(
        _GRAD_W_CONFIGS, key=["m_bucket", "dim"], restore_value=["c_ptr"] if beta else None
    )(grad_weight_kernel)
    for beta in (False, True)
}


class TritonBackend:
    """Epilogues and the fused forward as Triton kernels (CUDA, or ``TRITON_INTERPRET=1``)."""

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
        size, warps, _, _ = _row_launch(rows, cols)
        # One program per row (measured faster than splitting rows and merging partials).
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
        col0: int = 0,
        vocab: int | None = None,
    ) -> None:
        rows, cols = block.shape
        if rows == 0:
            return
        eps = cfg.label_smoothing
        size, warps, per_prog, splits = _row_launch(rows, cols)
        row_grad_kernel[(rows, splits)](
            block,
            block.stride(0),
            cols,
            col0,
            bias[col0:] if bias is not None else block,
            targets,
            lse.contiguous(),
            row_scale.contiguous(),
            cfg.ignore_index,
            eps / (vocab or cols),
            1.0 - eps,
            2.0 * cfg.z_loss,
            cfg.softcap or 1.0,
            COLS_PER_PROG=per_prog,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=cfg.softcap is not None,
            BLOCK=size,
            num_warps=warps,
        )

    def grad_weight_(
        self, grad_w: torch.Tensor, block: torch.Tensor, h_blk: torch.Tensor, beta: bool
    ) -> None:
        """``grad_w = beta * grad_w + block.T @ h_blk`` in place (fp32 accumulation, one
        rounding to grad_w's dtype), the old tile read while the products run. ``block`` may
        be any 2-D view (e.g. ``G.T`` for ``grad_h += G @ W``); the others need unit stride
        along their last axis."""
        rows, vocab = block.shape
        dim = h_blk.shape[1]
        if h_blk.stride(1) != 1:  # e.g. a column-major hidden or weight: copy the (K, D) rows
            h_blk = h_blk.contiguous()
        assert grad_w.stride(1) == 1  # the gradient buffers are ours, allocated contiguous
        args = (
            block,
            h_blk,
            grad_w,
            rows,
            vocab,
            triton.next_power_of_2(max(vocab, 1)),
            dim,
            block.stride(0),
            block.stride(1),
            h_blk.stride(0),
            grad_w.stride(0),
        )
        consts = dict(
            BETA=beta,
            IEEE_FP32=block.dtype == torch.float32,
            CAST_FP32=_interpret() and block.dtype != torch.float32,
        )
        if _interpret():
            bm, bn = 16, 32
            grid = (triton.cdiv(vocab, bm) * triton.cdiv(dim, bn),)
            grad_weight_kernel[grid](*args, **consts, BM=bm, BN=bn, BK=16, num_warps=1)
            return

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(vocab, meta["BM"]) * triton.cdiv(dim, meta["BN"]),)

        _grad_weight_tuned[beta][grid](*args, **consts)

    def forward_stats(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        cfg: LossConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged accumulators (5, N) and argmax (N) without materialising logits."""
        n, dim = hidden.shape
        vocab = weight.shape[0]
        acc, idx = new_accumulators(n, hidden.device)
        if n == 0:
            return acc, idx
        # Every program writes its partial (neutral for a split past V), so any tile config,
        # e.g. each one the autotuner tries, fills all SPLITS slots.
        part = torch.empty(_FWD_SPLITS, 5, n, dtype=torch.float32, device=hidden.device)
        part_idx = torch.empty(_FWD_SPLITS, n, dtype=torch.int32, device=hidden.device)
        args = (
            hidden,
            weight,
            bias if bias is not None else weight,
            targets,
            part,
            part_idx,
            n,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            cfg.ignore_index,
            cfg.softcap or 1.0,
        )
        consts = dict(
            N_COLS=vocab,
            D=dim,
            SPLITS=_FWD_SPLITS,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=cfg.softcap is not None,
            FAST_TANH=not _interpret() and hidden.dtype != torch.float32,
            STATS=cfg.stats,
            IEEE_FP32=hidden.dtype == torch.float32,
            CAST_FP32=_interpret() and hidden.dtype != torch.float32,
        )
        if _interpret():
            bm, bn = 16, 32
            grid = (triton.cdiv(n, bm) * _FWD_SPLITS,)
            tiles = _forward_tiles(vocab, bn)
            fused_forward_kernel[grid](
                *args, **consts, TILES=tiles, BM=bm, BN=bn, BK=16, num_warps=1
            )
        else:

            def grid(meta: dict) -> tuple[int]:
                return (triton.cdiv(n, meta["BM"]) * _FWD_SPLITS,)

            _fused_forward_tuned[grid](*args, **consts)
        merge_partials(acc, idx, part, part_idx)
        if not cfg.stats:  # not computed: make entropy lse - 1 rather than garbage
            acc[T] = acc[S]
        return acc, idx
