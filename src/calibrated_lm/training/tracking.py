"""Where ``calibrated-lm train`` logs its records: ``metrics.jsonl`` always, plus TensorBoard or
Weights & Biases with ``--report-to``.

A record is the dict the loop writes as one line of ``metrics.jsonl`` (``step``, ``loss``,
``lr``, ``confidence``, ..., and the held-out ``eval_*`` figures on evaluated steps). Every
tracker receives the same records; TensorBoard and W&B get their numeric fields as scalars
under the same names, at ``global_step = record["step"]`` (``None`` values, such as the
gradient norm of a skipped step, and lists, such as ``nonfinite_grads``, are left out there;
booleans become 0/1).

Resuming: the loop truncates ``metrics.jsonl`` to the checkpointed step, so the steps it
redoes are not duplicated there. TensorBoard is opened with ``purge_step`` at the first step
to (re)do, which hides the events an interrupted run wrote after its checkpoint. W&B continues
the same run (its id is kept in ``OUTPUT/tracking.json``); W&B ignores a step logged again
(the redone steps of an exact resume carry the same values, up to ``tokens_per_s`` and ``step_s``).
Offline (``WANDB_MODE=offline``), each start writes an ``offline-run-*`` folder of its own in
``OUTPUT/wandb``, all with that run id and a resume asked for; ``wandb sync`` uploads them.

Only the main rank creates trackers (the others get :class:`NullTracker`). TensorBoard needs
the ``tensorboard`` package (``pip install 'calibrated-lm[tracking]'``) and W&B the ``wandb``
package (``pip install 'calibrated-lm[wandb]'``); :func:`check_report_to` says so in one
sentence before anything is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from calibrated_lm import durable
from calibrated_lm.errors import UserError

BACKENDS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
TRACKING_FILE = "tracking.json"  # the W&B run id, so that a resume continues the same run
_PACKAGES = {"tensorboard": ("tensorboard", "tracking"), "wandb": ("wandb", "wandb")}


def parse_report_to(value: Any) -> tuple[str, ...]:
    """The backends named by ``--report-to``: ``none``, one of :data:`BACKENDS`, or several
    separated by commas (``tensorboard,wandb``). Raises :class:`UserError` (one sentence) for
    anything else."""
    choices = "none, tensorboard, wandb or a comma-separated list of the last two"
    if not isinstance(value, str):
        raise UserError(f"--report-to must be {choices}, got {value!r}")
    names = [part.strip().lower() for part in value.split(",")]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise UserError(f"--report-to must be {choices}, got {value!r}")
    return tuple(dict.fromkeys(names))  # unique, in the order given


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported (or stubbed by a test) already
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_report_to(value: Any) -> tuple[str, ...]:
    """:func:`parse_report_to`, and refuse a backend whose package is not installed."""
    backends = parse_report_to(value)
    for name in backends:
        module, extra = _PACKAGES[name]
        if not _installed(module):
            raise UserError(
                f"--report-to {name} needs the {module} package, which is not installed: "
                f"pip install 'calibrated-lm[{extra}]' (or pip install {module}), or leave "
                "--report-to out"
            )
    return backends


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The fields of ``record`` a scalar tracker logs: numbers and booleans, except ``step``
    (the x axis); ``None``, strings and lists are left out."""
    out = {}
    for key, value in record.items():
        if key == "step" or value is None or isinstance(value, (str, list, dict, tuple)):
            continue
        if isinstance(value, (bool, int, float)):
            out[key] = float(value)
    return out


