"""The chunked loops shared by the PyTorch and Triton implementations.

Logit blocks come from ordinary matrix products (cuBLAS on GPUs) into one reusable buffer in
the input dtype; a *backend* turns each block into running per-token statistics and, in the
gradient pass, overwrites it in place with ``dL/dz`` so that the same buffer feeds the two
gradient products. Nothing of size N x V is ever allocated.

Running statistics per token (float32, merged across vocabulary tiles like an online softmax):
``m`` = max_j c_j, ``s`` = sum_j exp(c_j - m), ``t`` = sum_j exp(c_j - m) c_j,
``sumc`` = sum_j c_j, ``cy`` = c_y and ``idx`` = argmax_j c_j. From these:
lse = m + log s, entropy = lse - t / s, confidence = exp(m - lse) = 1 / s.
"""

from __future__ import annotations

import os
from contextlib import nullcontext as _nullcontext
from typing import NamedTuple, Protocol

import torch

from calibrated_lm.loss.config import LossConfig

# Rows of the float32 accumulator tensor.
M, S, T, SUMC, CY = range(5)


class TokenResults(NamedTuple):
    loss: torch.Tensor  # per token, float32, 0 at ignored positions
    lse: torch.Tensor
    entropy: torch.Tensor
    confidence: torch.Tensor
    correct: torch.Tensor


class Backend(Protocol):
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
        """Merge the statistics of ``block`` (rows x cols logits of vocabulary columns
        ``col0:col0+cols``) into ``acc`` (5 x rows) and ``idx`` (rows) in place."""

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
        """Overwrite ``block`` (rows x cols logits of vocabulary columns ``col0:col0+cols``
        of a ``vocab``-entry vocabulary, all of it by default) with
        ``row_scale[:, None] * dL/dz``."""


