"""Strict-JSON result files, written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None``.

    Python's ``json`` writes ``Infinity``/``NaN``, which strict parsers (jq, JavaScript,
    pandas with ``orient``) reject; an infinite NLL (a gold choice of probability 0) is real,
    so it is kept as ``null`` rather than hidden.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        return json_safe(obj.item())  # numpy scalars
    return obj


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 1) -> Path:
    """Write ``json_safe(obj)`` to ``path`` via a temporary file and a rename, so a crash
    never leaves a half-written result behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n", "utf-8")
    tmp.replace(path)
    return path
