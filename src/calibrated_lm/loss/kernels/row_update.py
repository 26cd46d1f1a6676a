"""Kernel: per-row softmax statistics of one slice of a logit block (partials).

Grid (rows, splits): program (r, k) streams columns [k * COLS_PER_PROG, (k + 1) * COLS_PER_PROG)
of row r once, keeping per-lane online-softmax state (max m, sum exp(c - m),
sum exp(c - m) c, sum c, first argmax), reduces the lanes and writes one partial per
(split, row); ``engine.merge_partials`` combines them:

    m = max(m1, m2),  s = s1 e^(m1 - m) + s2 e^(m2 - m),  t likewise,  sumc = sumc1 + sumc2.

Splitting a row over several programs keeps enough loads in flight to approach the memory
bandwidth when there are only a few hundred rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from calibrated_lm.loss.kernels.math import capped_logits


@triton.jit
def row_partial_stats_kernel(
    block_ptr,
    stride_row,
    n_cols,
    bias_ptr,
    targets_ptr,
    part_ptr,
    part_idx_ptr,
    n_rows,
    ignore_index,
    softcap,
    COLS_PER_PROG: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    k = tl.program_id(1)
    row_ptr = block_ptr + r.to(tl.int64) * stride_row
    first = k * COLS_PER_PROG
    offs = tl.arange(0, BLOCK)
    m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    t_vec = tl.zeros([BLOCK], tl.float32)
    sum_vec = tl.zeros([BLOCK], tl.float32)
    arg_vec = tl.zeros([BLOCK], tl.int32)
    for start in range(0, COLS_PER_PROG, BLOCK):
        cols = first + start + offs
        mask = cols < n_cols
        z = capped_logits(row_ptr, cols, mask, bias_ptr, softcap, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(mask, z, 0.0)
        c = tl.where(mask, z, float("-inf"))
        sum_vec += z
        m_new = tl.maximum(m_vec, c)
        # Strict '>': each lane keeps its first column reaching the max (torch.argmax ties).
        arg_vec = tl.where(c > m_vec, cols, arg_vec)
        # A lane that has seen only padding keeps m = -inf; shift by 0 there (no -inf - -inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_vec - m_safe)
        e = tl.exp(c - m_safe)
        s_vec = s_vec * alpha + e
        t_vec = t_vec * alpha + e * z
        m_vec = m_new
    m_blk = tl.max(m_vec, axis=0)
    m_blk_safe = tl.where(m_blk == float("-inf"), 0.0, m_blk)
    lane = tl.exp(m_vec - m_blk_safe)
    s_blk = tl.sum(s_vec * lane, axis=0)
    t_blk = tl.sum(t_vec * lane, axis=0)
    arg_blk = tl.min(tl.where(m_vec == m_blk, arg_vec, 2147483647), axis=0)
    sum_blk = tl.sum(sum_vec, axis=0)

    y = tl.load(targets_ptr + r)
    inside = (y != ignore_index) & (y >= first) & (y < first + COLS_PER_PROG) & (y < n_cols)
    safe = tl.where(inside, y, 0)
    zy = tl.sum(
        capped_logits(
            row_ptr, safe + tl.arange(0, 1), inside, bias_ptr, softcap, HAS_BIAS, HAS_SOFTCAP
        ),
        axis=0,
    )
    out = part_ptr + k * 5 * n_rows + r
    tl.store(out, m_blk)
    tl.store(out + n_rows, s_blk)
    tl.store(out + 2 * n_rows, t_blk)
    tl.store(out + 3 * n_rows, sum_blk)
    tl.store(out + 4 * n_rows, tl.where(inside, zy, 0.0))
    tl.store(part_idx_ptr + k * n_rows + r, arg_blk)
