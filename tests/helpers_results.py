"""Whether the committed experiment results are in this tree.

`experiments/device_tree.sh slim` leaves them out of a device call's working tree. A sparse
checkout removes the files, but a copy of that tree may still hold their (empty) folders, as
the device's copy did in session 12, so a folder's presence says nothing: count its files.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def results_left_out(folder: str = "sft_control") -> bool:
    """True when ``experiments/results/<folder>`` holds no file at all (a slim tree)."""
    root = RESULTS / folder
    return not root.is_dir() or not any(p.is_file() for p in root.rglob("*"))
