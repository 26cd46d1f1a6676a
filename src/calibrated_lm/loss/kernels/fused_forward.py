"""Kernel: logits tiles computed on chip and reduced at once (forward without gradient).

A 1-D grid of (token block, vocabulary split) programs, splits varying fastest: the ~132
programs resident at a time then cover ~16 token blocks x all SPLITS splits, so both the
token blocks of h and the current W tiles stay in L2 (token blocks fastest would stream a
new h block from HBM for every W tile once N * D no longer fits in L2).

Program (i, k) owns BM tokens and the vocabulary columns [k * TILES * BN, (k + 1) * TILES * BN).
For each BN-wide tile it computes the BM x BN logits with ``tl.dot`` over D in BK steps
(float32 accumulation), adds the bias, applies the softcap, and folds the tile into per-token
online-softmax state (max m, sum exp(c - m), sum c, and with STATS also sum exp(c - m) c and
the first argmax). The split k = 0 also computes the target logit h . w_y (+ b_y, capped).
One partial per (split, token) is written, neutral (m = -inf, sums 0) for a split past V;
``engine.merge_partials`` combines them. Nothing of size N x V touches memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from calibrated_lm.loss.kernels.math import tanh, tanh_approx


@triton.jit
def _cap(z, softcap, HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr):
    if HAS_SOFTCAP:
        if FAST_TANH:
            z = softcap * tanh_approx(z / softcap)
        else:
            z = softcap * tanh(z / softcap)
    return z


@triton.jit
def fused_forward_kernel(
    h_ptr,
    w_ptr,
    bias_ptr,
    targets_ptr,
    part_ptr,
    part_idx_ptr,
    n_rows,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    ignore_index,
    softcap,
    N_COLS: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    TILES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr,
    STATS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    CAST_FP32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    n_cols = N_COLS
    pid = tl.program_id(0)
    i = pid // SPLITS
    k = pid % SPLITS
    rows = i * BM + tl.arange(0, BM)
    row_mask = rows < n_rows
    ks = tl.arange(0, BK)
    h_base = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    m = tl.full([BM], float("-inf"), tl.float32)
    s = tl.zeros([BM], tl.float32)
    t = tl.zeros([BM], tl.float32)
    sumc = tl.zeros([BM], tl.float32)
    arg = tl.zeros([BM], tl.int32)
    for j in range(TILES):
        v0 = (k * TILES + j) * BN
        cols = v0 + tl.arange(0, BN)
        col_mask = cols < n_cols
        w_base = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
        acc = tl.zeros([BM, BN], tl.float32)
        for d0 in range(0, D, BK):
            kk = d0 + ks
            a = tl.load(
                h_base + kk[None, :] * stride_hd,
                mask=row_mask[:, None] & (kk < D)[None, :],
                other=0.0,
            )
            b = tl.load(
                w_base + kk[:, None] * stride_wd,
                mask=col_mask[None, :] & (kk < D)[:, None],
                other=0.0,
            )
            if CAST_FP32:  # the interpreter's low-precision dot is unreliable
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE_FP32:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        z = acc
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        z = _cap(z, softcap, HAS_SOFTCAP, FAST_TANH)
        zz = tl.where(col_mask[None, :], z, 0.0)
        c = tl.where(col_mask[None, :], z, float("-inf"))
        tile_max = tl.max(c, axis=1)
        m_new = tl.maximum(m, tile_max)
        # A tile past V (last split only) leaves m = -inf: shift by 0 there, no -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(c - m_safe[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        sumc += tl.sum(zz, axis=1)
        if STATS:
            t = t * alpha + tl.sum(e * zz, axis=1)
            tile_arg = tl.argmax(c, axis=1, tie_break_left=True)
            arg = tl.where(tile_max > m, tile_arg + v0, arg)
        m = m_new

    # Target logit, once per token (split 0): a BM x D gather-dot, ~1/TILES of the work.
    cy = tl.zeros([BM], tl.float32)
    if k == 0:
        y = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
        has_y = row_mask & (y != ignore_index)
        y_base = w_ptr + tl.where(has_y, y, 0).to(tl.int64)[:, None] * stride_wv
        for d0 in range(0, D, BK):
            kk = d0 + ks
            dmask = (kk < D)[None, :]
            a = tl.load(h_base + kk[None, :] * stride_hd, mask=has_y[:, None] & dmask, other=0.0)
            wy = tl.load(y_base + kk[None, :] * stride_wd, mask=has_y[:, None] & dmask, other=0.0)
            cy += tl.sum(a.to(tl.float32) * wy.to(tl.float32), axis=1)
        if HAS_BIAS:
            cy += tl.load(bias_ptr + tl.where(has_y, y, 0), mask=has_y, other=0.0).to(tl.float32)
        cy = tl.where(has_y, _cap(cy, softcap, HAS_SOFTCAP, FAST_TANH), 0.0)

    out = part_ptr + k * 5 * n_rows + rows
    tl.store(out, m, mask=row_mask)
    tl.store(out + n_rows, s, mask=row_mask)
    tl.store(out + 2 * n_rows, t, mask=row_mask)
    tl.store(out + 3 * n_rows, sumc, mask=row_mask)
    tl.store(out + 4 * n_rows, cy, mask=row_mask)
    tl.store(part_idx_ptr + k * n_rows + rows, arg, mask=row_mask)
