"""Atomic, durable training checkpoints: write into a temporary folder, fsync, rename into place.

Layout of ``OUTPUT/checkpoints/step-000123/``: a ``save_pretrained`` folder, so that
``AutoModelForCausalLM.from_pretrained`` and ``calibrated-lm eval --model`` load it as they
load ``final/``, with the resume state beside it in files ``from_pretrained`` does not read:

* ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards with their
  ``model.safetensors.index.json``) and the tokenizer files: the full (unsharded) model;
* ``head_subset.json`` (runs with ``--head-subset``): the subset file, byte for byte, so that
  evaluating the folder restricts the softmax as training did (``head_restriction``);
* ``optimizer.pt``: the full optimizer state dict (AdamW moments and step counts);
* ``rng-rank{r}.pt``: Python, NumPy, torch CPU and CUDA generator states of each rank;
* ``resume-extra.pt`` (rarely): model tensors that ``save_pretrained`` left out and that no
  saved tensor equals (see :func:`save_pretrained_folder`), so that resuming stays exact;
* ``zero3/`` (DeepSpeed ZeRO-3 runs): the engine's partitioned model and optimizer states,
  from which such a run resumes (its ``model.safetensors`` is gathered once per checkpoint,
  as for ``final/``, only for loading elsewhere);
* ``state.json``: step, total steps, the data position (epoch and step within it: the data
  order is a function of the seed and the step), the run's arguments, the data file's sha256
  (``data_sha256``), ``weights`` (how the resume state dict is rebuilt from the safetensors:
  tied keys) and ``files``: the size in bytes of every other file of the folder, as written.

Checkpoints written before this layout hold the weights as a torch pickle ``model.pt`` (no
``config.json``): :func:`read_checkpoint` still resumes from them, but they do not load with
``from_pretrained``.

Every file is fsynced, then the folder, before the folder is renamed into place and the
parent folder is fsynced: a run killed (or a machine losing power) at any moment leaves
the previous complete checkpoint or the new complete one, never a half-written one under
its final name. ``state.json`` is written last, so a folder without it is incomplete.
Should a checkpoint still be damaged afterwards (a copy cut short, a file system error),
:func:`inspect_checkpoint` finds it cheaply (sizes, zip directories, safetensors headers)
and :func:`read_checkpoint` raises :class:`CheckpointError` instead of crashing, so that a
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
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from calibrated_lm import durable
from calibrated_lm.errors import UserError

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
LEGACY_MODEL_FILE = "model.pt"  # the weights of checkpoints written before the HF layout
EXTRA_FILE = "resume-extra.pt"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHTS_FORMAT = "safetensors"
_PREFIX = "step-"
_TMP_PREFIX = f".tmp-{_PREFIX}"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# safetensors' Rust writer reports a full disk as a SafetensorError carrying the OS error
# ("I/O error: No space left on device (os error 28)"), not as an OSError.
_DISK_FULL_TEXT = re.compile(r"os error (28|122)\b|No space left on device|Disk quota exceeded")
# Errors of torch.load on a damaged file (zip reader, unpickler, short reads).
_LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, KeyError)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says which file and why."""


