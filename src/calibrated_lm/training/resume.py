"""``train --resume``: which checkpoint a run continues from, and whether it may.

A resume continues from the newest intact checkpoint (a damaged one is skipped, with a note
saying why) and refuses settings that would change the data order or the objective, and a
data file whose content changed since the checkpoint (its sha256 is kept in ``state.json``).
Checked twice: before the model is loaded (:func:`plan_resume`, on the files' structure) and
once the backend exists (:func:`read_resumable`, loading them on every rank).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from calibrated_lm import durable
from calibrated_lm.errors import UserError
from calibrated_lm.training import distributed as D
from calibrated_lm.training.checkpoint import (
    CheckpointError,
    inspect_checkpoint,
    read_checkpoint,
)

# Changing any of these between a run and its resume would change which examples a step sees.
RESUME_FIXED = (
    "model",
    "data",
    "batch_size",
    "grad_accum",
    "max_seq_len",
    "seed",
    "world_size",
    "group_by_length",
    "deepspeed",
)
# Values of settings added later, as checkpoints written before them were trained.
RESUME_LEGACY = {"group_by_length": False, "deepspeed": None}
# Changing any of these would change the loss or the optimizer in the middle of a run (a
# checkpoint that predates one of them is not checked on it). The number of steps (--epochs,
# --max-steps) may change: that extends or shortens the run.
RESUME_OBJECTIVE = (
    "label_smoothing",
    "lr",
    "temperature",
    "softcap",
    "z_loss",
    "reduction",
    "weight_decay",
    "warmup_ratio",
    "max_grad_norm",
)


def note(message: str) -> None:
    """One line on stderr (callers print it on the main rank only)."""
    print(message, file=sys.stderr, flush=True)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (the data fingerprint kept in checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep only logged lines of steps <= ``last_step`` (those after it will be redone).

    A line that does not parse (the last one, torn by a kill mid-write) is dropped; returns
    how many were. The file is replaced atomically and durably (``calibrated_lm.durable``)."""
    if not path.exists():
        return 0
    kept = []
    torn = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, TypeError, KeyError):
            torn += 1
            continue
        if step <= last_step:
            kept.append(line)
    # Atomically (durable.py): a crash mid-rewrite keeps the old log, never half of it.
    durable.write_text(path, "".join(f"{line}\n" for line in kept))
    return torn


def resume_candidates(
    checkpoints: list[Path], *, weights: bool, say: bool
) -> list[tuple[Path, dict[str, Any]]]:
    """The intact checkpoints (by :func:`inspect_checkpoint`), newest first, with their
    states; each damaged one is reported and skipped."""
    good, bad = [], []
    for path in reversed(checkpoints):
        try:
            good.append((path, inspect_checkpoint(path, weights=weights)))
        except CheckpointError as exc:
            bad.append(f"{path.name}: {exc}")
            continue
        if say and len(good) == 1:  # those newer than the one resumed from
            for line in bad:
                name, why = line.split(": ", 1)
                note(f"--resume: skipping checkpoint {name}: {why}")
    if not good:
        root = checkpoints[0].parent if checkpoints else "checkpoints"
        raise UserError(f"--resume: no intact checkpoint in {root} ({'; '.join(bad)})")
    return good


def _where(value: Any) -> Any:
    """A setting that names a local file or folder, as its resolved path (the same files
    however spelled: ``data.jsonl``, ``./data.jsonl``, an absolute path); else unchanged (a
    hub id, an embedded model's name)."""
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "max_grad_norm":  # 0 and None both mean no clipping
        a, b = a or None, b or None
    if key in ("model", "data"):
        a, b = _where(a), _where(b)
    return a == b


