"""benchmarks/bench_scoring_scale.py: its Gemma 3 shapes have the published parameter counts,
and a tiny run on the CPU writes one row per model with consistent numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_tiny_lm import build_tiny_lm

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_scoring_scale as bss  # noqa: E402


@pytest.mark.parametrize("name", sorted(bss.SHAPES))
def test_each_shape_has_the_published_parameter_count(name: str) -> None:
    model = bss._random_gemma(name, "meta", tiny=False)  # no memory: shapes only
    assert sum(p.numel() for p in model.parameters()) == bss.SHAPES[name]["params"]
    assert (
        model.config.vocab_size == 262144 and model.config.hidden_size == bss.SHAPES[name]["hidden"]
    )


def test_a_tiny_run_writes_a_row_per_model(tmp_path: Path) -> None:
    out, js = tmp_path / "scale.md", tmp_path / "scale.json"
    tok = build_tiny_lm(tmp_path / "tok")  # its 300-token tokenizer
    cmd = [sys.executable, str(BENCH / "bench_scoring_scale.py"), "--tiny", "--device", "cpu",
           "--limit", "2", "--tasks", "arc_easy", "--models", "gemma3-1b,gemma3-4b",
           "--tokenizer", str(tok), "--out", str(out), "--json", str(js)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(js.read_text())["models"]
    assert [r["model"] for r in rows] == ["gemma3-1b", "gemma3-4b"]
    for r in rows:
        assert r["random_weights"] and r["questions"] == 2 and r["tokens"] > 0
        assert r["questions_per_s"] == pytest.approx(2 / r["seconds"], rel=0.05)
    assert out.read_text().count("| gemma3-") == 2
    # An unknown model fails alone: the others' rows are still written, and the exit says so.
    bad = subprocess.run([*cmd[:-6], "--models", "gemma3-70b,gemma3-1b", "--tokenizer", str(tok),
                          "--json", str(js)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 1 and "no result for gemma3-70b" in bad.stderr
    assert [r["model"] for r in json.loads(js.read_text())["models"]] == ["gemma3-1b"]
    with pytest.raises(SystemExit, match="unknown model"):
        bss._model("gemma3-70b", "cpu", tiny=True, tokenizer=tok)
