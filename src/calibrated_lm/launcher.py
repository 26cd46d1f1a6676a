"""Where this process stands in a multi-process launch (``torchrun``, ``accelerate launch``).

The launchers' ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` environment variables are read in
this one place, so evaluation and training agree on them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from calibrated_lm.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class LaunchEnv:
    """``rank`` of ``world`` processes; ``local_rank`` picks the GPU on this host."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> LaunchEnv:
    """Read the launcher's environment; a plain single process when it is unset.

    ``LOCAL_RANK`` falls back to ``RANK`` (one host), which is what launchers that set only
    the global rank mean.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < max(world, 1):
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world} set by the launcher")
    return LaunchEnv(rank=rank, world=world, local_rank=local)


def leave_process_group(together: bool) -> None:
    """Destroy this process' process group, if any, before the interpreter exits: a rank that
    exited with its gloo group alive could abort at exit ("terminate called without an active
    exception", rc -6) after finishing or stopping cleanly. ``together``: wait for every rank
    first (after finished work, so that no rank leaves while rank 0 still writes); not after an
    error, which another rank may not share (a barrier would then wait for ever)."""
    import torch.distributed as dist

    if _in_group():
        if together:
            dist.barrier()
        dist.destroy_process_group()


class StoppedTogether(UserError):
    """A stop every rank of the group raised at the same collective point
    (:func:`on_every_rank`), so they can leave the group together, as after finished work."""


def on_every_rank(fn: Callable[[], T]) -> T:
    """Call ``fn`` on this rank, and stop every rank if it raised a :class:`UserError` on any.

    A collective (every rank of the group must call it at the same point): the ranks exchange
    their errors, and all raise :class:`StoppedTogether` (this rank's message, else the first
    failing rank's) when one failed. Without a group it is ``fn()``. Why: a rank that stops
    alone leaves without a barrier, and one that left first (rank 0 serves the rendezvous
    store) has aborted another's exit at times (rc -6 after a clean message, under gloo).
    """
    if not _in_group():
        return fn()
    import torch.distributed as dist

    mine: str | None = None
    result: T | None = None
    try:
        result = fn()
    except UserError as exc:
        mine = str(exc)
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, mine)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, first = failed[0]
        raise StoppedTogether(mine if mine is not None else f"rank {rank}: {first}")
    return result  # type: ignore[return-value]  # fn returned on this rank


@contextmanager
def own_process_group() -> Iterator[None]:
    """Leave, on the way out, a process group that the block created (none before it): after a
    finished block or a :class:`StoppedTogether` together (:func:`leave_process_group`), after
    any other error without a barrier. A group that existed before the block (a library
    caller's) stays its owner's."""
    ours = not _in_group()
    try:
        yield
    except StoppedTogether:
        if ours:
            leave_process_group(together=True)
        raise
    except BaseException:
        if ours:
            leave_process_group(together=False)
        raise
    if ours:
        leave_process_group(together=True)


def _in_group() -> bool:
    import torch.distributed as dist

    # is_initialized is absent where torch was built without distributed support.
    return dist.is_available() and dist.is_initialized()