def new_accumulators(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.zeros(5, n, dtype=torch.float32, device=device)
    acc[M].fill_(float("-inf"))
    return acc, torch.zeros(n, dtype=torch.int32, device=device)


def merge_partials(
    acc: torch.Tensor, idx: torch.Tensor, part: torch.Tensor, part_idx: torch.Tensor
) -> None:
    """Merge per-split statistics ``part`` (S, 5, R) and argmaxes ``part_idx`` (S, R), whose
    splits cover later and later vocabulary columns, into ``acc`` (5, R) and ``idx`` (R)."""
    parts = torch.cat([acc[None], part], 0)
    m = parts[:, M].max(0).values
    w = torch.exp(parts[:, M] - m)  # -inf partials (nothing seen yet) get weight 0
    acc[S] = (parts[:, S] * w).sum(0)
    acc[T] = (parts[:, T] * w).sum(0)
    acc[SUMC] = parts[:, SUMC].sum(0)
    acc[CY] = parts[:, CY].sum(0)
    # The first split reaching the max holds the first argmax (torch.argmax's tie rule).
    first = (parts[:, M] == m).int().argmax(0)
    idxs = torch.cat([idx[None], part_idx.to(idx.dtype)], 0)
    idx.copy_(idxs.gather(0, first[None])[0])
    acc[M] = m


def finalize(
    acc: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, vocab: int, cfg: LossConfig
) -> TokenResults:
    """Per-token loss and statistics from the merged accumulators."""
    eps = cfg.label_smoothing
    lse = acc[M] + torch.log(acc[S])
    entropy = lse - acc[T] / acc[S]
    confidence = torch.exp(acc[M] - lse)
    valid = targets != cfg.ignore_index
    loss = lse - (1.0 - eps) * acc[CY]
    if eps:  # skipped at eps 0: a -inf logit (a bias masking a token) makes sum_j c_j = -inf
        loss = loss - (eps / vocab) * acc[SUMC]
    if cfg.z_loss:
        loss = loss + cfg.z_loss * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    correct = (idx.long() == targets) & valid
    return TokenResults(loss, lse, entropy, confidence, correct)


def forward_only(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    cfg: LossConfig,
    backend: Backend,
    tile: tuple[int, int],
) -> TokenResults:
    """Loss and statistics without gradients, over (rows x cols) logit tiles."""
    acc, idx = _statistics(hidden, weight, bias, targets, cfg, backend, tile)
    return finalize(acc, idx, targets, weight.shape[0], cfg)


def _statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    cfg: LossConfig,
    backend: Backend,
    tile: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged accumulators (5, N) and argmax (N): the backend's fused kernel where it has one,
    else (rows x cols) logit tiles."""
    fused = getattr(backend, "forward_stats", None)
    if fused is not None:  # on-chip logits, no tiles in memory
        return fused(hidden, weight, bias, targets, cfg)
    rows, cols = tile
    buf = torch.empty(rows * cols, dtype=hidden.dtype, device=hidden.device)
    return _tile_statistics(hidden, weight, bias, targets, cfg, backend, rows, cols, buf)


def _tile_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    cfg: LossConfig,
    backend: Backend,
    rows: int,
    cols: int,
    buf: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulators and argmax merged over (rows x cols) logit tiles, each a cuBLAS product
    into ``buf`` (at least rows x cols elements) that the backend reduces."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    acc, idx = new_accumulators(n, hidden.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        for c0 in range(0, vocab, cols):
            c1 = min(vocab, c0 + cols)
            block = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.mm(hidden[r0:r1], weight[c0:c1].T, out=block)
            backend.update(acc[:, r0:r1], idx[r0:r1], block, c0, bias, targets[r0:r1], cfg)
    return acc, idx


class Grads(NamedTuple):
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None  # float32


def forward_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    row_scale: torch.Tensor,
    cfg: LossConfig,
    backend: Backend,
    block_rows: int,
    need: tuple[bool, bool, bool],
) -> tuple[TokenResults, Grads]:
    """Loss, statistics and the gradients of ``sum_i row_scale_i * loss_i``.

    Per block of rows: logits = h_blk @ W.T (one product), statistics, in-place gradient,
    then grad_h[blk] = G @ W and grad_W += G.T @ h_blk (two products). The weight gradient is
    accumulated in its own dtype (fp32 accumulation inside each product, one rounding per
    block), so no extra V x D buffer is needed.
    """
    n, dim = hidden.shape
    vocab = weight.shape[0]
    acc, idx = new_accumulators(n, hidden.device)
    grad_h = torch.empty(n, dim, dtype=hidden.dtype, device=hidden.device) if need[0] else None
    # The first block writes the weight gradient (beta = 0), so only an empty problem needs zeros.
    new_w = torch.empty if n > 0 else torch.zeros
    grad_w = new_w(weight.shape, dtype=weight.dtype, device=weight.device) if need[1] else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need[2] else None
    buf = torch.empty(min(block_rows, n) * vocab, dtype=hidden.dtype, device=hidden.device)
    # The weight-gradient update (memory-bound at small blocks) and the hidden-gradient product
    # (compute-bound) only read the gradient block: run them concurrently on two streams.
    side = _side_stream(hidden.device) if grad_w is not None and grad_h is not None else None
    main = torch.cuda.current_stream(hidden.device) if side is not None else None
    own_update = getattr(backend, "grad_weight_", None) if _own_grad_w() else None
    for i, r0 in enumerate(range(0, n, block_rows)):
        r1 = min(n, r0 + block_rows)
        h_blk = hidden[r0:r1]
        block = buf[: (r1 - r0) * vocab].view(r1 - r0, vocab)
        torch.mm(h_blk, weight.T, out=block)
        backend.update(acc[:, r0:r1], idx[r0:r1], block, 0, bias, targets[r0:r1], cfg)
        lse = acc[M, r0:r1] + torch.log(acc[S, r0:r1])
        backend.grad_(block, lse, targets[r0:r1], bias, row_scale[r0:r1], cfg)
        if side is not None:
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else _nullcontext():
            if grad_w is not None:
                if own_update is not None:
                    own_update(grad_w, block, h_blk, i > 0)
                elif i == 0:
                    torch.mm(block.T, h_blk, out=grad_w)
                else:
                    grad_w.addmm_(block.T, h_blk)
        if grad_h is not None:
            torch.mm(block, weight, out=grad_h[r0:r1])
        if grad_b is not None:
            grad_b += block.sum(0, dtype=torch.float32)
        if side is not None:
            main.wait_stream(side)  # the next block overwrites the buffer
    return finalize(acc, idx, targets, vocab, cfg), Grads(grad_h, grad_w, grad_b)


def _own_grad_w() -> bool:
    """Whether the weight-gradient update runs as the backend's own kernel (the Triton one:
    ``CALIBRATED_LM_LCE_GRAD_W=triton``) instead of cuBLAS ``addmm``. Off by default until a
    device benchmark (``benchmarks/bench_grad_weight.py``) shows it faster."""
    return os.environ.get("CALIBRATED_LM_LCE_GRAD_W", "cublas") == "triton"


def forward_backward_vocab_outer(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    row_scale: torch.Tensor,
    cfg: LossConfig,
    backend: Backend,
    block_cols: int,
    need: tuple[bool, bool, bool],
) -> tuple[TokenResults, Grads]:
    """The same results as :func:`forward_backward`, in the vocabulary-outer order.

    Two passes over tiles of ``block_cols`` vocabulary columns, all N tokens each. The first
    computes the tiles' logits and merges their statistics (lse). The second computes each
    tile's logits again, overwrites them with the gradient, writes grad_W[tile] = G.T @ h once
    (no read-modify-write of the V x D weight gradient) and adds grad_h += G @ W[tile] into
    a float32 (N, D) accumulator, rounded to the input dtype at the end. That is four
    N x V x D products instead of three (the logits twice), traded for the token order's
    weight-gradient traffic (4 V D bytes per token block in bf16), which outweighs a product
    when its token blocks are small (small D: ``chunking.grad_block_rows``). Extra memory:
    the (N, block_cols) block and 4 N D bytes.
    """
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cols = max(1, min(block_cols, vocab))
    buf = torch.empty(n * cols, dtype=hidden.dtype, device=hidden.device)
    # The statistics from the very tiles the gradient pass recomputes, so that the gradient's
    # softmax sums to one over its own (rounded, capped) logits. The fused kernel's fp32
    # on-chip logits would not: with bf16 inputs and confident targets that mismatch made the
    # hidden gradient's error several times the token order's (the test
    # test_vocab_order_is_as_exact_as_token_order_in_bf16_when_confident).
    acc, idx = _tile_statistics(hidden, weight, bias, targets, cfg, backend, max(n, 1), cols, buf)
    lse = acc[M] + torch.log(acc[S])
    dev = hidden.device
    grad_h32 = torch.zeros(n, dim, dtype=torch.float32, device=dev) if need[0] else None
    # Every tile writes its rows of the weight gradient, so only an empty problem needs zeros.
    new_w = torch.empty if n > 0 else torch.zeros
    grad_w = new_w(weight.shape, dtype=weight.dtype, device=dev) if need[1] else None
    grad_b = new_w(vocab, dtype=torch.float32, device=dev) if need[2] else None
    # On CUDA the hidden gradient accumulates in fp32 through the backend's Triton update
    # (whatever CALIBRATED_LM_LCE_GRAD_W says: cuBLAS has no in-place bf16 x bf16 -> fp32 add).
    own = getattr(backend, "grad_weight_", None)
    for c0 in range(0, vocab if n > 0 else 0, cols):
        c1 = min(vocab, c0 + cols)
        w_tile = weight[c0:c1]
        block = buf[: n * (c1 - c0)].view(n, c1 - c0)
        torch.mm(hidden, w_tile.T, out=block)
        backend.grad_(block, lse, targets, bias, row_scale, cfg, col0=c0, vocab=vocab)
        if grad_w is not None:
            torch.mm(block.T, hidden, out=grad_w[c0:c1])
        if grad_h32 is not None:
            if own is not None:  # fp32 accumulation of bf16 products, no temporary
                own(grad_h32, block.T, w_tile, True)
            elif block.dtype == torch.float32:
                grad_h32.addmm_(block, w_tile)
            else:  # each tile's product rounded once to the input dtype, then summed in fp32
                grad_h32 += torch.mm(block, w_tile)
        if grad_b is not None:
            grad_b[c0:c1] = block.sum(0, dtype=torch.float32)
    grad_h = grad_h32.to(hidden.dtype) if grad_h32 is not None else None
    return finalize(acc, idx, targets, vocab, cfg), Grads(grad_h, grad_w, grad_b)


# ``auto``'s threshold. Session 25 (benchmarks/results/session25/, one H100, N 8,192, V 262,144,
# bf16) timed the vocabulary-outer order against the token order at five token-block sizes:
# 0.67x at 128 rows, 0.82x at 208, then 1.03x at 304 and 1.15x at 416 and 464. The update's
# share of a block's time goes as 1 / rows (chunking.grad_block_rows), so the crossover is set
# by the rows; 256 lies between the last measured win and the first loss.
AUTO_VOCAB_MAX_ROWS = 256


def loop_order() -> str:
    """``token`` (token blocks outer: :func:`forward_backward`, the default), ``vocab``
    (:func:`forward_backward_vocab_outer`) or ``auto`` (:func:`choose_order`), from
    ``CALIBRATED_LM_LCE_ORDER``. The default stays ``token``: the crossover is measured at one
    N, and issue 12's claim-3 runs keep one kernel."""
    order = os.environ.get("CALIBRATED_LM_LCE_ORDER", "token")
    if order not in ("token", "vocab", "auto"):
        raise ValueError(
            f"CALIBRATED_LM_LCE_ORDER must be 'token', 'vocab' or 'auto', not {order!r}"
        )
    return order


