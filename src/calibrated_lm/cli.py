"""``calibrated-lm``: one thin dispatcher over the subcommands.

Each subcommand lives next to the capability it exposes, in a module with
``add_parser(subparsers)`` (registers its options) and ``run(args) -> int``.
This file only wires them up and turns user errors into one sentence.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from calibrated_lm import __version__
from calibrated_lm.errors import UserError
from calibrated_lm.training.stop import TrainingStopped

# (command, module). Modules are imported only to build the parser; their heavy
# dependencies (torch, transformers) are imported inside ``run``.
COMMANDS: list[tuple[str, str]] = [
    ("metrics", "calibrated_lm.calibration.command"),
    ("train", "calibrated_lm.training.command"),
    ("eval", "calibrated_lm.evaluation.command"),
    ("compare", "calibrated_lm.evaluation.compare"),
    ("capacity", "calibrated_lm.analysis.command"),
]


# What an interrupted command leaves behind, for the message after Ctrl-C.
RESUME_HINTS: dict[str, str] = {
    "eval": "scored questions are kept in samples.jsonl; rerun the same command to resume.",
    "train": "checkpoints already written are kept: rerun with --resume to continue from the "
    "newest, or, where none was written yet, rerun the same command.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibrated-lm",
        description="Measure, train for and explain the confidence calibration of language models.",
    )
    parser.add_argument("--version", action="version", version=f"calibrated-lm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns its exit status (0 done, 2 a user error, 128+N stopped by
    signal N, 130 interrupted).

    Under a multi-rank launcher (``WORLD_SIZE > 1``) the process ends here with that status
    instead of returning: see :func:`_leave_rank`.
    """
    code = _dispatch(argv)
    if _launched_ranks() > 1:
        _leave_rank(code)
    return code


def _launched_ranks() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _leave_rank(code: int) -> None:
    """End a launched rank now, after flushing what it wrote.

    Its work is done and on disk (training leaves the process group together, with a barrier,
    before it returns), but a gloo rank can still abort while Python finalises -- a joinable
    C++ thread destroyed during interpreter shutdown ("terminate called without an active
    exception"; seen once in CI on 2 CPU ranks under ZeRO-3). The launcher then reports the
    whole finished run as failed, and a stopped run's 143 (resume me) as a crash. Skipping the
    finalisers keeps the status the command meant.
    """
    # wandb's own atexit teardown would be skipped; finish() has synced the run already.
    wandb = sys.modules.get("wandb")
    teardown = getattr(wandb, "teardown", None)
    for step in (teardown, logging.shutdown, sys.stdout.flush, sys.stderr.flush):
        try:
            if step is not None:
                step()
        except Exception:
            # A broken pipe (torchrun ... | head) or a tracker's teardown failing must not
            # turn the command's status into a traceback.
            pass
    os._exit(code)


def _dispatch(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except TrainingStopped as exc:  # a UserError, but the user asked for it: not an "error"
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        # A safety net: readers that know the file name report it themselves, with its line.
        print(
            f"error: an input file is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:
        # Unwritable output folders, full disks, vanished files: the user can fix these, so
        # they get a sentence (what and where) instead of a traceback.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: {RESUME_HINTS.get(args.command, 'files already written are kept.')}",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
