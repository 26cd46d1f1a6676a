"""Sharding questions over processes started by ``accelerate launch`` or ``torchrun``.

Each rank holds one model copy (on ``cuda:LOCAL_RANK``), scores every ``world``-th pending
question into its own ``samples.rank<r>.jsonl`` and rank 0 merges those journals into
``samples.jsonl`` once every rank has finished. The launchers' ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` environment variables are the only coupling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from calibrated_lm.evaluation.samples_file import SamplesWriter, read_records, record_key
from calibrated_lm.launcher import LaunchEnv, launch_env

T = TypeVar("T")


# One rank layout for the whole package (evaluation and training read the same variables).
DistInfo = LaunchEnv
dist_info = launch_env


def init_process_group(info: DistInfo, use_cuda: bool) -> None:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPU) when world > 1 and this
    process is in none yet."""
    if info.world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")


def barrier(info: DistInfo) -> None:
    if info.world <= 1:
        return
    import torch.distributed as dist

    dist.barrier()


def from_main(value: bool, info: DistInfo) -> bool:
    """Rank 0's ``value`` on every rank (a collective: every rank must call it)."""
    if info.world <= 1:
        return value
    import torch.distributed as dist

    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """Every ``world``-th item starting at ``rank``: disjoint, and together all items."""
    return list(items[info.rank :: info.world])


def rank_file(samples_path: Path, rank: int) -> Path:
    return samples_path.with_name(f"{samples_path.stem}.rank{rank}{samples_path.suffix}")


def rank_files(samples_path: Path) -> list[Path]:
    return sorted(samples_path.parent.glob(f"{samples_path.stem}.rank*{samples_path.suffix}"))


def merge_rank_files(samples_path: Path) -> int:
    """Append rank journals' records missing from ``samples_path``, then delete the journals.

    Returns the number of records added. Records already present (same task and id) are not
    duplicated, so merging after a crash in the middle of a merge is safe.
    """
    have = {record_key(r) for r in read_records(samples_path)}
    added = 0
    files = rank_files(samples_path)
    with SamplesWriter(samples_path) as out:
        for f in files:
            fresh = []
            for r in read_records(f):
                key = record_key(r)
                if key not in have:
                    have.add(key)
                    fresh.append(r)
            out.write(fresh)
            added += len(fresh)
    for f in files:
        f.unlink()
    return added
