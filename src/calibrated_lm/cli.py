"""``calibrated-lm``: one thin dispatcher over the subcommands.

Each subcommand lives next to the capability it exposes, in a module with
``add_parser(subparsers)`` (registers its options) and ``run(args) -> int``.
This file only wires them up and turns user errors into one sentence.
"""

from __future__ import annotations

import argparse
import importlib
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
    "train": "checkpoints already written are kept; rerun with --resume to continue.",
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
