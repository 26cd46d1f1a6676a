"""How many tokens (and vocabulary entries) one step of the chunked loop handles.

The gradient pass keeps one (rows x V) logit/gradient block in the input dtype. Its size is a
fraction of the gradient outputs themselves, so that peak extra memory stays near
``(1 + fraction) x`` the gradients; larger blocks mean fewer read-modify-writes of the
weight gradient (one per block), so the fraction trades memory for speed.
The forward-only pass (no gradient) uses (rows x cols) tiles of a fixed small size.
"""

from __future__ import annotations

import os

MIB = 1 << 20
# Fraction of the gradient outputs' size given to the logit block on GPUs (env override for
# benchmarks: CALIBRATED_LM_LCE_MEMORY_FRACTION).
DEFAULT_MEMORY_FRACTION = 0.2
_GPU_MIN_BLOCK = 32 * MIB
_CPU_BLOCK = 16 * MIB
_GPU_FORWARD_TILE = 12 * MIB
_CPU_FORWARD_TILE = 16 * MIB


def memory_fraction() -> float:
    return float(os.environ.get("CALIBRATED_LM_LCE_MEMORY_FRACTION", DEFAULT_MEMORY_FRACTION))


def _grad_block_bytes(
    n: int, vocab: int, dim: int, elem_bytes: int, on_gpu: bool, weight_grad: bool
) -> float:
    """Bytes of the gradient pass's logit block: on GPUs the memory fraction of the gradient
    outputs (at least 32 MiB), on the CPU a fixed 16 MiB."""
    if not on_gpu:
        return _CPU_BLOCK
    grad_bytes = ((vocab * dim if weight_grad else 0) + n * dim) * elem_bytes
    return max(memory_fraction() * grad_bytes, _GPU_MIN_BLOCK)


def grad_block_rows(
    n: int,
    vocab: int,
    dim: int,
    elem_bytes: int,
    on_gpu: bool,
    weight_grad: bool,
    min_rows: int = 0,
) -> int:
    """Rows per block of the fused forward+gradient pass (a multiple of 16, at most ``n``).

    The memory-fraction rule makes blocks of rows ~ fraction x D, so a small hidden size
    gives small blocks, and the weight gradient's read-modify-write (2 x V x D elements per
    block) then outweighs the block's three products. In bf16 that traffic takes
    ``(4 V D / bandwidth) / (6 rows V D / flops)`` = ``2 flops / (3 bandwidth rows)`` of the
    products' time, about 190 / rows at ~700 TFLOP/s and ~2.5 TB/s (an H100): a ratio set by
    the rows alone, not by V or D. ``min_rows`` puts a floor on the rows (memory
    grows by rows x V elements) for callers that can spare it, such as a training step whose
    activations dwarf the block.
    """
    budget = _grad_block_bytes(n, vocab, dim, elem_bytes, on_gpu, weight_grad)
    rows = int(budget // (vocab * elem_bytes)) // 16 * 16
    rows = max(rows, -(-min_rows // 16) * 16)
    return max(1, min(n, max(16, rows)))


def grad_block_cols(
    n: int, vocab: int, dim: int, elem_bytes: int, on_gpu: bool, weight_grad: bool
) -> int:
    """Vocabulary columns per (N x cols) block of the vocabulary-outer gradient pass (a
    multiple of 128 unless V is smaller): the same memory budget as ``grad_block_rows``'s
    block, spent on all N tokens at once. Its float32 (N, D) hidden-gradient accumulator
    comes on top."""
    budget = _grad_block_bytes(n, vocab, dim, elem_bytes, on_gpu, weight_grad)
    cols = int(budget // (max(n, 1) * elem_bytes)) // 128 * 128
    return max(1, min(vocab, max(128, cols)))


def forward_tile(n: int, vocab: int, elem_bytes: int, on_gpu: bool) -> tuple[int, int]:
    """(rows, cols) of the logit tile used when no gradient is needed."""
    budget = _GPU_FORWARD_TILE if on_gpu else _CPU_FORWARD_TILE
    rows = max(1, min(n, 4096))
    cols = int(budget // (rows * elem_bytes)) // 128 * 128
    return rows, max(1, min(vocab, max(128, cols)))
