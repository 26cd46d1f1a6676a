"""Whose run an output folder holds, so that no command writes into another command's.

Each command that owns its folder is known by the files it writes there first: eval's
``run.json`` (``evaluation.run_file.RUN_FILE``), train's ``metrics.jsonl`` and ``checkpoints/``
(``training.loop.METRICS_FILE``, ``training.checkpoint.checkpoint_root``); a test pins these
names to those constants. ``metrics`` and ``capacity`` own no marker here: each checks the
``summary.json`` it would replace (capacity: another model's results; metrics: any summary it
did not write). :func:`remove_stale_figures` clears an earlier run's figures from a folder a
command writes again.
"""

from __future__ import annotations

from pathlib import Path

from calibrated_lm.errors import UserError

MARKERS: dict[str, tuple[str, ...]] = {
    "eval": ("run.json",),
    "train": ("metrics.jsonl", "checkpoints"),
}


def refuse_other_runs(folder: str | Path, command: str) -> None:
    """Raise :class:`UserError` if ``folder`` holds the run of a command other than
    ``command`` (whose files ``command`` would replace or mix with its own)."""
    folder = Path(folder)
    for other, names in MARKERS.items():
        found = [n for n in names if other != command and (folder / n).exists()]
        if found:
            raise UserError(
                f"--output {folder} holds a calibrated-lm {other} run ({', '.join(found)}); "
                f"give {command} another --output folder"
            )


def remove_stale_figures(
    folder: str | Path, prefix: str, written: list[Path] | list[str]
) -> list[Path]:
    """Delete ``folder/PREFIX*.png`` and ``.svg`` files that this run did not write (an earlier
    run's figures of tasks this one does not have), so that the folder shows only what its
    report describes. Returns what was removed."""
    folder = Path(folder)
    keep = {Path(p).resolve() for p in written}
    removed = []
    for p in sorted(folder.glob(f"{prefix}*")):
        if p.suffix in (".png", ".svg") and p.is_file() and p.resolve() not in keep:
            p.unlink()
            removed.append(p)
    return removed


def existing_summary(folder: str | Path) -> dict | None:
    """``folder/summary.json`` as the command about to replace it sees it: None when there is
    none, ``{}`` when it cannot be read or is not a JSON object (whose it is cannot be told),
    else the object."""
    import json

    path = Path(folder) / "summary.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