class Tracker:
    """Receives every logged record (a dict with an integer ``step``); :meth:`close` flushes."""

    def log(self, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Make every record logged so far durable (called before each checkpoint is
        written); a no-op for trackers whose files no resume reads."""

    def close(self) -> None:
        """Flush and release; safe to call twice."""


class NullTracker(Tracker):
    """Logs nothing (non-main ranks)."""

    def log(self, record: Mapping[str, Any]) -> None:
        pass


class JsonlTracker(Tracker):
    """Appends each record as one JSON line (an append-only journal: ``calibrated_lm.durable``'s
    module docstring). The file is opened per line and flushed, so a kill can tear at most the
    last line (which a resume drops); :meth:`sync` (before every checkpoint) and
    :meth:`close` fsync it and its folder, so the lines a checkpoint covers survive a power
    loss once the checkpoint does. Lines after the newest checkpoint are redone by a resume,
    so they are not fsynced one by one (that would cost a disk flush per logged step)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def log(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(record)) + "\n")

    def sync(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return  # nothing logged yet
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        durable.fsync_dir(self.path.parent)  # the file's creation

    def close(self) -> None:
        self.sync()


class TensorBoardTracker(Tracker):
    """``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``; ``purge_step`` hides the
    events of steps at or after it that an interrupted run wrote (see the module docstring)."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)
        self._closed = False

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        if not self._closed:
            self.writer.flush()
            self.writer.close()
            self._closed = True


class WandbTracker(Tracker):
    """A W&B run in ``output`` (``WANDB_PROJECT``, ``WANDB_MODE``... are wandb's own); the run
    id is kept in ``output/tracking.json`` so that ``--resume`` continues the same run."""

    def __init__(self, output: Path, config: Mapping[str, Any], resume: bool) -> None:
        import wandb

        self.wandb = wandb
        output = Path(output)
        meta_path = output / TRACKING_FILE
        meta = _read_json(meta_path)
        run_id = meta.get("wandb_run_id") if resume else None
        if not run_id:
            run_id = _new_run_id(wandb)
            _write_json(meta_path, {**meta, "wandb_run_id": run_id})
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "calibrated-lm"),
                name=output.resolve().name,
                id=run_id,
                resume="allow",
                dir=str(output),
                config=dict(config),
            )
        except Exception as exc:  # no login, no network, a bad setting: wandb's own errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(
                f"--report-to wandb: wandb.init failed ({first}); log in (wandb login), set "
                "WANDB_MODE=offline, or leave --report-to wandb out"
            ) from exc
        self._closed = False

    def log(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        if not self._closed:
            self.run.finish()
            self._closed = True


def _new_run_id(wandb: Any) -> str:
    util = getattr(wandb, "util", None)
    if util is not None and hasattr(util, "generate_id"):
        return str(util.generate_id())
    return os.urandom(4).hex()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Atomically and durably: a resume reads the run id back."""
    durable.write_json(path, value, indent=1)


class MultiTracker(Tracker):
    """Forwards to several trackers; closes them all, even when one fails."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def log(self, record: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def sync(self) -> None:
        for tracker in self.trackers:
            tracker.sync()

    def close(self) -> None:
        errors = []
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # close the others first, then report
                errors.append(exc)
        if errors:
            raise errors[0]


def open_trackers(
    report_to: str,
    output: Path,
    *,
    metrics_file: str,
    config: Mapping[str, Any],
    start_step: int,
    resume: bool,
    main: bool,
) -> Tracker:
    """The run's trackers: ``metrics_file`` in ``output`` (JSON lines) plus the
    ``--report-to`` backends, on the main rank; a :class:`NullTracker` elsewhere.
    ``start_step`` is the number of steps already done (those after it are redone)."""
    if not main:
        return NullTracker()
    trackers: list[Tracker] = [JsonlTracker(Path(output) / metrics_file)]
    for name in parse_report_to(report_to):
        if name == "tensorboard":
            # Logged steps are 1-based: start_step + 1 is the first one (re)done, and events
            # of it or later steps in older event files are stale: those of a run interrupted
            # after its checkpoint, or of one that started over before any checkpoint.
            purge = start_step + 1
            trackers.append(TensorBoardTracker(Path(output) / TENSORBOARD_DIR, purge))
        else:
            trackers.append(WandbTracker(Path(output), config, resume))
    return MultiTracker(trackers)
