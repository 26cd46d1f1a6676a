"""The autograd.Function tying the chunked engine to ``torch.autograd``.

For ``mean``/``sum`` the upstream gradient is one scalar, so the gradients are computed during
the forward pass (three matrix products in all; the logits are never recomputed) and the
backward pass only scales them. For ``none`` the upstream gradient differs per token and the
weight gradient cannot be rescaled afterwards, so the backward pass recomputes the logits
(four products).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from calibrated_lm.loss import chunking, engine
from calibrated_lm.loss.config import LossConfig


def _no_autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _reduce(per_token: torch.Tensor, reduction: str, n_valid: int) -> torch.Tensor:
    if reduction == "mean":
        return per_token.sum() / max(n_valid, 1)
    if reduction == "sum":
        return per_token.sum()
    return per_token


@_no_autocast
def run_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    cfg: LossConfig,
    backend: engine.Backend,
    reduction: str,
    n_valid: int,
) -> tuple[torch.Tensor, engine.TokenResults]:
    """Forward without autograd (evaluation): small tiles, no gradient buffers."""
    tile = chunking.forward_tile(
        hidden.shape[0], weight.shape[0], hidden.element_size(), hidden.is_cuda
    )
    res = engine.forward_only(hidden, weight, bias, targets, cfg, backend, tile)
    return _reduce(res.loss, reduction, n_valid), res


def _block_rows(
    hidden: torch.Tensor, weight: torch.Tensor, weight_grad: bool, cfg: LossConfig
) -> int:
    n, dim = hidden.shape
    return chunking.grad_block_rows(
        n,
        weight.shape[0],
        dim,
        hidden.element_size(),
        hidden.is_cuda,
        weight_grad,
        min_rows=cfg.min_block_rows,
    )


def _forward_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    row_scale: torch.Tensor,
    cfg: LossConfig,
    backend: engine.Backend,
    need: tuple[bool, bool, bool],
) -> tuple[engine.TokenResults, engine.Grads]:
    """The gradient pass in the loop order ``engine.loop_order()`` names (``auto``: the one
    ``engine.choose_order`` picks for this shape)."""
    rows = _block_rows(hidden, weight, need[1], cfg)
    n = hidden.shape[0]
    if engine.choose_order(engine.loop_order(), rows, n, hidden.is_cuda, need[1]) == "vocab":
        vocab = weight.shape[0]
        on_gpu, size = hidden.is_cuda, hidden.element_size()
        cols = chunking.grad_block_cols(n, vocab, hidden.shape[1], size, on_gpu, need[1])
        return engine.forward_backward_vocab_outer(
            hidden, weight, bias, targets, row_scale, cfg, backend, cols, need
        )
    return engine.forward_backward(
        hidden, weight, bias, targets, row_scale, cfg, backend, rows, need
    )


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Inputs: hidden (N, D), weight (V, D), bias (V,) or None, targets (N,), then settings.
    Outputs: reduced loss, then per-token lse, entropy, confidence, correct (no gradient)."""

    # Autocast must not re-type the products into the preallocated buffers: the inputs
    # arrive in the dtype to compute in (callers cast first, as F.linear would under autocast).
    @staticmethod
    @_no_autocast
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        cfg: LossConfig,
        backend: engine.Backend,
        reduction: str,
        n_valid: int,
    ) -> tuple[torch.Tensor, ...]:
        need = tuple(ctx.needs_input_grad[:3])
        ctx.cfg, ctx.backend, ctx.reduction, ctx.need = cfg, backend, reduction, need
        ctx.bias_dtype = bias.dtype if bias is not None else None
        valid = targets != cfg.ignore_index
        if reduction == "none":
            res = engine.forward_only(
                hidden,
                weight,
                bias,
                targets,
                cfg,
                backend,
                chunking.forward_tile(
                    hidden.shape[0], weight.shape[0], hidden.element_size(), hidden.is_cuda
                ),
            )
            ctx.save_for_backward(hidden, weight, bias, targets)
            ctx.grads = None
        else:
            scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
            row_scale = valid.float() * scale
            res, grads = _forward_backward(
                hidden, weight, bias, targets, row_scale, cfg, backend, need
            )
            ctx.grads = grads
        loss = _reduce(res.loss, reduction, n_valid)
        ctx.mark_non_differentiable(res.lse, res.entropy, res.confidence, res.correct)
        return loss, res.lse, res.entropy, res.confidence, res.correct

    @staticmethod
    @_no_autocast
    def backward(ctx: Any, grad_loss: torch.Tensor, *unused: Any) -> tuple[Any, ...]:
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            valid = targets != ctx.cfg.ignore_index
            g = grad_loss.float()
            row_scale = torch.where(valid, g, torch.zeros_like(g)).contiguous()
            _, grads = _forward_backward(
                hidden, weight, bias, targets, row_scale, ctx.cfg, ctx.backend, ctx.need
            )
        else:
            grads = ctx.grads
            if grads is None:
                raise RuntimeError(
                    "linear_cross_entropy's gradients were already consumed; "
                    "backward through it twice is not supported."
                )
            ctx.grads = None
            # One device sync; skips a pass over the weight gradient in the common case g = 1.
            if bool(grad_loss != 1):
                g = grad_loss.float()
                grads = engine.Grads(*(None if x is None else x.mul_(g) for x in grads))
        grad_b = grads.bias.to(ctx.bias_dtype) if grads.bias is not None else None
        return grads.hidden, grads.weight, grad_b, None, None, None, None, None
