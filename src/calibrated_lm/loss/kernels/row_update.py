"""Kernel: merge one logit tile's per-row statistics into running accumulators.

One program per row of the tile. It streams the row once, keeping per-lane online-softmax
state (max m, sum exp(c - m), sum exp(c - m) c, sum c, first argmax), reduces the lanes,
then merges with the row's accumulators from earlier vocabulary tiles:

    m = max(m1, m2),  s = s1 e^(m1 - m) + s2 e^(m2 - m),  t likewise,  sumc = sumc1 + sumc2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from calibrated_lm.loss.kernels.math import capped_logits


@triton.jit
def row_update_kernel(
    block_ptr,
    stride_row,
    col0,
    bias_ptr,
    targets_ptr,
    acc_ptr,
    stride_acc,
    idx_ptr,
    ignore_index,
    softcap,
    N_COLS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n_cols = N_COLS
    r = tl.program_id(0)
    row_ptr = block_ptr + r.to(tl.int64) * stride_row
    bias_ptr = bias_ptr + col0
    offs = tl.arange(0, BLOCK)
    m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    t_vec = tl.zeros([BLOCK], tl.float32)
    sum_vec = tl.zeros([BLOCK], tl.float32)
    arg_vec = tl.zeros([BLOCK], tl.int32)
    for start in range(0, N_COLS, BLOCK):
        cols = start + offs
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
    lane = tl.exp(m_vec - m_blk)
    s_blk = tl.sum(s_vec * lane, axis=0)
    t_blk = tl.sum(t_vec * lane, axis=0)
    arg_blk = tl.min(tl.where(m_vec == m_blk, arg_vec, 2147483647), axis=0)
    sum_blk = tl.sum(sum_vec, axis=0)

    y = tl.load(targets_ptr + r)
    local = y - col0
    inside = (y != ignore_index) & (local >= 0) & (local < n_cols)
    safe = tl.where(inside, local, 0)
    # A one-element vector mask built by comparison: some Triton interpreters (3.9) reject a
    # broadcast scalar predicate as a load mask.
    lane0 = tl.arange(0, 1)
    zy = tl.sum(
        capped_logits(
            row_ptr,
            safe + lane0,
            lane0 < inside.to(tl.int32),
            bias_ptr,
            softcap,
            HAS_BIAS,
            HAS_SOFTCAP,
        ),
        axis=0,
    )
    cy_blk = tl.where(inside, zy, 0.0)

    m_old = tl.load(acc_ptr + r)
    s_old = tl.load(acc_ptr + stride_acc + r)
    t_old = tl.load(acc_ptr + 2 * stride_acc + r)
    sum_old = tl.load(acc_ptr + 3 * stride_acc + r)
    cy_old = tl.load(acc_ptr + 4 * stride_acc + r)
    idx_old = tl.load(idx_ptr + r)
    m = tl.maximum(m_old, m_blk)
    a_old = tl.exp(m_old - m)  # 0 on the first tile (m_old = -inf)
    a_blk = tl.exp(m_blk - m)
    tl.store(acc_ptr + r, m)
    tl.store(acc_ptr + stride_acc + r, s_old * a_old + s_blk * a_blk)
    tl.store(acc_ptr + 2 * stride_acc + r, t_old * a_old + t_blk * a_blk)
    tl.store(acc_ptr + 3 * stride_acc + r, sum_old + sum_blk)
    tl.store(acc_ptr + 4 * stride_acc + r, cy_old + cy_blk)
    tl.store(idx_ptr + r, tl.where(m_blk > m_old, arg_blk + col0, idx_old))
