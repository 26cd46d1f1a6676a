"""Checks of every ``calibrated-lm train`` argument, run before anything is loaded or written.

:func:`validate_config` raises :class:`~calibrated_lm.errors.UserError` with one sentence
naming the first bad value (as its command-line flag), so a typo costs neither minutes of
model loading nor a half-created output folder. Conventions it enforces:

* ``--max-grad-norm``: a positive number clips the global gradient norm to it; ``0`` (or
  ``None`` from Python) disables clipping (the norm is still measured, so a non-finite
  gradient still skips its step); a negative value would scale the gradient by a negative
  factor and train uphill, so it is refused, as are NaN and infinity;
* ``--save-every 0`` writes only the end-of-run checkpoint;
* ``--max-steps`` is ``None`` (train for ``--epochs``) or at least 1;
* ``--eval-every N`` (N >= 1: every N steps and after the last; 0: only after the last)
  needs ``--eval-data FILE``; the file itself is read before the model is loaded (in the loop);
* ``--report-to`` is ``none``, ``tensorboard``, ``wandb`` or ``tensorboard,wandb``, and a
  backend whose package is not installed is refused (``tracking.check_report_to``);
* ``--head-subset`` is a path (read before the model loads, ``head_restriction``), not
  combined with ``--deepspeed``.
"""

from __future__ import annotations

import math
from typing import Any

from calibrated_lm.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_MAX_SEED = 2**32 - 1  # NumPy's limit


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _at_least(flag: str, value: Any, minimum: int, why: str = "") -> None:
    if not _is_int(value) or value < minimum:
        raise UserError(f"{flag} must be an integer of at least {minimum}{why}, got {value!r}")


