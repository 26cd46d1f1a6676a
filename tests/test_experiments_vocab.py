"""experiments/sft_vocab_regimes.py: text shortening, and a tiny end-to-end run (two regimes,
pretraining, SFT with and without label smoothing and a remedy, evaluation, report, resume) on
synthetic data in a temporary folder. Asserts structure and semantics, not numbers."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXP))

import sft_vocab_regimes as svr  # noqa: E402


def test_cut_text_prefers_boundaries_and_respects_the_limit():
    assert svr.cut_text("short", 10) == "short"
    text = "First sentence here. Second one is longer and goes past the limit"
    cut = svr.cut_text(text, 30)  # a word end lies later, the sentence end wins
    assert cut == "First sentence here."
    assert svr.cut_text("line one\nline two is long", 15) == "line one"
    assert (
        svr.cut_text("word " * 20, 23).endswith("word")
        and len(svr.cut_text("word " * 20, 23)) <= 23
    )
    assert svr.cut_text("x" * 50, 10) == "x" * 10  # no boundary: hard cut


def test_shorten_record_drops_history_and_cuts_fields():
    rec = {
        "instruction": "Explain this. " * 30,
        "input": "",
        "output": "Answer. " * 100,
        "history": [["hi", "hello"]],
    }
    out = svr.shorten_record(rec, 60, 100)
    assert set(out) == {"instruction", "output"}
    assert len(out["instruction"]) <= 60 and len(out["output"]) <= 100


WORDS = (
    "the a model river city king music year people language water history small great north "
    "school war first new old light game team song system time world book law"
).split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("wikitext2_test.raw", "wiki_demo.txt"):
        text = "\n".join(" ".join(_sentence(rng) for _ in range(4)) for _ in range(120))
        (corpus / name).write_text(text)
    records = [
        {
            "instruction": _sentence(rng),
            "input": "",
            "output": " ".join(_sentence(rng) for _ in range(3)),
        }
        for _ in range(40)
    ]
    data = root / "instruct.json"
    data.write_text(json.dumps(records))
    argv = [
        "--corpus", str(corpus), "--data", str(data), "--work", str(root / "work"),
        "--results", str(root / "results"), "--pretrained", str(root / "pretrained"), "--vocabs", "280,400", "--dim", "16",
        "--layers", "1", "--pretrain-heldout-chars", "2000", "--pretrain-epochs", "0.2",
        "--pretrain-seq-len", "32", "--pretrain-batch", "4", "--holdout-frac", "0.25",
        "--prompt-chars", "40", "--response-chars", "80", "--sft-records", "12",
        "--sft-epochs", "1", "--sft-batch", "4", "--max-seq-len", "200", "--seeds", "1",
        "--remedy-seeds", "1", "--temperature-tokens", "50", "--bootstrap", "50",
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    assert svr.main(argv) == 0
    return root, argv


def test_end_to_end_writes_a_consistent_report(tiny_run):
    root, _ = tiny_run
    summary = json.loads((root / "results" / "summary.json").read_text())
    assert (root / "results" / svr.FIGURE).stat().st_size > 0
    tables = (root / "results" / "tables.md").read_text()
    assert [r["name"] for r in summary["regimes"]] == ["V280_D16", "V400_D16"]
    for reg in summary["regimes"]:
        assert reg["vocab"] in (280, 400) and reg["name"] in tables
        evals = reg["evals"]
        # pretrained + eps {0, 0.1} plain, T0.5 and C32 (one seed each)
        assert set(evals) == {
            "pretrained", "eps0_s1", "eps0.1_s1", "eps0_T0.5_s1", "eps0.1_T0.5_s1",
            "eps0_C32_s1", "eps0.1_C32_s1",
        }  # fmt: skip
        # every model is scored on the same held-out tokens of its regime
        assert len({e["tokens"] for e in evals.values()}) == 1
        for e in evals.values():
            assert 0.0 <= e["ece"] <= 1.0 and e["rms_ce"] >= e["ece"] - 1e-12
            assert e["ci95"]["ece"][0] <= e["ci95"]["ece"][1]
            assert e["examples_at_max_seq_len"] == 0
        assert (
            "train_transform" in evals["eps0_T0.5_s1"] and "train_transform" not in evals["eps0_s1"]
        )
        b = reg["ls_benefit"]
        assert set(b) == {"plain", "T0.5", "C32", "T0.5 as trained", "C32 as trained"}
        want = evals["eps0_s1"]["ece"] - evals["eps0.1_s1"]["ece"]
        assert b["plain"]["ece"] == pytest.approx(want)
        assert b["plain"]["ece_per_seed"] == [pytest.approx(want)]
        want_t = evals["eps0_T0.5_s1"]["ece"] - evals["eps0.1_T0.5_s1"]["ece"]
        assert b["T0.5"]["ece"] == pytest.approx(want_t)
        tt = [evals[f"eps{e}_C32_s1"]["train_transform"]["ece"] for e in ("0", "0.1")]
        assert b["C32 as trained"]["ece"] == pytest.approx(tt[0] - tt[1])
        rec = reg["recovery"]
        for k in ("T0.5", "C32 as trained"):
            assert rec[k]["seeds"] == [1]
            assert rec[k]["ece_recovery"] == pytest.approx(b[k]["ece"] - b["plain"]["ece"])
        settings = {s["setting"]: s for s in reg["settings"]}
        assert settings["SFT eps=0.1"]["ece"] == pytest.approx(evals["eps0.1_s1"]["ece"])
        assert settings["SFT eps=0, T=0.5"]["train_transform_ece"] == pytest.approx(
            evals["eps0_T0.5_s1"]["train_transform"]["ece"]
        )


def test_rerun_skips_finished_units(tiny_run):
    root, argv = tiny_run
    markers = sorted(root.rglob(svr.DONE))
    assert len(markers) == 1 + 2 * (2 + 2 * 6)  # prepare + per regime: pretrain, evals, SFT
    before = {p: p.stat().st_mtime_ns for p in markers}
    assert svr.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in markers} == before


def test_pretrained_models_made_with_other_settings_are_not_reused(tiny_run):
    root, argv = tiny_run
    other = [*argv, "--pretrain-epochs", "0.3", "--work", str(root / "work2")]
    with pytest.raises(SystemExit, match="pretrained with other settings"):
        svr.main(other)
    assert not (root / "work2").exists()
