"""Kernel: overwrite a block of logits with its scaled loss gradient, in place.

    g_j = scale * (p_j (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == y]) * (1 - (c_j / s)^2)

with p_j = exp(c_j - lse), c the (softcapped) logits and the last factor only with a softcap.
``scale`` is 0 at ignored rows (zero gradient) and e.g. 1 / n_valid for a mean.
The block may hold vocabulary columns ``col0 : col0 + n_cols`` only (the vocabulary-outer
order); ``eps_over_v`` is eps over the whole vocabulary and the bias starts at ``col0``.
Grid (rows, splits): program (r, k) handles columns [k * COLS_PER_PROG, ...) of row r.
"""

from __future__ import annotations

import triton
import triton.language as tl

from calibrated_lm.loss.kernels.math import capped_logits


@triton.jit
def row_grad_kernel(
    block_ptr,
    stride_row,
    n_cols,
    col0,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    scale_ptr,
    ignore_index,
    eps_over_v,
    one_minus_eps,
    two_z_loss,
    softcap,
    COLS_PER_PROG: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    first = tl.program_id(1) * COLS_PER_PROG
    row_ptr = block_ptr + r.to(tl.int64) * stride_row
    lse = tl.load(lse_ptr + r)
    scale = tl.load(scale_ptr + r)
    y = tl.load(targets_ptr + r)
    y = tl.where(y == ignore_index, -1, y - col0)  # the target's column in this block
    p_factor = 1.0 + two_z_loss * lse
    offs = tl.arange(0, BLOCK)
    for start in range(0, COLS_PER_PROG, BLOCK):
        cols = first + start + offs
        mask = cols < n_cols
        c = capped_logits(row_ptr, cols, mask, bias_ptr, softcap, HAS_BIAS, HAS_SOFTCAP)
        g = tl.exp(c - lse) * p_factor - eps_over_v
        g = tl.where(cols == y, g - one_minus_eps, g)
        if HAS_SOFTCAP:
            x = c / softcap
            g = g * (1.0 - x * x)
        tl.store(row_ptr + cols, (g * scale).to(block_ptr.dtype.element_ty), mask=mask)