def checkpoint_root(output: Path) -> Path:
    return Path(output) / "checkpoints"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` reports a full disk or an exhausted quota (an OSError, or a writer
    library's own error wrapping one)."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return bool(_DISK_FULL_TEXT.search(str(exc)))


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


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.data_ptr() == b.data_ptr() or bool(torch.equal(a, b))


def safetensors_files(folder: Path) -> list[str]:
    """The safetensors weight files of a ``save_pretrained`` folder (its index's shards, or
    ``model.safetensors``), by name; empty when it has none."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted(set(weight_map.values()))
    return [SAFETENSORS_FILE] if (folder / SAFETENSORS_FILE).is_file() else []


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def save_pretrained_folder(
    folder: Path,
    model: Any,
    tokenizer: Any,
    state_dict: dict[str, torch.Tensor],
    *,
    for_resume: bool = True,
    files: Mapping[str, bytes] | None = None,
) -> dict[str, Any] | None:
    """``save_pretrained`` ``model`` with the weights of ``state_dict`` (a full, unsharded
    state dict on CPU) and ``tokenizer`` into ``folder``; returns the ``weights`` entry of
    ``state.json``, which says how :func:`read_checkpoint` rebuilds ``state_dict`` exactly.

    ``save_pretrained`` leaves out tied weights (``lm_head.weight`` of a tied head) and may
    rename keys (transformers' checkpoint conversions): a left-out key whose tensor equals a
    saved one is recorded as ``tied`` to it, saved keys the model does not have are
    ``unused``, and any other left-out tensor is written to ``resume-extra.pt``. A full disk
    is raised as ``OSError(ENOSPC)`` whatever library reported it. Without ``for_resume``
    (``final/``) nothing of that is worked out and ``None`` is returned. ``files``: more
    files (name -> bytes) written beside ``config.json``, such as ``head_subset.json``.
    """
    folder = Path(folder)
    try:
        # A copy: save_pretrained pops entries from the dict it is given (tied keys, and each
        # tensor once written), and the caller's dict is needed below.
        model.save_pretrained(folder, state_dict=dict(state_dict))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        for name, data in (files or {}).items():
            with open(folder / name, "wb") as fh:
                fh.write(data)
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, OSError):
            raise OSError(errno.ENOSPC, f"No space left on device ({exc})") from exc
        raise
    if not for_resume:
        return None
    saved: set[str] = set()
    for name in safetensors_files(folder):
        saved.update(_safetensors_keys(folder / name))
    tied: dict[str, str] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in saved:
            continue
        partner = next(
            (k for k in state_dict if k in saved and _same_tensor(state_dict[k], tensor)), None
        )
        if partner is not None:
            # Equal values are all a resume needs: load_state_dict copies them in place.
            tied[key] = partner
        else:
            extra[key] = tensor
    if extra:
        _save(extra, folder / EXTRA_FILE)
    return {
        "format": WEIGHTS_FORMAT,
        "tied": tied,
        "unused": sorted(k for k in saved if k not in state_dict),
        "extra": EXTRA_FILE if extra else None,
    }


def sync_folder(folder: Path) -> dict[str, int]:
    """fsync every file and sub-folder under ``folder`` and ``folder`` itself; their sizes."""
    sizes = _sync_and_size(Path(folder))
    fsync_dir(Path(folder))
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


def check_model_fits(model: torch.nn.Module, saved: Mapping[str, Any], path: Path) -> None:
    """Refuse, in one sentence, a checkpoint whose weights do not fit ``model``: other
    parameter names or shapes (``--model`` now names another model than the run began from),
    which ``load_state_dict`` would report as a page of missing keys. Shapes only, no copy;
    under FSDP2 a parameter's shape is its full, unsharded one."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in saved.items() if isinstance(v, torch.Tensor)}
    missing = sorted(own.keys() - theirs.keys())
    extra = sorted(theirs.keys() - own.keys())
    shaped = sorted(k for k in own.keys() & theirs.keys() if own[k] != theirs[k])
    if not (missing or extra or shaped):
        return
    if shaped:
        k = shaped[0]
        what = f"{len(shaped)} weight(s) of other shapes, e.g. {k} {theirs[k]} vs {own[k]}"
    else:
        k = (missing or extra)[0]
        what = f"{len(missing)} weight(s) missing and {len(extra)} unknown, e.g. {k}"
    raise UserError(
        f"--resume: checkpoint {path.name} does not fit the model --model loads ({what}); "
        "resume with the model the run started from"
    )


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
    model: Any = None,
    tokenizer: Any = None,
    rank: int = 0,
    keep: int = 2,
    barrier: Callable[[], None] | None = None,
    extra: Callable[[Path], None] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically (layout: module docstring) and return its folder.

    Rank 0 writes ``model_state`` (the full state dict, ``None`` on other ranks) as a
    ``save_pretrained`` folder of ``model`` and ``tokenizer``, the optimizer state and
    ``state.json`` (``state`` plus ``weights`` and ``files``); every rank writes its RNG
    states. ``barrier`` (a callable) synchronises ranks between writing and renaming.
    ``extra`` (a callable, run on every rank) writes more into the temporary folder, e.g.
    DeepSpeed's partitions; ``None`` states are not written. ``files`` (name -> bytes) go
    beside ``config.json`` with the weights (rank 0). Older checkpoints beyond the
    newest ``keep`` are removed after the rename. A full disk raises :class:`UserError`
    (temporary folder removed, earlier checkpoints kept).
    """
    if rank == 0 and model_state is not None and model is None:
        raise ValueError("write_checkpoint: model_state needs the model to save_pretrained it")
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
        weights = None
        if rank == 0:
            if model_state is not None:
                weights = save_pretrained_folder(tmp, model, tokenizer, model_state, files=files)
            if optim_state is not None:
                _save(optim_state, tmp / OPTIMIZER_FILE)
        if barrier:
            barrier()
        if rank == 0:
            # state.json last: it lists (and so vouches for) every file written before it.
            full = {**state, **({"weights": weights} if weights else {})}
            full["files"] = _sync_and_size(tmp)
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


def _check_torch_file(path: Path, name: str) -> None:
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"its {name} is missing")
    if not _is_torch_zip(f):
        raise CheckpointError(f"its {name} is not a complete torch file (no zip directory)")


def _check_safetensors(path: Path, name: str) -> None:
    """A safetensors file whose header parses and whose size is the one the header implies
    (8 bytes of header length, the JSON header, then the tensors' bytes)."""
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"its {name} is missing")
    size = f.stat().st_size
    why = None
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 1 or 8 + n > size:
                why = f"header length {n} in a file of {size} bytes"
            else:
                header = json.loads(fh.read(n).decode("utf-8"))
                ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                expected = 8 + n + max(ends, default=0)
                if expected != size:
                    why = f"{size} bytes where its header describes {expected}"
    except OSError as exc:
        raise CheckpointError(f"its {name} cannot be read ({exc})") from exc
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        why = "its header is not valid JSON"
    if why:
        raise CheckpointError(f"its {name} is not a complete safetensors file ({why})")


def _weights_entry(state: dict[str, Any]) -> dict[str, Any] | None:
    """The ``weights`` entry of an HF-layout checkpoint's state, ``None`` for the legacy
    layout (``model.pt``)."""
    weights = state.get("weights")
    if isinstance(weights, dict) and weights.get("format") == WEIGHTS_FORMAT:
        return weights
    return None


def inspect_checkpoint(path: Path, *, weights: bool = True) -> dict[str, Any]:
    """The parsed ``state.json`` of checkpoint ``path`` once cheap checks pass: the JSON is
    whole, every file it lists has the size written, the ``.pt`` files needed have their zip
    directory, the safetensors files their header. Reads no tensors; raises
    :class:`CheckpointError` saying what is wrong. Without ``weights`` (a DeepSpeed run,
    restored from its own partitions) the model and optimizer files are not required.

    Checkpoints written before ``state.json`` listed its files get only the existence and
    zip checks; those written before the HF layout need ``model.pt`` instead of
    ``config.json`` and the safetensors."""
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
    _check_torch_file(path, "rng-rank0.pt")
    if not weights:
        return state
    hf = _weights_entry(state)
    if hf is None:
        for name in (LEGACY_MODEL_FILE, OPTIMIZER_FILE):
            _check_torch_file(path, name)
        return state
    if not (path / "config.json").is_file():
        raise CheckpointError("its config.json is missing")
    try:
        shards = safetensors_files(path)
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"its {SAFETENSORS_INDEX} cannot be read ({exc})") from exc
    if not shards:
        raise CheckpointError(f"its {SAFETENSORS_FILE} is missing")
    for name in shards:
        _check_safetensors(path, name)
    for name in [OPTIMIZER_FILE] + ([hf["extra"]] if hf.get("extra") else []):
        _check_torch_file(path, name)
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


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:100]
        raise CheckpointError(
            f"its {path.name} cannot be loaded ({type(exc).__name__}: {first})"
        ) from exc


def _model_state(path: Path, hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full model state dict saved by :func:`save_pretrained_folder`, keys as the model
    has them (tied keys restored, converted ones dropped, the extra file merged)."""
    sd: dict[str, torch.Tensor] = {}
    for name in safetensors_files(path):
        sd.update(_load_safetensors(path / name))
    for key in hf.get("unused") or []:
        sd.pop(key, None)
    for key, partner in (hf.get("tied") or {}).items():
        if partner not in sd:
            raise CheckpointError(f"its weights lack {partner}, which {key} is tied to")
        sd[key] = sd[partner]
    if hf.get("extra"):
        sd.update(_load(path / hf["extra"], weights_only=True))
    return sd


def read_checkpoint(path: Path, rank: int = 0, weights: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`write_checkpoint` (tensors on CPU): ``state``
    (its ``state.json``), ``rng`` (this rank's generator states) and, with ``weights``,
    ``model`` (the full state dict, keys as the model has them) and ``optimizer``. Reads both
    the HF layout and the legacy one (``model.pt``).

    Raises :class:`CheckpointError` when a file is missing, truncated or does not load."""
    path = Path(path)
    state = inspect_checkpoint(path, weights=weights)
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.exists():  # resumed on more ranks than saved: reuse rank 0's stream
        rng_file = path / "rng-rank0.pt"
    out = {"state": state, "rng": _load(rng_file, weights_only=False)}
    if weights:
        hf = _weights_entry(state)
        if hf is None:
            out["model"] = _load(path / LEGACY_MODEL_FILE, weights_only=True)
        else:
            out["model"] = _model_state(path, hf)
        out["optimizer"] = _load(path / OPTIMIZER_FILE, weights_only=True)
    return out
