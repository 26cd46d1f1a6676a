"""Small device functions shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh via exp, sign-symmetric so that exp never overflows into a NaN."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def capped_logits(
    block_ptr, cols, mask, bias_ptr, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr
):
    """Load logits z (float32), add the bias, apply softcap s * tanh(z / s)."""
    z = tl.load(block_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def tanh_approx(x):
    """Hardware tanh (MUFU, max. relative error ~2^-11); only for 16-bit inputs, whose logits
    already carry ~2^-9 rounding error. Not available in the interpreter."""
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
    )
