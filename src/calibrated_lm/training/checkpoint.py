"""Atomic, durable training checkpoints: write into a temporary folder, fsync, rename into place.

Layout of ``OUTPUT/checkpoints/step-000123/``:

* ``model.pt``: the full (unsharded) model state dict;
* ``optimizer.pt``: the full optimizer state dict;
* ``rng-rank{r}.pt``: Python, NumPy, torch CPU and CUDA generator states of each rank;
* ``state.json``: step, the run's arguments, the data file's sha256 (``data_sha256``) and
  ``files``: the size in bytes of every other file of the folder, as written.

Every file is fsynced, then the folder, before the folder is renamed into place and the
parent folder is fsynced: a run killed (or a machine losing power) at any moment leaves
the previous complete checkpoint or the new complete one, never a half-written one under
its final name. ``state.json`` is written last, so a folder without it is incomplete.
Should a checkpoint still be damaged afterwards (a copy cut short, a file system error),
:func:`inspect_checkpoint` finds it cheaply (sizes, zip directories) and
:func:`read_checkpoint` raises :class:`CheckpointError` instead of crashing, so that a
resume can fall back to an older checkpoint. A full disk while writing becomes a
:class:`~calibrated_lm.errors.UserError`; the temporary folder is removed and the
checkpoints already written are kept.

The schedule has no state of its own: the learning rate is a pure function of the step (see
``schedule``), so restoring the step restores it.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from calibrated_lm import durable
from calibrated_lm.errors import UserError

STATE_FILE = "state.json"
_PREFIX = "step-"
_TMP_PREFIX = f".tmp-{_PREFIX}"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Errors of torch.load on a damaged file (zip reader, unpickler, short reads).
_LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, KeyError)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says which file and why."""


def checkpoint_root(output: Path) -> Path:
    return Path(output) / "checkpoints"


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable; a full disk is raised."""
    durable.fsync_dir(path, strict=True)


def _save(obj: Any, path: Path) -> None:
    # Through a Python file object, so that a full disk is an OSError (ENOSPC) rather than the
    # zip writer's RuntimeError.
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _sync_and_size(folder: Path) -> dict[str, int]:
    """fsync every file and sub-folder under ``folder`` (those other ranks or DeepSpeed wrote
    too); their sizes by relative path."""
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
        elif path.is_dir():
            fsync_dir(path)
    return sizes


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


def _step_of(path: Path) -> int | None:
    tail = path.name[len(_PREFIX) :]
    return int(tail) if path.name.startswith(_PREFIX) and tail.isdigit() else None


def list_checkpoints(output: Path) -> list[Path]:
    """Checkpoints under ``output`` that have a ``state.json``, oldest first (temporary
    folders excluded; see :func:`inspect_checkpoint` for whether one is intact)."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: _step_of(p) or 0)


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


def _disk_full(exc: OSError, output: Path, name: str) -> UserError:
    kept = [p.name for p in list_checkpoints(output)]
    where = checkpoint_root(output)
    if kept:
        after = (
            f"checkpoints already written are kept (newest: {kept[-1]}); free some space and "
            "rerun with --resume"
        )
    else:
        after = "no checkpoint had been written before it; free some space and rerun"
    return UserError(
        f"no space left on the device while writing checkpoint {name} in {where} "
        f"({exc.strerror or exc}); {after}"
    )


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
    are removed after the rename. A full disk raises :class:`UserError` (temporary folder
    removed, earlier checkpoints kept).
    """
    root = checkpoint_root(output)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f"{_TMP_PREFIX}{step:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            # Leftovers of writes that were killed midway (other ranks only write after the
            # barrier below, so none is in use).
            for stale in root.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        if barrier:
            barrier()
        _save(rng_state(), tmp / f"rng-rank{rank}.pt")
        if extra:
            extra(tmp)
        if rank == 0:
            if model_state is not None:
                _save(model_state, tmp / "model.pt")
            if optim_state is not None:
                _save(optim_state, tmp / "optimizer.pt")
        if barrier:
            barrier()
        if rank == 0:
            # state.json last: it lists (and so vouches for) every file written before it.
            full = {**state, "files": _sync_and_size(tmp)}
            _write_text(tmp / STATE_FILE, json.dumps(full, indent=1))
            fsync_dir(tmp)
            swap_in(tmp, final)  # a resumed run may re-reach a step it had saved
            fsync_dir(root)
            for old in list_checkpoints(output)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_full(exc, output, final.name) from exc
    if barrier:
        barrier()
    return final


def _is_torch_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def inspect_checkpoint(path: Path, *, weights: bool = True) -> dict[str, Any]:
    """The parsed ``state.json`` of checkpoint ``path`` once cheap checks pass: the JSON is
    whole, every file it lists has the size written, the ``.pt`` files needed have their zip
    directory. Reads no tensors; raises :class:`CheckpointError` saying what is wrong.

    Checkpoints written before ``state.json`` listed its files get only the existence and
    zip checks."""
    path = Path(path)
    try:
        text = (path / STATE_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"its {STATE_FILE} cannot be read ({exc})") from exc
    if not text.strip():
        raise CheckpointError(f"its {STATE_FILE} is empty")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"its {STATE_FILE} is not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from exc
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("step"), int)
        or not isinstance(state.get("config"), dict)
    ):
        raise CheckpointError(f"its {STATE_FILE} lacks the step or the config")
    files = state.get("files")
    if isinstance(files, dict):
        for rel, size in files.items():
            f = path / rel
            if not f.is_file():
                raise CheckpointError(f"its {rel} is missing")
            actual = f.stat().st_size
            if actual < size:
                raise CheckpointError(f"its {rel} is truncated ({actual} of {size} bytes)")
            if actual != size:
                raise CheckpointError(f"its {rel} has {actual} bytes where {size} were written")
    needed = ["rng-rank0.pt"] + (["model.pt", "optimizer.pt"] if weights else [])
    for name in needed:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"its {name} is missing")
        if not _is_torch_zip(f):
            raise CheckpointError(f"its {name} is not a complete torch file (no zip directory)")
    return state


def _load(path: Path, *, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except _LOAD_ERRORS as exc:
        text = str(exc).strip()
        first = text.splitlines()[0][:100] if text else ""
        if isinstance(exc, pickle.UnpicklingError):  # its text is about weights_only
            first = "damaged pickle data"
        why = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise CheckpointError(f"its {path.name} cannot be loaded ({why})") from exc


def read_checkpoint(path: Path, rank: int = 0, weights: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`write_checkpoint` (tensors on CPU); without
    ``weights``, only its state and this rank's RNG (the rest is restored elsewhere).

    Raises :class:`CheckpointError` when a file is missing, truncated or does not load."""
    path = Path(path)
    state = inspect_checkpoint(path, weights=weights)
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.exists():  # resumed on more ranks than saved: reuse rank 0's stream
        rng_file = path / "rng-rank0.pt"
    out = {"state": state, "rng": _load(rng_file, weights_only=False)}
    if weights:
        out["model"] = _load(path / "model.pt", weights_only=True)
        out["optimizer"] = _load(path / "optimizer.pt", weights_only=True)
    return out