def check_resume(cfg: Any, path: Path, state: dict[str, Any], data_sha: str) -> list[str]:
    """Refuse resuming ``cfg`` (a ``TrainConfig``) from checkpoint ``path`` (state ``state``)
    when a setting that fixes the data order or the objective, or the data file's content,
    changed; returns notes (a checkpoint too old to say)."""
    saved = {**RESUME_LEGACY, **state["config"]}
    mine = asdict(cfg)
    # The data file is checked by content below where the checkpoint recorded it, so moving
    # it is no change; an older checkpoint has only its path.
    fixed = [k for k in RESUME_FIXED if not (k == "data" and state.get("data_sha256"))]
    diff = [k for k in fixed if not _same(k, saved.get(k), mine.get(k))]
    if diff:
        raise UserError(
            "--resume: these settings differ from the checkpointed run and would change the "
            "data order: "
            + ", ".join(f"{k} ({saved.get(k)} -> {mine.get(k)})" for k in diff)
            + "; resume with the values it was started with, or train into a new --output"
        )
    diff = [k for k in RESUME_OBJECTIVE if k in saved and not _same(k, saved[k], mine.get(k))]
    if diff:
        raise UserError(
            f"--resume: these settings differ from the run checkpointed in {path.name} and "
            "would change its objective midway: "
            + ", ".join(f"{k} ({saved[k]} -> {mine.get(k)})" for k in diff)
            + "; resume with the values it was started with, or train into a new --output"
        )
    old_sha = state.get("data_sha256")
    if old_sha is None:
        return [
            f"--resume: checkpoint {path.name} predates data fingerprints, so it cannot be "
            f"checked that {cfg.data} still holds the data it was trained on"
        ]
    if old_sha != data_sha:
        raise UserError(
            f"--resume: the content of {cfg.data} changed since checkpoint {path.name} was "
            f"written (sha256 {old_sha[:12]}... -> {data_sha[:12]}...), which would change "
            "the examples of every later step; restore the original file or train into a "
            "new --output"
        )
    return []


@dataclass
class ResumePlan:
    """The checkpoints a resume may continue from, checked before the model is loaded.

    ``candidates``: the intact ones, newest first, with their states (the first already
    checked by :func:`check_resume`); ``newest``: the newest checkpoint on disk, intact or
    not; ``noted``: the notes already printed (each is printed once)."""

    cfg: Any
    data_sha: str
    main: bool
    candidates: list[tuple[Path, dict[str, Any]]]
    newest: Path
    noted: set[str] = field(default_factory=set)

    def check(self, path: Path, state: dict[str, Any]) -> None:
        """:func:`check_resume` of candidate ``path``, its notes printed once (main rank)."""
        for line in check_resume(self.cfg, path, state, self.data_sha):
            if self.main and line not in self.noted:
                note(line)
            self.noted.add(line)


def plan_resume(
    cfg: Any, checkpoints: list[Path], data_sha: str, *, weights: bool, main: bool
) -> ResumePlan:
    """The :class:`ResumePlan` of resuming ``cfg`` from ``checkpoints`` (oldest first, at
    least one); ``weights``: the backend resumes from the full states (so they are checked
    too). :class:`UserError` when none is intact or the newest intact one is another run."""
    candidates = resume_candidates(checkpoints, weights=weights, say=main)
    plan = ResumePlan(cfg, data_sha, main, candidates, checkpoints[-1])
    plan.check(*candidates[0])
    return plan


def read_resumable(
    plan: ResumePlan, info: D.DistInfo, *, weights: bool, subset: Any
) -> tuple[Path, dict[str, Any]]:
    """The newest candidate that every rank can read, and what ``read_checkpoint`` read of it
    on this rank; a collective. An older (fallback) candidate must continue the same run and
    hold the same head subset (``subset``, from ``head_restriction.for_resume``) too."""
    from calibrated_lm.training import head_restriction as R

    skipped = False
    for i, (path, saved_state) in enumerate(plan.candidates):
        if i:  # a fallback: it must continue the same run too
            plan.check(path, saved_state)
            R.for_resume(subset, path)  # the same subset as the newest one
        problem = None
        ckpt = None
        try:
            ckpt = read_checkpoint(path, info.rank, weights=weights)
        except CheckpointError as exc:
            problem = str(exc)
        # Every rank resumes from the same checkpoint: one that any rank cannot read is out.
        if D.all_reduce_sum(0.0 if problem is None else 1.0, info):
            if info.main:
                note(
                    f"--resume: skipping checkpoint {path.name}: "
                    f"{problem or 'another rank could not read it'}"
                )
            skipped = True
            continue
        if info.main and (skipped or path != plan.newest):
            note(f"--resume: resuming from the newest intact checkpoint, {path.name}")
        return path, ckpt
    raise UserError(
        f"--resume: no checkpoint in {plan.newest.parent} could be loaded (see the notes above)"
    )
