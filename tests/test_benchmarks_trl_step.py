"""bench_trl_step.py's variant names (the run itself needs TRL and, for its numbers, a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_trl_step as bts  # noqa: E402


def test_variant_names_with_rows_and_one_stream() -> None:
    assert bts._rows("calibrated_rows512") == 512
    assert bts._rows("calibrated_rows512_onestream") == 512
    assert bts._rows("calibrated") is None and bts._rows("calibrated_onestream") is None
    for ok in ("trl_nll", "trl_ls", "calibrated", "calibrated_onestream", "calibrated_rows256"):
        assert bts._known(ok), ok
    assert bts._known("calibrated_rows512_onestream")
    # TRL's own paths never call our loss, so a one-stream variant of them measures nothing.
    for bad in ("trl_nll_onestream", "calibrated_rowsx", "calibrated_rows", "other"):
        assert not bts._known(bad), bad
