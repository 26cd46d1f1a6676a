"""Strict-JSON result files, written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from calibrated_lm import durable


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


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> Path:
    """Replace ``path`` by ``json_safe(obj)`` as strict JSON, atomically and durably
    (:func:`calibrated_lm.durable.write_json`: temporary file, fsync, rename, folder fsync), so
    a crash never leaves a half-written result behind and a full disk keeps the previous one
    (an OSError naming ``path``)."""
    return durable.write_json(path, json_safe(obj), indent=indent)
