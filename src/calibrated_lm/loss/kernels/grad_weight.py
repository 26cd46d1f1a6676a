"""Kernel: the weight-gradient update of one token block, ``C = beta * C + G.T @ H``.

G is a (R, V) gradient block, H the block's (R, D) hidden states, C the (V, D) weight gradient
(beta is 0 for the first block, 1 after). Each program owns one (BM, BN) tile of C: it reduces
over the R rows in BK steps with fp32 accumulation, adds the old C tile when BETA, and rounds
to C's dtype once.

Why not cuBLAS ``addmm``: at small R the update is on the roofline's ridge. Per element of C it
does 2 R flops against 4 bytes of bf16 read and write, so at R = 464 both take ~0.75 ms for the
Gemma-2 head (V 256,000, D 2,304) on an H100, yet addmm took 1.41 ms there (benchmarks/NOTES.md,
run 1): the read of C does not overlap its product. Here the old tile is loaded before the
reduction loop and added after it, so its read is in flight while the products run.

The same kernel computes any ``C = beta * C + A.T @ B`` with A given by its two strides
(``stride_g`` along the reduced axis, ``stride_gm`` along C's rows): the vocabulary-outer
order uses it for the hidden gradient, ``grad_h += G @ W_tile`` in float32, with A = G.T.

Programs are ordered with the D tiles of one V tile next to each other, so the G columns of a V
tile are read from HBM about once and then served from L2 to the other D tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grad_weight_kernel(
    g_ptr,
    h_ptr,
    c_ptr,
    n_rows,
    n_vocab,
    m_bucket,  # unused here: the autotuner's key (n_vocab rounded up to a power of two)
    dim,
    stride_g,
    stride_gm,
    stride_h,
    stride_c,
    BETA: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    CAST_FP32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)
    d_tiles = tl.cdiv(dim, BN)
    v0 = (pid // d_tiles) * BM
    d0 = (pid % d_tiles) * BN
    offs_v = v0 + tl.arange(0, BM)
    offs_d = d0 + tl.arange(0, BN)
    mask_v = offs_v < n_vocab
    mask_d = offs_d < dim
    c_ptrs = c_ptr + offs_v[:, None].to(tl.int64) * stride_c + offs_d[None, :]
    c_mask = mask_v[:, None] & mask_d[None, :]
    if BETA:
        # Issued here, used after the loop: the read is in flight while the products run
        # (a load feeding the first tl.dot as its accumulator would have to land first).
        old = tl.load(c_ptrs, mask=c_mask, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    for k0 in range(0, n_rows, BK):
        rows = k0 + offs_k
        mask_k = rows < n_rows
        # A (BK, BM) tile of G (for the weight gradient contiguous along the vocabulary,
        # stride_gm = 1), used transposed.
        g = tl.load(
            g_ptr
            + rows[:, None].to(tl.int64) * stride_g
            + offs_v[None, :].to(tl.int64) * stride_gm,
            mask=mask_k[:, None] & mask_v[None, :],
            other=0.0,
        )
        h = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * stride_h + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        )
        if CAST_FP32:  # the interpreter's low-precision dot is unreliable
            g = g.to(tl.float32)
            h = h.to(tl.float32)
        if IEEE_FP32:  # fp32 inputs: full precision, not TF32
            acc = tl.dot(tl.trans(g), h, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g), h, acc)
    if BETA:
        acc += old.to(tl.float32)
    # Round to nearest (the GPU default, stated; the interpreter truncates whatever is asked).
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=c_mask)
