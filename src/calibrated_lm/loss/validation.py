"""Argument checks for :func:`calibrated_lm.loss.linear_cross_entropy`.

Every failure the caller can fix raises :class:`calibrated_lm.errors.UserError`
(a ``ValueError``) with one sentence naming the offending argument.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

from calibrated_lm.errors import UserError

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_arguments(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    label_smoothing: float,
    reduction: str,
    softcap: float | None,
    z_loss: float,
    shift: bool,
    impl: str,
    min_block_rows: int = 0,
) -> None:
    """Check shapes, dtypes and hyper-parameters; cheap, never synchronises the device."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if hidden.dim() < 1:
        raise UserError("hidden must have shape (..., D) with at least one dimension.")
    if weight.dim() != 2:
        raise UserError(f"weight must have shape (V, D), got {tuple(weight.shape)}.")
    vocab, dim = weight.shape
    if vocab < 1 or dim < 1:
        raise UserError(f"weight must have V >= 1 and D >= 1, got {tuple(weight.shape)}.")
    if hidden.shape[-1] != dim:
        raise UserError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's D ({dim})."
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise UserError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
            f"dimension), got {tuple(targets.shape)}."
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise UserError(f"targets must be an integer tensor, got {targets.dtype}.")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise UserError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}.")
    if weight.dtype != hidden.dtype:
        raise UserError(
            f"weight's dtype ({weight.dtype}) must equal hidden's dtype ({hidden.dtype})."
        )
    if hidden.device != weight.device or targets.device != hidden.device:
        raise UserError("hidden, weight and targets must be on the same device.")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (vocab,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise UserError(f"bias must have shape ({vocab},), got {shape}.")
        if bias.device != hidden.device:
            raise UserError("bias must be on the same device as hidden.")
        if not bias.dtype.is_floating_point:
            raise UserError(f"bias must be a floating-point tensor, got {bias.dtype}.")
    check_settings(
        label_smoothing=label_smoothing,
        softcap=softcap,
        z_loss=z_loss,
        impl=impl,
        min_block_rows=min_block_rows,
    )
    if reduction not in REDUCTIONS:
        raise UserError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if shift and hidden.dim() < 2:
        raise UserError("shift=True needs hidden of shape (..., T, D) with a sequence dimension.")


def _real(name: str, value: Any, prefix: str) -> float:
    """``value`` as a finite Python float (a number or a one-element tensor), else a
    :class:`UserError`: a NaN or an infinity has no meaning as a loss setting (an infinite
    softcap or temperature turns ``s * tanh(z / s)`` or ``z / T`` into NaN or 0)."""
    try:
        if isinstance(value, (bool, str)):
            raise TypeError
        x = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{prefix}{name} must be a real number, got {value!r}.") from None
    if not math.isfinite(x):
        raise UserError(f"{prefix}{name} must be finite, got {value!r}.")
    return x


def check_settings(
    *,
    label_smoothing: Any = 0.0,
    softcap: Any = None,
    z_loss: Any = 0.0,
    impl: Any = "auto",
    temperature: Any = None,
    min_block_rows: Any = 0,
    prefix: str = "",
) -> None:
    """The loss's hyper-parameters, checked without any tensor, so that :func:`patch_model`
    refuses them when it is called rather than at the first forward: ``label_smoothing`` in
    [0, 1]; ``softcap`` and ``temperature`` None or finite and > 0; ``z_loss`` finite and >= 0;
    ``impl`` one of :data:`IMPLS`; ``min_block_rows`` an integer >= 0. ``prefix`` starts every
    message (e.g. ``"patch_model: "``)."""
    if not 0.0 <= _real("label_smoothing", label_smoothing, prefix) <= 1.0:
        raise UserError(f"{prefix}label_smoothing must lie in [0, 1], got {label_smoothing}.")
    for name, value in (("softcap", softcap), ("temperature", temperature)):
        if value is not None and not _real(name, value, prefix) > 0.0:
            raise UserError(f"{prefix}{name} must be None or > 0, got {value}.")
    if not _real("z_loss", z_loss, prefix) >= 0.0:
        raise UserError(f"{prefix}z_loss must be >= 0, got {z_loss}.")
    if not isinstance(impl, str) or impl not in IMPLS:
        raise UserError(f"{prefix}impl must be one of {IMPLS}, got {impl!r}.")
    if (
        isinstance(min_block_rows, bool)
        or not isinstance(min_block_rows, int)
        or min_block_rows < 0
    ):
        raise UserError(f"{prefix}min_block_rows must be an integer >= 0, got {min_block_rows!r}.")


def check_ignore_index(ignore_index: Any) -> int | None:
    """``ignore_index`` as a Python int, or None (no target is ignored); anything else (a
    float, a bool, a string) is a :class:`UserError`."""
    if ignore_index is None:
        return None
    if not isinstance(ignore_index, bool):
        try:
            value = operator.index(ignore_index)
        except TypeError:
            pass
        else:
            # Targets are int64: a value outside that range can never match one.
            if -(2**63) <= value < 2**63:
                return value
            raise UserError(f"ignore_index must fit in int64, got {ignore_index!r}.")
    raise UserError(
        f"ignore_index must be an integer (or None to ignore no target), got {ignore_index!r}."
    )


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int | None) -> int:
    """Raise if a target lies outside [0, V) and is not ``ignore_index``; return #valid.

    ``ignore_index=None``: every target counts and must lie in [0, V).
    One device synchronisation (both numbers come back together).
    """
    if ignore_index is None:
        bad = (targets < 0) | (targets >= vocab)
        n_bad = int(bad.sum())
        n_valid = targets.numel()
        allowed = f"targets must lie in [0, {vocab}) (ignore_index=None: none is ignored)"
    else:
        valid = targets != ignore_index
        bad = valid & ((targets < 0) | (targets >= vocab))
        n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()
        allowed = f"targets must lie in [0, {vocab}) or equal ignore_index ({ignore_index})"
    if n_bad:
        first = targets[bad][0].item()
        raise UserError(f"{allowed}; found {n_bad} outside, e.g. {first}.")
    return int(n_valid)
