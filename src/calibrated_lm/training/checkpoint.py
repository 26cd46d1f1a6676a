"""Atomic training checkpoints: write into a temporary folder, then rename into place.

Layout of ``OUTPUT/checkpoints/step-000123/``:

* ``model.pt``: the full (unsharded) model state dict;
* ``optimizer.pt``: the full optimizer state dict;
* ``rng-rank{r}.pt``: Python, NumPy, torch CPU and CUDA generator states of each rank;
* ``state.json``: step, the arguments that fix the data order, the number of logged lines.

The rename is atomic on POSIX filesystems, so a run killed at any moment leaves either the
previous complete checkpoint or the new complete one, never a half-written one. The schedule
has no state of its own: the learning rate is a pure function of the step (see ``schedule``),
so restoring the step restores it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.json"
_PREFIX = "step-"


def checkpoint_root(output: Path) -> Path:
    return Path(output) / "checkpoints"


def swap_in(tmp: Path, final: Path) -> None:
    """Make the finished folder ``tmp`` become ``final``, replacing any previous ``final``.

    The old folder is renamed aside before the new one is renamed in, so at every instant a
    complete ``final`` (old or new) exists, or the old one survives as ``.old-<name>``; a crash
    never leaves only a half-deleted folder behind.
    """
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints under ``output``, oldest first (temporary folders excluded)."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(
    output: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor] | None,
    optim_state: dict[str, Any] | None,
    state: dict[str, Any],
    rank: int = 0,
    keep: int = 2,
    barrier: Any = None,
    extra: Any = None,
) -> Path:
    """Write checkpoint ``step`` atomically; rank 0 writes model/optimizer/state, every rank its RNG.

    ``barrier`` (a callable) synchronises ranks between writing and renaming. ``extra`` (a
    callable, run on every rank) writes more into the temporary folder, e.g. DeepSpeed's
    partitions; ``None`` states are not written. Older checkpoints beyond the newest ``keep``
    are removed after the rename.
    """
    root = checkpoint_root(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".tmp-{_PREFIX}{step:06d}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if barrier:
        barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if extra:
        extra(tmp)
    if rank == 0:
        if model_state is not None:
            torch.save(model_state, tmp / "model.pt")
        if optim_state is not None:
            torch.save(optim_state, tmp / "optimizer.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if barrier:
        barrier()
    if rank == 0:
        swap_in(tmp, final)  # a resumed run may re-reach a step it had saved
        for old in list_checkpoints(output)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def read_checkpoint(path: Path, rank: int = 0, weights: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`write_checkpoint` (tensors on CPU); without
    ``weights``, only its state and this rank's RNG (the rest is restored elsewhere)."""
    path = Path(path)
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.exists():  # resumed on more ranks than saved: reuse rank 0's stream
        rng_file = path / "rng-rank0.pt"
    out = {
        "state": json.loads((path / STATE_FILE).read_text()),
        "rng": torch.load(rng_file, map_location="cpu", weights_only=False),
    }
    if weights:
        out["model"] = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        out["optimizer"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return out
