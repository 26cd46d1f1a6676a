"""DeepSpeed ZeRO-3 for ``calibrated-lm train --deepspeed CONFIG`` (where DeepSpeed is installed).

The engine partitions parameters, gradients and AdamW state over the ranks, like FSDP2 in
``distributed``. The fused loss needs nothing special: ZeRO-3 gathers ``lm_head.weight`` (tied
or not) for the patched forward, and the weight gradient the loss returns reaches the
partitioned parameter (``tests/test_training_deepspeed.py``).

The loop keeps its own data order, schedule, logging and token-summed loss. These settings
come from the run and override the user's file: micro-batch size, accumulation steps,
clipping, bf16 on CUDA, ZeRO stage 3 and the optimizer (the loop's own AdamW, which ZeRO
wraps). Everything else in the file, such as bucket sizes or offload, is passed through.

A checkpoint is DeepSpeed's own partitioned format, written inside the loop's atomic
``step-N`` folder next to ``state.json`` and the per-rank RNG files. The final model is
gathered once and saved with ``save_pretrained``. Unlike the FSDP2 path, a step with a
non-finite gradient norm cannot be skipped: the engine has already applied it when the norm
is known.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrated_lm.errors import UserError

TAG = "zero3"  # DeepSpeed's sub-folder inside a checkpoint folder


def engine_config(
    path: str, *, micro_batch: int, grad_accum: int, world: int, clip: float | None, bf16: bool
) -> dict[str, Any]:
    """The user's DeepSpeed JSON with the run's own settings laid over it."""
    try:
        user = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"--deepspeed: cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        msg = f"--deepspeed: {path} is not valid JSON ({exc.msg}, line {exc.lineno})"
        raise UserError(msg) from exc
    if not isinstance(user, dict):
        raise UserError(f"--deepspeed: {path} must hold a JSON object")
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"--deepspeed: 'zero_optimization' in {path} must be a JSON object")
    stage = zero.get("stage", 3)
    if stage != 3:
        raise UserError(f"--deepspeed: only ZeRO stage 3 is supported, {path} asks for {stage}")
    for key in ("optimizer", "scheduler", "fp16"):
        if key in user:
            raise UserError(
                f"--deepspeed: remove {key!r} from {path}; the run sets it (AdamW with "
                "--lr/--warmup-ratio, bf16 on GPUs)"
            )
    zero = {**zero, "stage": 3}
    return {
        **user,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": float(clip or 0.0),
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }


def initialize(model: nn.Module, optim: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    """Wrap ``model`` and ``optim`` in a DeepSpeed engine (the process group must exist)."""
    try:
        import deepspeed
    except ImportError as exc:
        raise UserError("--deepspeed needs the deepspeed package (pip install deepspeed)") from exc
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optim, config=config, dist_init_required=False
    )
    return engine


def save(engine: Any, folder: Path) -> None:
    """Every rank writes its partition of model and optimizer state into ``folder/TAG``."""
    engine.save_checkpoint(str(folder), tag=TAG)


def load(engine: Any, folder: Path) -> None:
    """Restore the partitions written by :func:`save` (on the same number of ranks)."""
    path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"--resume: {folder} holds no DeepSpeed checkpoint ({TAG}/)")


def full_model_state(model: nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    """All parameters gathered (collective: every rank calls it); the state dict on rank 0."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if not main:
            return None
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
