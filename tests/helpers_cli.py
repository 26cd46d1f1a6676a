"""Run the ``calibrated-lm`` CLI in-process and capture what a user would see."""

from __future__ import annotations

import contextlib
import io

from calibrated_lm.cli import main


def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``calibrated-lm ARGV``; argparse's SystemExit becomes a code."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()
