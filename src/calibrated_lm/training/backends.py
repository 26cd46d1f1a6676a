"""One strategy object per training backend: a single device, FSDP2 or DeepSpeed ZeRO-3.

The loop (``loop.py``) is the same for all three; what differs between them lives here, each
backend in its own class:

=====================  ======================  =====================  ==========================
                       :class:`SingleDevice`   :class:`FSDP2`         :class:`ZeRO3`
=====================  ======================  =====================  ==========================
chosen when            one process             WORLD_SIZE > 1         ``--deepspeed CONFIG``
model placement        ``model.to(device)``    ``fully_shard``        ``model.to(device)``
optimizer              AdamW                   AdamW (sharded)        AdamW inside the engine
forward                the model               the model              the engine
clip and step          the loop, after         the loop, after        the engine, at the
                       accumulation            accumulation           accumulation boundary
non-finite grad norm   step skipped            step skipped           already applied (reported)
checkpoint weights     state dict              gathered on rank 0     gathered on rank 0
resume state           full optimizer state    full (gathered) state  ZeRO's own partitions
=====================  ======================  =====================  ==========================

Life cycle, as the loop calls it: :func:`make_backend` (before anything is loaded: a bad
DeepSpeed config fails here), :meth:`Backend.place` (the patched model onto the device),
:meth:`Backend.attach_optimizer`, then per optimizer step :meth:`Backend.set_lr`,
:meth:`Backend.backward` for each micro-batch and :meth:`Backend.finish_step`;
:meth:`Backend.save_checkpoint`, :meth:`Backend.load_checkpoint` and
:meth:`Backend.full_model_state` (for ``final/``) around them. Methods documented as
collectives must be called on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrated_lm.errors import UserError
from calibrated_lm.training import distributed as D
from calibrated_lm.training.checkpoint import write_checkpoint


@dataclass
class StepOutcome:
    """How an optimizer step ended (:meth:`Backend.finish_step`).

    ``grad_norm``: the global gradient norm before clipping (``None`` where it is not measured:
    ZeRO-3 without clipping). ``finite``: the norm is finite or unknown. ``skipped``: the
    update was withheld because it was not (then ``nonfinite_params`` names up to 5 parameters
    whose local gradient holds a NaN or Inf)."""

    grad_norm: float | None
    finite: bool
    skipped: bool = False
    nonfinite_params: list[str] = field(default_factory=list)


def nonfinite_grads(model: nn.Module, limit: int = 5) -> list[str]:
    """Names of (up to ``limit``) parameters whose local gradient holds a NaN or Inf.

    Only called after a non-finite norm, so its cost does not matter; the names say where a
    divergence starts (attention projections, embeddings, the head...)."""
    names = []
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        g = g.to_local() if hasattr(g, "to_local") else g  # FSDP2 DTensor: this rank's shard
        if not bool(torch.isfinite(g).all()):
            names.append(name)
            if len(names) >= limit:
                break
    return names


class Backend:
    """What the loop asks of a backend; the base class is the behaviour shared by the
    backends whose optimizer step the loop takes itself (:class:`SingleDevice`, :class:`FSDP2`).

    ``model`` and ``optim`` are set by :meth:`place` and :meth:`attach_optimizer`."""

    # On a non-finite gradient norm: what happened to the step (progress line) and to the
    # parameters (the divergence error after --max-skipped-steps of them in a row).
    nonfinite_action = "optimizer step skipped"
    diverged_params = "parameters were left as they were before them"
    # Whether a resume reads the full model and optimizer state from the checkpoint's files
    # (False: the backend restores its own, in :meth:`load_checkpoint`).
    resume_reads_weights = True

    def __init__(self, info: D.DistInfo, *, max_grad_norm: float | None) -> None:
        self.info = info
        self.max_grad_norm = max_grad_norm
        self.model: nn.Module | None = None
        self.optim: torch.optim.Optimizer | None = None

    # -- set up -----------------------------------------------------------------------------

    def place(self, model: nn.Module) -> None:
        """Put the (patched, CPU) model on the device; ``torch.OutOfMemoryError`` propagates."""
        model.to(self.info.device)
        self.model = model

    def attach_optimizer(self, optim: torch.optim.Optimizer) -> None:
        """Take the optimizer built over the placed model's parameters."""
        self.optim = optim

    @property
    def forward(self) -> Callable[..., Any]:
        """What a training or held-out forward calls (the model, or the engine around it)."""
        return self.model

    # -- step -------------------------------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        """The scheduled learning rate for the coming step (ZeRO steps this very optimizer)."""
        for group in self.optim.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """Back-propagate ``loss``, this rank's already multiplied share of the step's loss;
        ``boundary``: it is the step's last micro-batch."""
        loss.backward()

    def finish_step(self) -> StepOutcome:
        """Clip and apply the accumulated gradients, then clear them.

        The norm is always measured (clipping at +inf changes nothing) so that a non-finite
        gradient is caught before AdamW turns every parameter into NaN: such a step is
        skipped, and the parameters it would have touched are named."""
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.max_grad_norm or float("inf")
            )
        )
        if math.isfinite(grad_norm):
            self.optim.step()
            outcome = StepOutcome(grad_norm, finite=True)
        else:
            outcome = StepOutcome(
                grad_norm, finite=False, skipped=True, nonfinite_params=nonfinite_grads(self.model)
            )
        self.optim.zero_grad(set_to_none=True)
        return outcome

    def drop_grads(self) -> None:
        """Free the gradients (after an out-of-memory error, before reporting it)."""
        self.optim.zero_grad(set_to_none=True)

    # -- checkpoint and resume --------------------------------------------------------------

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The unsharded model state dict on CPU on rank 0 (``None`` elsewhere); a collective."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def full_optim_state(self) -> dict[str, Any] | None:
        """The optimizer state a resume restores (rank 0; ``None`` elsewhere or where the
        backend writes its own); a collective."""
        return self.optim.state_dict()

    def _barrier(self) -> Callable[[], None] | None:
        return (lambda: D.barrier(self.info)) if self.info.enabled else None

    def _own_state_writer(self) -> Callable[[Path], None] | None:
        """What writes the backend's own resume state into a checkpoint's temporary folder
        (on every rank), if it keeps one beside the full states."""
        return None

    def save_checkpoint(
        self,
        output: Path,
        step: int,
        *,
        state: dict[str, Any],
        tokenizer: Any,
        keep: int,
        files: Mapping[str, bytes] | None,
    ) -> Path:
        """Write checkpoint ``step`` (``checkpoint.write_checkpoint``); a collective."""
        model_state = self.full_model_state()
        return write_checkpoint(
            output,
            step,
            model_state=model_state,
            optim_state=self.full_optim_state(),
            state=state,
            model=self.model,
            tokenizer=tokenizer,
            rank=self.info.rank,
            keep=keep,
            barrier=self._barrier(),
            extra=self._own_state_writer(),
            files=files,
        )

    def load_checkpoint(self, path: Path, ckpt: dict[str, Any]) -> None:
        """Restore model and optimizer from checkpoint ``path`` (read as ``ckpt`` by
        ``checkpoint.read_checkpoint``); on every rank."""
        self.model.load_state_dict(ckpt["model"])
        self.optim.load_state_dict(ckpt["optimizer"])


