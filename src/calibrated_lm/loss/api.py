"""Public entry point: :func:`linear_cross_entropy`."""

from __future__ import annotations

import os

import torch

from calibrated_lm.errors import UserError
from calibrated_lm.loss import autograd
from calibrated_lm.loss.config import LossConfig
from calibrated_lm.loss.engine import Backend
from calibrated_lm.loss.stats import LinearCrossEntropyStats
from calibrated_lm.loss.validation import (
    check_arguments,
    check_ignore_index,
    check_targets,
)

# What the kernels see as ignore_index when the caller ignores no target: after the range check
# no scored target can equal it, so it only marks the positions shift=True leaves unscored.
_UNSCORED = -100


def _backend(impl: str, device: torch.device) -> Backend:
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if impl == "torch":
        from calibrated_lm.loss.torch_chunked import TorchBackend

        return TorchBackend()
    if not _triton_available():
        raise UserError("impl='triton' needs the triton package (pip install triton).")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(
            f"impl='triton' needs CUDA tensors (got {device.type}); use impl='torch' or 'auto'."
        )
    from calibrated_lm.loss.triton_backend import TritonBackend

    return TritonBackend()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    z_loss: float = 0.0,
    shift: bool = False,
    return_stats: bool = False,
    impl: str = "auto",
    min_block_rows: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, LinearCrossEntropyStats]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` without materialising
    the N x V logits.

    Per valid token, with z = softcap(h @ W.T + b) (``s * tanh(z / s)`` when ``softcap`` is
    set), lse = logsumexp(z), eps = ``label_smoothing`` and V = ``weight.shape[0]``::

        loss = -sum_j q_j log softmax(z)_j + z_loss * lse**2,  q = (1 - eps) onehot(y) + eps / V

    i.e. ``F.cross_entropy(z, y, label_smoothing=eps)`` plus the z-loss. Positions whose target
    is ``ignore_index`` contribute 0 and are left out of the mean (all ignored: mean 0, zero
    gradients). ``ignore_index=None`` ignores no target: every target (with ``shift=True``,
    every one of ``targets[..., 1:]``) must then lie in [0, V).

    Args:
        hidden: (..., D) float32/bfloat16/float16; any strides.
        weight: (V, D), same dtype as ``hidden`` (e.g. ``lm_head.weight``).
        targets: (...) integers in [0, V) or ``ignore_index``.
        ignore_index: the target value that marks positions to skip (default -100, as in
            ``F.cross_entropy``), or None for none.
        bias: optional (V,). A -inf entry masks its token: at eps 0 the loss is then
            ``F.cross_entropy``'s, at eps > 0 it is +inf, as in PyTorch (the smoothed target
            gives the masked token mass); the stats' entropy is NaN there (0 * -inf in
            sum_j p_j z_j), so mask with a large finite negative bias where stats are read.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (float32 per-position loss shaped like
            ``targets``, or like ``targets[..., 1:]`` with ``shift=True``; 0 where ignored).
        shift: causal-LM shift: position t of ``hidden`` predicts ``targets[..., t + 1]``;
            nothing is copied (the last position of each sequence is simply skipped).
        return_stats: also return :class:`LinearCrossEntropyStats` (per-token lse, entropy,
            confidence = max probability, correct = argmax == target), computed in the same
            pass, shaped like the per-position loss.
        impl: ``"auto"`` (Triton epilogues on CUDA, PyTorch elsewhere), ``"triton"`` or
            ``"torch"``.
        min_block_rows: gradient pass only: at least this many tokens per (rows x V) logit
            block (default 0: the block is ~20% of the gradients' size). Larger blocks cost
            rows x V elements of memory and re-read the weight gradient less often, which
            matters when D is small (see ``chunking.grad_block_rows``). Results do not depend
            on it beyond float rounding.

    Returns:
        The float32 loss, or ``(loss, stats)`` when ``return_stats`` is set. Gradients flow to
        ``hidden``, ``weight`` and ``bias``.

    Raises:
        ValueError (:class:`calibrated_lm.errors.UserError`): bad shapes, dtypes, devices,
        targets outside [0, V), ``label_smoothing`` outside [0, 1], unknown ``reduction`` or
        ``impl``, ``softcap <= 0``, ``z_loss < 0``, a NaN or infinite setting,
        ``min_block_rows < 0``, an
        ``ignore_index`` that is neither an integer nor None.
    """
    check_arguments(
        hidden,
        weight,
        targets,
        bias,
        label_smoothing,
        reduction,
        softcap,
        z_loss,
        shift,
        impl,
        min_block_rows,
    )
    ignore = check_ignore_index(ignore_index)
    unscored = _UNSCORED if ignore is None else ignore
    vocab, dim = weight.shape
    if shift:
        # Position t is scored against targets[t + 1]; the last position gets ignore_index.
        # Only the (small) integer targets are rebuilt; hidden stays where it is.
        full_targets = torch.full_like(targets, unscored)
        full_targets[..., :-1] = targets[..., 1:]
    else:
        full_targets = targets
    token_shape = full_targets.shape
    h2 = hidden.reshape(-1, dim)
    # The kernels index targets and bias by position: a strided view would be read wrongly.
    y1 = full_targets.reshape(-1).long().contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if ignore is None:
        # Check the caller's scored targets themselves: -100 there is out of range, not skipped.
        scored = targets[..., 1:] if shift else targets
        n_valid = check_targets(scored.reshape(-1).long(), vocab, None)
    else:
        n_valid = check_targets(y1, vocab, ignore)
    cfg = LossConfig(
        label_smoothing=float(label_smoothing),
        ignore_index=unscored,
        softcap=None if softcap is None else float(softcap),
        z_loss=float(z_loss),
        stats=bool(return_stats),
        min_block_rows=min_block_rows,
    )
    backend = _backend(impl, hidden.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if needs_grad:
        loss, *stats = autograd.LinearCrossEntropyFunction.apply(
            h2, weight, bias, y1, cfg, backend, reduction, n_valid
        )
    else:
        loss, res = autograd.run_forward(h2, weight, bias, y1, cfg, backend, reduction, n_valid)
        stats = [res.lse, res.entropy, res.confidence, res.correct]

    def shaped(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(token_shape)
        return t[..., :-1] if shift else t

    if reduction == "none":
        loss = shaped(loss)
    if not return_stats:
        return loss
    return loss, LinearCrossEntropyStats(*(shaped(s) for s in stats))
