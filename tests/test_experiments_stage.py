"""experiments/claim_stage.sh (claim 2 and 3's device staging) up to its plan and checks.

With STAGE_PLAN_ONLY=1 it restores the committed results into a temporary work folder, plans
the profile and checks that no run with committed evaluations would be trained again; the
next session's first training units are what its device procedure assumes.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers_results import results_left_out

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "claim_stage.sh"

pytestmark = [
    pytest.mark.skipif(
        not (ROOT / ".venv" / "bin" / "python").exists(), reason="the script runs .venv's python"
    ),
    # A device call's slim tree (experiments/device_tree.sh slim) leaves the results out.
    pytest.mark.skipif(
        results_left_out("sft_control"),
        reason="the committed results are not in this tree",
    ),
]


def _stage(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STAGE_PLAN_ONLY": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )


def _first_pending(stdout: str) -> list[str]:
    tail = stdout.split("first pending training units:")[1]
    return re.findall(r"train/(\S+)\s+pending", tail)


def test_claim2_restores_every_committed_run_and_trains_the_next_ones() -> None:
    done = {  # every claim-2 run with a committed evaluation
        p.name.split("__")[0]
        for p in (ROOT / "experiments/results/sft_claim2/records/evals").iterdir()
    }
    res = _stage("claim2")
    assert res.returncode == 0, res.stderr
    restored = res.stdout.split("restored runs:")[1].splitlines()[0].split()
    assert set(restored) == done | {"sft_lr8e-05_ep3_eps0_s1"}
    pending = _first_pending(res.stdout)
    assert pending and not set(pending) & set(restored)
    # Run order: seed 1's eps 0.05, 0.1, 0.2, then seed 2's four, then seed 3's.
    order = [f"sft_lr8e-05_ep3_eps{e}_s{s}" for s in (1, 2, 3) for e in ("0", "0.05", "0.1", "0.2")]
    todo = [r for r in order if r not in restored]
    assert pending == todo[: len(pending)]


def test_claim3_restores_the_control_base_and_starts_with_the_smallest_subset() -> None:
    res = _stage("claim3")
    assert res.returncode == 0, res.stderr
    # The script lists the units not done: the control's base evaluations were restored.
    assert not re.search(r"^eval/base/(trained|plain) ", res.stdout, re.M)
    assert "eval/base_V24576/trained" in res.stdout  # the base under each subset is pending
    assert _first_pending(res.stdout)[:2] == [
        "sft_lr8e-05_ep3_eps0_V24576_s1",
        "sft_lr8e-05_ep3_eps0.1_V24576_s1",
    ]


def test_an_unknown_profile_is_refused() -> None:
    res = _stage("claim9")
    assert res.returncode == 2 and "claim2 or claim3" in res.stderr
