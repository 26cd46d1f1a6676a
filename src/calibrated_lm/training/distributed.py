"""Multi-process training under ``torchrun`` / ``accelerate launch`` with FSDP2.

When the launcher sets ``WORLD_SIZE > 1`` the process group is initialised (NCCL on CUDA,
gloo on CPU), each decoder layer and then the root model are wrapped with
``torch.distributed.fsdp.fully_shard`` (parameters, gradients and AdamW state sharded across
ranks), and checkpoints are written from full state dicts gathered with
``torch.distributed.checkpoint.state_dict``. The fused loss needs nothing special: the output
head belongs to the root FSDP unit, whose parameters FSDP2 all-gathers before the root
forward, so ``linear_cross_entropy`` sees the full ``lm_head.weight`` and its weight gradient
is reduce-scattered like any other.

FSDP averages gradients over ranks; the training loop multiplies each rank's loss by the
world size and divides by the global token count, so the update equals the one-rank update
on the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from calibrated_lm.launcher import launch_env


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> DistInfo:
    """Read the launcher's environment; initialise the process group when WORLD_SIZE > 1."""
    env = launch_env()
    world, rank, local_rank = env.world, env.rank, env.local_rank
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return DistInfo(rank, world, local_rank, dev)
    return DistInfo(0, 1, 0, torch.device(device))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(t)
    return float(t.item())


def _comm_device(info: DistInfo) -> torch.device:
    return info.device if info.device.type == "cuda" else torch.device("cpu")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one (``base_model.layers`` in transformers LMs)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return list(module)
    return []


def shard(model: nn.Module, info: DistInfo) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder layer, then to the whole model.

    Parameters still on the CPU are moved to ``info.device`` by ``fully_shard`` unit by unit.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on CPU (rank 0; ``None`` on other ranks)."""
    if not info.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return sd if info.main else None


def full_optim_state(model: nn.Module, optim: Any, info: DistInfo) -> dict[str, Any] | None:
    if not info.enabled:
        return optim.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    sd = get_optimizer_state_dict(
        model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return sd if info.main else None


def load_full_states(
    model: nn.Module, optim: Any, model_sd: dict[str, Any], optim_sd: dict[str, Any], info: DistInfo
) -> None:
    """Restore model and optimizer from full (unsharded) state dicts, on every rank."""
    if not info.enabled:
        model.load_state_dict(model_sd)
        optim.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optim, optim_sd, options=options)
