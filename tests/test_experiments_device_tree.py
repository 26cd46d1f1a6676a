"""experiments/device_tree.sh: what of the checkout travels with a device call, and `slim`.

The script is copied into a small git repository of its own (it works on the checkout that
holds it), so the real checkout is never made sparse by a test.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    files = {
        "src/a.py": 100,
        "experiments/device_tree.sh": 0,  # the copy below
        "experiments/results/sft_claim2/samples/x.jsonl.gz": 5000,
        "experiments/results/claim3_subsets/V8192/head_subset.json": 700,
    }
    for rel, size in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(b"x" * size)
    shutil.copy(ROOT / "experiments" / "device_tree.sh", repo / "experiments" / "device_tree.sh")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    (repo / "notes.txt").write_bytes(b"y" * 30)  # untracked, not ignored: travels too
    return repo


def _run(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["bash", str(repo / "experiments" / "device_tree.sh"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_slim_leaves_the_results_behind_but_claim3s_subsets_and_full_restores(tmp_path):
    repo = _repo(tmp_path)
    script = (repo / "experiments" / "device_tree.sh").stat().st_size
    everything = 100 + script + 5000 + 700 + 30
    assert int(_run(repo, "bytes")) == everything
    assert int(_run(repo, "bytes", "slim")) == everything - 5000
    _run(repo, "slim")
    assert not (repo / "experiments/results/sft_claim2/samples/x.jsonl.gz").exists()
    assert (repo / "experiments/results/claim3_subsets/V8192/head_subset.json").exists()
    assert int(_run(repo, "bytes")) == everything - 5000  # what travels now
    status = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True
    ).stdout
    assert status.strip() == "?? notes.txt"  # nothing shows as deleted
    _run(repo, "full")
    assert (repo / "experiments/results/sft_claim2/samples/x.jsonl.gz").stat().st_size == 5000
    assert int(_run(repo, "bytes")) == everything


def test_the_slim_estimate_counts_what_a_sparse_checkout_keeps(tmp_path):
    """Untracked files (unbundled, uncommitted results) and modified tracked ones stay in the
    tree after `slim`: the estimate that sizes the staging pieces must count them."""
    repo = _repo(tmp_path)
    (repo / "experiments/results/sft_claim2/new.json").write_bytes(b"n" * 400)
    (repo / "experiments/results/sft_claim2/samples/x.jsonl.gz").write_bytes(b"m" * 6000)
    estimate = int(_run(repo, "bytes", "slim"))
    _run(repo, "slim")  # git keeps the modified file (with a warning) and the untracked one
    assert (repo / "experiments/results/sft_claim2/samples/x.jsonl.gz").exists()
    assert estimate == int(_run(repo, "bytes"))
    script = (repo / "experiments" / "device_tree.sh").stat().st_size
    assert estimate == 100 + script + 700 + 30 + 400 + 6000


def test_bytes_refuses_an_unknown_mode(tmp_path):
    repo = _repo(tmp_path)
    proc = subprocess.run(
        ["bash", str(repo / "experiments" / "device_tree.sh"), "bytes", "half"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "now or slim" in proc.stderr