def choose_order(
    order: str, token_rows: int, n_tokens: int, on_gpu: bool, weight_grad: bool
) -> str:
    """The loop order to run: ``order`` itself unless it is ``auto``. ``auto`` takes ``vocab``
    on a GPU when the weight gradient is wanted and the token order would cut the ``n_tokens``
    rows into several blocks of at most :data:`AUTO_VOCAB_MAX_ROWS` rows (small hidden sizes:
    the per-block weight-gradient update then dominates), else ``token``. One block writes the
    weight gradient once in either order, so it stays ``token``; so does a ``min_block_rows``
    floor above the threshold (``patch_model``'s 1,024: large blocks, a small update share).
    On the CPU it is always ``token``: only GPU timings back the choice."""
    if order != "auto":
        return order
    small_blocks = token_rows <= AUTO_VOCAB_MAX_ROWS and token_rows < n_tokens
    return "vocab" if on_gpu and weight_grad and small_blocks else "token"


# One side stream per device, made once. torch keeps a cuBLAS workspace (32 MiB on Hopper) per
# stream that a product ran on, for the life of the process, and ``torch.cuda.Stream()`` hands
# out the next of a pool of 32 streams: a new stream per call left one more workspace behind at
# every call, up to 1 GiB. That is what the H200 TRL step's memory record fits
# (benchmarks/results/session14/): 0.25 GiB more allocated than TRL's before step 9 (eight
# earlier steps' workspaces) and a new 32 MiB block at the side stream's first product in the
# step; tests/test_loss_triton.py checks on a GPU that repeated calls no longer grow memory.
# Every call on a device shares this stream (each call orders it against its own current
# stream at the start and end), so a thread capturing a CUDA graph on that device must not
# run beside another thread's loss calls; CALIBRATED_LM_LCE_STREAMS=0 turns the stream off.
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The device's second CUDA stream (the same one on every call), unless disabled
    (CALIBRATED_LM_LCE_STREAMS=0) or not on CUDA."""
    if device.type != "cuda" or os.environ.get("CALIBRATED_LM_LCE_STREAMS", "1") == "0":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return stream