class SingleDevice(Backend):
    """One process on one device: the base behaviour as it is."""


class FSDP2(Backend):
    """Several processes, each decoder layer and then the model sharded by ``fully_shard``
    (``distributed.py``); full states are gathered on rank 0 for checkpoints and restored
    from them on every rank."""

    def place(self, model: nn.Module) -> None:
        # fully_shard moves each unit to the device as it shards it, so no GPU ever holds the
        # whole model.
        D.shard(model, self.info)
        self.model = model

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        return D.full_model_state(self.model, self.info)

    def full_optim_state(self) -> dict[str, Any] | None:
        return D.full_optim_state(self.model, self.optim, self.info)

    def load_checkpoint(self, path: Path, ckpt: dict[str, Any]) -> None:
        D.load_full_states(self.model, self.optim, ckpt["model"], ckpt["optimizer"], self.info)


class ZeRO3(Backend):
    """Several processes, a DeepSpeed ZeRO-3 engine around the model and the loop's AdamW
    (``zero3.py``). The engine clips and steps at the accumulation boundary, so a non-finite
    norm can only be reported; a checkpoint's resume state is ZeRO's own partitions, and only
    the ``save_pretrained`` copy is gathered."""

    nonfinite_action = "DeepSpeed has applied the step"
    diverged_params = "DeepSpeed applied them, so the parameters may be NaN"
    resume_reads_weights = False

    def __init__(self, info: D.DistInfo, *, config: dict[str, Any]) -> None:
        # The engine clips, as its config says (gradient_clipping is the run's --max-grad-norm).
        super().__init__(info, max_grad_norm=None)
        self.config = config
        self.engine: Any = None

    @classmethod
    def from_file(
        cls,
        info: D.DistInfo,
        path: str,
        *,
        batch_size: int,
        grad_accum: int,
        max_grad_norm: float | None,
    ) -> ZeRO3:
        """Read and check the ``--deepspeed`` file (:class:`UserError` on a bad one, or in a
        single process), with the run's settings laid over it."""
        from calibrated_lm.training import zero3 as Z

        if not info.enabled:
            raise UserError(
                "--deepspeed shards over several processes: launch with torchrun, deepspeed or "
                "accelerate launch (WORLD_SIZE > 1)"
            )
        config = Z.engine_config(
            path,
            micro_batch=batch_size,
            grad_accum=grad_accum,
            world=info.world,
            clip=max_grad_norm,
            bf16=info.device.type == "cuda",
        )
        return cls(info, config=config)

    def attach_optimizer(self, optim: torch.optim.Optimizer) -> None:
        from calibrated_lm.training import zero3 as Z

        # ZeRO wraps ``optim`` and steps it, so set_lr on it still works.
        super().attach_optimizer(optim)
        self.engine = Z.initialize(self.model, optim, self.config)

    @property
    def forward(self) -> Callable[..., Any]:
        return self.engine

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # ZeRO's optimizer step (with clipping) at the boundary only

    def finish_step(self) -> StepOutcome:
        # Already applied by engine.step(); a non-finite norm can only be reported.
        # (DeepSpeed measures it only when it clips: None without --max-grad-norm.)
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else None
        return StepOutcome(grad_norm, finite=grad_norm is None or math.isfinite(grad_norm))

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        from calibrated_lm.training import zero3 as Z

        # Gathered (a collective) only for the save_pretrained copy: ZeRO-3 resumes from its
        # own partitions, written by _own_state_writer's callable.
        return Z.full_model_state(self.model, self.info.main)

    def full_optim_state(self) -> dict[str, Any] | None:
        return None  # in ZeRO's partitions

    def _own_state_writer(self) -> Callable[[Path], None] | None:
        from calibrated_lm.training import zero3 as Z

        # DeepSpeed writes its partitions (a collective) into the temporary folder.
        return lambda folder: Z.save(self.engine, folder)

    def load_checkpoint(self, path: Path, ckpt: dict[str, Any]) -> None:
        from calibrated_lm.training import zero3 as Z

        Z.load(self.engine, path)


def make_backend(
    info: D.DistInfo,
    *,
    deepspeed: str | None,
    batch_size: int,
    grad_accum: int,
    max_grad_norm: float | None,
) -> Backend:
    """The backend a run on ``info``'s processes uses: ZeRO-3 with a ``--deepspeed`` file,
    FSDP2 on several processes otherwise, else a single device. Called before anything is
    loaded, so that a bad DeepSpeed config fails before minutes of model loading."""
    if deepspeed:
        return ZeRO3.from_file(
            info,
            deepspeed,
            batch_size=batch_size,
            grad_accum=grad_accum,
            max_grad_norm=max_grad_norm,
        )
    if info.enabled:
        return FSDP2(info, max_grad_norm=max_grad_norm)
    return SingleDevice(info, max_grad_norm=max_grad_norm)