def _finite(flag: str, value: Any, what: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise UserError(f"{flag} must be {what}, got {value!r}")
    return float(value)


def check_device(device: str) -> None:
    """Refuse an unknown device name, or CUDA / MPS where this machine has none."""
    import torch

    if device == "auto":
        return
    known = ", ".join(DEVICES)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device must be one of {known}, got {device!r}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device must be one of {known}, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else f" (this torch {torch.__version__} has no CUDA)"
            raise UserError(
                f"--device {device}: no CUDA GPU is available on this machine{build}; "
                "use --device cpu or auto"
            )
        from calibrated_lm.launcher import launch_env

        # Under a launcher each rank takes the GPU of its LOCAL_RANK, whatever the index.
        count = torch.cuda.device_count()
        if dev.index is not None and launch_env().world <= 1 and dev.index >= count:
            raise UserError(
                f"--device {device}: this machine has {count} CUDA GPU(s), numbered from 0"
            )
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(
                f"--device {device}: the Apple MPS backend is not available on this machine; "
                "use --device cpu or auto"
            )


def validate_config(cfg: Any) -> None:
    """Raise :class:`UserError` (one sentence) for the first bad field of a ``TrainConfig``.

    Pure apart from asking torch which devices exist: reads no file and writes nothing.
    """
    for name in ("model", "data", "output"):
        value = getattr(cfg, name)
        if not isinstance(value, str) and not hasattr(value, "__fspath__"):
            raise UserError(f"--{name} must be a path or name, got {value!r}")
        if not str(value):
            raise UserError(f"--{name} must be given (a non-empty path or name)")
    if cfg.reduction not in ("sum", "mean"):
        raise UserError(f"--reduction must be sum or mean, got {cfg.reduction!r}")

    what = "at least 0 and below 1 (at 1 the target is uniform and keeps nothing of the label)"
    eps = _finite("--label-smoothing", cfg.label_smoothing, what)
    if not 0.0 <= eps < 1.0:
        raise UserError(f"--label-smoothing must be {what}, got {cfg.label_smoothing!r}")
    epochs = _finite("--epochs", cfg.epochs, "a positive number of passes over the data")
    if epochs <= 0:
        raise UserError(
            f"--epochs must be a positive number of passes over the data, got {cfg.epochs!r}"
        )
    if cfg.max_steps is not None:
        _at_least("--max-steps", cfg.max_steps, 1, " (leave it out to train for --epochs)")
    lr = _finite("--lr", cfg.lr, "a positive finite learning rate")
    if lr <= 0:
        raise UserError(f"--lr must be a positive finite learning rate, got {cfg.lr!r}")
    warm = _finite("--warmup-ratio", cfg.warmup_ratio, "a share of the steps between 0 and 1")
    if not 0.0 <= warm <= 1.0:
        raise UserError(
            f"--warmup-ratio must be a share of the steps between 0 and 1, got {cfg.warmup_ratio!r}"
        )
    if cfg.temperature is not None:
        t = _finite(
            "--temperature", cfg.temperature, "a positive number (logits are divided by it)"
        )
        if t <= 0:
            raise UserError(
                f"--temperature must be a positive number (logits are divided by it), "
                f"got {cfg.temperature!r}"
            )
    if cfg.softcap is not None:
        c = _finite("--softcap", cfg.softcap, "a positive cap c of c*tanh(z/c)")
        if c <= 0:
            raise UserError(
                f"--softcap must be a positive cap c of c*tanh(z/c), got {cfg.softcap!r}"
            )
    z = _finite("--z-loss", cfg.z_loss, "a coefficient of at least 0")
    if z < 0:
        raise UserError(f"--z-loss must be a coefficient of at least 0, got {cfg.z_loss!r}")
    wd = _finite("--weight-decay", cfg.weight_decay, "a coefficient of at least 0")
    if wd < 0:
        raise UserError(
            f"--weight-decay must be a coefficient of at least 0, got {cfg.weight_decay!r}"
        )
    if cfg.max_grad_norm is not None:
        what = "a positive clipping threshold, or 0 for no clipping"
        clip = _finite("--max-grad-norm", cfg.max_grad_norm, what)
        if clip < 0:
            raise UserError(
                f"--max-grad-norm must be {what} (a negative one would train uphill), "
                f"got {cfg.max_grad_norm!r}"
            )

    _at_least("--batch-size", cfg.batch_size, 1)
    _at_least("--grad-accum", cfg.grad_accum, 1)
    _at_least("--max-seq-len", cfg.max_seq_len, 2, " (a prompt token and a target token)")
    _at_least("--log-every", cfg.log_every, 1)
    _at_least("--save-every", cfg.save_every, 0, " (0 saves only the end-of-run checkpoint)")
    _at_least("--keep-checkpoints", cfg.keep_checkpoints, 1)
    _at_least("max_skipped_steps", cfg.max_skipped_steps, 1)
    if not _is_int(cfg.seed) or not 0 <= cfg.seed <= _MAX_SEED:
        raise UserError(f"--seed must be an integer between 0 and {_MAX_SEED}, got {cfg.seed!r}")
    if not isinstance(cfg.device, str):
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    check_device(cfg.device)

    eval_data = getattr(cfg, "eval_data", None)
    if eval_data is not None:
        if not isinstance(eval_data, str) and not hasattr(eval_data, "__fspath__"):
            raise UserError(f"--eval-data must be a path, got {eval_data!r}")
        if not str(eval_data):
            raise UserError("--eval-data must be a non-empty path (or be left out)")
    eval_every = getattr(cfg, "eval_every", 0)
    _at_least("--eval-every", eval_every, 0, " (0 evaluates only after the last step)")
    if eval_every > 0 and eval_data is None:
        raise UserError(
            f"--eval-every {eval_every} needs --eval-data FILE (the held-out records to score)"
        )
    from calibrated_lm.training.tracking import check_report_to

    check_report_to(getattr(cfg, "report_to", "none"))
    head_subset = getattr(cfg, "head_subset", None)
    if head_subset is not None:
        if not isinstance(head_subset, str) and not hasattr(head_subset, "__fspath__"):
            raise UserError(f"--head-subset must be a path, got {head_subset!r}")
        if not str(head_subset):
            raise UserError("--head-subset must be a non-empty path (or be left out)")
        if getattr(cfg, "deepspeed", None):
            # ZeRO-3 partitions the head weight the restricted loss index-selects from;
            # untested, so refused (as --compile is).
            raise UserError("--head-subset does not work with --deepspeed; leave one of them out")
    if getattr(cfg, "compile", False) and getattr(cfg, "deepspeed", None):
        # ZeRO-3 gathers each layer's parameters in hooks around its forward, which a
        # compiled layer's graph would have to capture; untested here, so refused.
        raise UserError("--compile does not work with --deepspeed; leave one of them out")
