"""Claim 3's report (experiments/claim3_report.py) on synthetic work folders: the
pre-registered interaction and its verdict rules, the regime check, the checks of what each
evaluation recorded, and the evidence it commits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import claim3_report as R3  # noqa: E402
from helpers_claims import samples  # noqa: E402
from sft_calibration import SFTRun  # noqa: E402

PRIMARY_TEST = "primary: I = D(24,576) - D(262,144)"


def ev(
    work: Path,
    eps: float,
    seed: int,
    sharp: float,
    fmt: str = "trained",
    *,
    n: int = 150,
    protocol: dict | None = None,
    **kw,
) -> Path:
    """One finished evaluation of a claim-3 arm's run: samples of the primary tasks at
    logit sharpness ``sharp``, and the summary.json protocol eval would record for it (the
    head subset and ``--uncovered skip`` of a ``vocab`` run, the training T / C in the
    applied format), overridden by ``protocol``."""
    name = SFTRun(eps, seed, lr=8e-5, epochs=3, **kw).name(8e-5)
    folder = work / f"evals/{name}__{fmt}"
    samples(folder / "samples.jsonl", n, sharp, tasks=R3.PRIMARY)
    proto: dict = {}
    if "vocab" in kw:
        proto["head_subset"] = {"size": kw["vocab"], "vocab_size": 262144}
        proto["uncovered"] = "skip"
    if fmt == "trained_applied":
        for k, key in R3.TRANSFORM_KEYS.items():
            if k in kw:
                proto[key] = float(kw[k])
    proto.update(protocol or {})
    (folder / "summary.json").write_text(json.dumps({"protocol": proto}))
    return folder


def arms_grid(c2: Path, c3: Path, small: tuple[float, float], full=(2.5, 2.4), seeds=(1, 2)):
    """Both seeds of the primary test's two arms: (eps 0, eps 0.1) sharpness per arm."""
    for s in seeds:
        ev(c2, 0.0, s, full[0])
        ev(c2, 0.1, s, full[1])
        ev(c3, 0.0, s, small[0], vocab=24576)
        ev(c3, 0.1, s, small[1], vocab=24576)


def test_claim3_report_interaction_regime_check_and_missing_runs(tmp_path: Path) -> None:
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    # Full V: eps 0 over-confident, smoothing barely helps (sharpness 2.5 -> 2.4).
    # V' 24,576: the same over-confidence, smoothing calibrates (2.5 -> 1.0).
    arms_grid(c2, c3, small=(2.5, 1.0))
    for s in (1, 2):
        # V' 65,536: eps 0 not over-confident (under-confident): the regime check fails.
        ev(c3, 0.0, s, 0.3, vocab=65536)
        ev(c3, 0.1, s, 0.3, vocab=65536)
    ev(c3, 0.0, 1, 2.5, temperature=0.5)  # one remedy run only
    claims = tmp_path / "claims.json"
    out = R3.write_report(c3, c2, tmp_path / "res", bootstrap=200, claims_path=claims)
    tests = out["tests"]
    primary = tests[PRIMARY_TEST]
    assert primary["verdict"] == "reproduced" and primary["contrast"]["ci95"][1] < 0
    assert "reason" not in primary
    small, full = primary["arms"]["V'=24576"], primary["arms"]["V'=262144"]
    assert small["D"] < full["D"] < 0 and small["gap_ci95"][0] > 0
    assert primary["contrast"]["delta"] == pytest.approx(small["D"] - full["D"])
    # Each seed's own D averages to the point D; each seed's I is D(small) - D(full) of it.
    assert np.mean(small["D_per_seed"]) == pytest.approx(small["D"])
    per_seed = primary["contrast"]["per_seed"]
    assert per_seed == pytest.approx(
        [a - b for a, b in zip(small["D_per_seed"], full["D_per_seed"])]
    )
    assert all(v < 0 for v in per_seed)
    # The synthetic runs differ in sharpness only: accuracy does not move.
    assert small["d_accuracy"] == pytest.approx(0.0, abs=1e-12)
    middle = tests["D(65,536) - D(262,144)"]
    assert middle["verdict"] == "inconclusive" and "V'=65536" in middle["reason"]
    remedy = tests["remedy T 0.5 (as saved): D_R - D(262,144)"]
    assert remedy["verdict"] is None and "T 0.5, as saved eps 0.1 seed 1" in remedy["missing"]
    text = (tmp_path / "res/tables.md").read_text()
    assert "**reproduced**" in text and "no verdict; missing" in text
    assert R3.SEED_CAVEAT in text and "per seed" in text
    png = (tmp_path / "res/claim3_effects.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    recs = [r for r in json.loads(claims.read_text()) if r["claim"] == "3"]
    assert {r["setting"] for r in recs} == {PRIMARY_TEST, "D(65,536) - D(262,144)"}


def test_claim3_not_reproduced_when_the_arms_smooth_alike(tmp_path: Path) -> None:
    """The same effect at both V': I's interval sits on 0, above -0.005."""
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    arms_grid(c2, c3, small=(2.5, 2.4))
    out = R3.write_report(c3, c2, tmp_path / "res", bootstrap=200, claims_path=tmp_path / "c")
    primary = out["tests"][PRIMARY_TEST]
    assert primary["verdict"] == "not reproduced"
    assert primary["contrast"]["ci95"][0] > -R3.NEGLIGIBLE


def test_claim3_regime_check_covers_the_full_vocabulary_arm(tmp_path: Path) -> None:
    """A contrast whose V' = 262,144 arm is not over-confident gets no firm verdict, however
    clear I's interval is."""
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    arms_grid(c2, c3, small=(2.5, 1.0), full=(0.3, 0.3))
    out = R3.write_report(c3, c2, tmp_path / "res", bootstrap=200, claims_path=tmp_path / "c")
    primary = out["tests"][PRIMARY_TEST]
    assert primary["verdict"] == "inconclusive"
    assert "regime check failed" in primary["reason"] and "V'=262144" in primary["reason"]
    assert "V'=24576" not in primary["reason"]


def test_claim3_remedy_supported_in_both_scoring_formats(tmp_path: Path) -> None:
    """A remedy whose smoothing calibrates where the full arm's barely does: supported, as
    saved and with T applied; the verdict names are the remedies' own."""
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    arms_grid(c2, c3, small=(2.5, 1.0))
    for s in (1, 2):
        for fmt in ("trained", "trained_applied"):
            ev(c3, 0.0, s, 2.5, fmt, temperature=0.5)
            ev(c3, 0.1, s, 1.0, fmt, temperature=0.5)
    out = R3.write_report(c3, c2, tmp_path / "res", bootstrap=200, claims_path=tmp_path / "c")
    for how in ("as saved", "applied"):
        e = out["tests"][f"remedy T 0.5 ({how}): D_R - D(262,144)"]
        assert e["verdict"] == "supported", (how, e)
    assert out["tests"]["remedy C 32 (applied): D_R - D(262,144)"]["verdict"] is None


def test_claim3_decision_rules() -> None:
    # The interval alone, as pre-registered.
    assert R3.decide([-0.03, -0.01], [-0.02, -0.02]) == ("reproduced", None)
    assert R3.decide([-0.004, 0.02], [0.0, 0.01]) == ("not reproduced", None)
    assert R3.decide([-0.006, 0.02], [0.0, 0.01])[0] == "inconclusive"
    assert R3.decide([-0.03, 0.001], [-0.02, -0.02])[0] == "inconclusive"
    # The margins are strict: an end exactly at 0 or at -0.005 decides nothing.
    assert R3.decide([-0.03, 0.0], [-0.02, -0.02])[0] == "inconclusive"
    assert R3.decide([-R3.NEGLIGIBLE, 0.02], [0.0, 0.0])[0] == "inconclusive"
    # Amended: each seed's own contrast must agree with a firm verdict.
    verdict, reason = R3.decide([-0.03, -0.01], [-0.04, 0.002])
    assert verdict == "inconclusive" and "seeds disagree" in reason and "+0.0020" in reason
    verdict, reason = R3.decide([-0.004, 0.02], [0.01, -0.006])
    assert verdict == "inconclusive" and "-0.0060" in reason
    # Below 0 but inside the margin: reproduced, with the size said.
    verdict, reason = R3.decide([-0.004, -0.001], [-0.003, -0.002])
    assert verdict == "reproduced" and "under the margin" in reason
    # Left-out questions come first, then the regime check, whatever the interval says.
    verdict, reason = R3.decide([-0.03, -0.01], [-0.02, -0.02], left_out=["x: arc_easy 3 of 9"])
    assert verdict == "inconclusive" and reason.startswith("primary questions left out")
    verdict, reason = R3.decide([-0.03, -0.01], [-0.02, -0.02], regime_failed=["V'=262144"])
    assert verdict == "inconclusive" and "regime check failed" in reason


def test_claim3_contrast_verdict_rules() -> None:
    assert R3.contrast_verdict([-0.03, -0.01]) == "reproduced"
    assert R3.contrast_verdict([-0.004, 0.02]) == "not reproduced"
    assert R3.contrast_verdict([-0.03, 0.01]) == "inconclusive"


def test_claim3_interval_is_of_the_difference_of_shared_draws(tmp_path: Path) -> None:
    """I's draws are D(small)'s minus D(full)'s from the same seed and question resampling:
    two arms with identical evaluations give exactly 0 in every draw, where independent
    draws would give an interval around 0 of the width of D's own."""
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    arms_grid(c2, c3, small=(2.5, 1.0), full=(2.5, 1.0))
    out = R3.write_report(c3, c2, tmp_path / "res", bootstrap=200, claims_path=tmp_path / "c")
    primary = out["tests"][PRIMARY_TEST]
    assert primary["contrast"]["ci95"] == pytest.approx([0.0, 0.0], abs=1e-12)
    lo, hi = primary["arms"]["V'=24576"]["D_ci95"]
    assert hi - lo > 0.005  # D itself varies across draws


def test_claim3_refuses_evaluations_whose_protocol_does_not_match_the_arm(
    tmp_path: Path,
) -> None:
    """A restricted-head arm's evaluation with another subset size, an evaluation without its
    summary (so the left-out check cannot look), or a full-vocabulary run scored with a
    subset: no verdict, each named."""
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    arms_grid(c2, c3, small=(2.5, 1.0))
    ev(c3, 0.1, 2, 1.0, vocab=24576, protocol={"head_subset": {"size": 65536}})
    (
        c2 / "evals" / f"{SFTRun(0.0, 1, lr=8e-5, epochs=3).name(8e-5)}__trained/summary.json"
    ).unlink()
    ev(c2, 0.1, 1, 2.4, protocol={"head_subset": {"size": 24576}, "uncovered": "skip"})
    out = R3.write_report(c3, c2, tmp_path / "res", bootstrap=100, claims_path=tmp_path / "c")
    primary = out["tests"][PRIMARY_TEST]
    assert primary["verdict"] is None
    got = "; ".join(primary["missing"])
    assert "V'=24576 eps 0.1 seed 2: head subset 65536, expected 24576" in got
    assert "V'=262144 eps 0 seed 1: no summary.json" in got
    assert "V'=262144 eps 0.1 seed 1: head subset 24576, expected none" in got
    # A remedy scored "applied" without its T, or "as saved" with it.
    arms = [R3.Arm("T, applied", c3, (("temperature", 0.5),), "trained_applied")]
    ev(c3, 0.0, 1, 2.5, "trained_applied", protocol={"logit_temperature": None}, temperature=0.5)
    ev(c3, 0.1, 1, 2.5, "trained_applied", protocol={"logit_temperature": 2.0}, temperature=0.5)
    got = R3.protocol_problems(arms, (1,))
    assert got == [
        "T, applied eps 0 seed 1: logit_temperature None, expected 0.5",
        "T, applied eps 0.1 seed 1: logit_temperature 2.0, expected 0.5",
    ]
    saved = [R3.Arm("T, as saved", c3, (("temperature", 0.5),))]
    ev(c3, 0.0, 1, 2.5, protocol={"logit_temperature": 0.5}, temperature=0.5)
    ev(c3, 0.1, 1, 2.5, temperature=0.5)
    assert R3.protocol_problems(saved, (1,)) == [
        "T, as saved eps 0 seed 1: logit_temperature 0.5, expected None"
    ]


def test_claim3_refuses_models_that_scored_other_questions_or_labels(tmp_path: Path) -> None:
    """Every model of a contrast must hold the same question ids with the same gold labels
    (claim 2's runs were scored by older code); otherwise no verdict, the task named."""
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    arms_grid(c2, c3, small=(2.5, 1.0))
    # One restricted-head evaluation lost ten PIQA questions.
    f = ev(c3, 0.0, 2, 2.5, vocab=24576)
    lines = f.joinpath("samples.jsonl").read_text().splitlines()
    kept = [
        x for x in lines if not (json.loads(x)["task"] == "piqa" and int(json.loads(x)["id"]) < 10)
    ]
    f.joinpath("samples.jsonl").write_text("\n".join(kept) + "\n")
    # One full-vocabulary evaluation gives SciQ question 3 another gold label.
    g = c2 / "evals" / f"{SFTRun(0.1, 1, lr=8e-5, epochs=3).name(8e-5)}__trained/samples.jsonl"
    rows = [json.loads(x) for x in g.read_text().splitlines()]
    for r in rows:
        if r["task"] == "sciq" and r["id"] == "3":
            r["label"] = (r["label"] + 1) % 4
    g.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = R3.write_report(c3, c2, tmp_path / "res", bootstrap=100, claims_path=tmp_path / "c")
    primary = out["tests"][PRIMARY_TEST]
    assert primary["verdict"] is None
    assert "piqa: the models scored different questions (counts [140, 150])" in primary["missing"]
    assert "sciq: the models' gold labels differ" in primary["missing"]


def test_claim3_report_drops_an_earlier_record_that_lost_its_verdict(tmp_path: Path) -> None:
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    claims = tmp_path / "claims.json"
    arms_grid(c2, c3, small=(2.5, 1.0))
    R3.write_report(c3, c2, tmp_path / "res", bootstrap=100, claims_path=claims)
    assert any(r["claim"] == "3" for r in json.loads(claims.read_text()))
    ev(c3, 0.1, 2, 1.0, vocab=24576, protocol={"head_subset": {"size": 65536}})
    R3.write_report(c3, c2, tmp_path / "res", bootstrap=100, claims_path=claims)
    assert not any(r["claim"] == "3" for r in json.loads(claims.read_text()))


def test_claim3_report_lists_secondary_tasks_and_the_left_out_shares(tmp_path: Path) -> None:
    """MMLU and HellaSwag beside the test, each arm on its own shared questions with the
    covered share its summaries record; the SFT targets each V' leaves out of the loss."""
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    arms_grid(c2, c3, small=(2.5, 1.0))
    tasks = (*R3.PRIMARY, "hellaswag")
    for s in (1, 2):
        for eps, sharp in ((0.0, 2.5), (0.1, 1.0)):
            name = SFTRun(eps, s, lr=8e-5, epochs=3, vocab=24576).name(8e-5)
            folder = c3 / f"evals/{name}__trained"
            samples(folder / "samples.jsonl", 150, sharp, tasks=tasks)
            proto = {
                "head_subset": {"size": 24576},
                "uncovered": "skip",
                "uncovered_questions": {
                    "hellaswag": {"questions": 600, "left_out": 450, "share": 0.75}
                },
            }
            (folder / "summary.json").write_text(json.dumps({"protocol": proto}))
    out = R3.write_report(c3, c2, tmp_path / "res", bootstrap=100, claims_path=tmp_path / "c")
    hs = out["secondary"]["V'=24576"]["hellaswag"]
    assert hs["n"] == 150 and hs["covered"] == pytest.approx(0.25) and hs["D"] < 0
    assert out["secondary"]["V'=262144"] == {}  # no secondary task in its samples
    assert out["tests"][PRIMARY_TEST]["verdict"] == "reproduced"  # HellaSwag's share is allowed
    left = out["sft_targets_left_out"]
    assert set(left) == {"V'=65536", "V'=24576"} and 0 < left["V'=65536"] < left["V'=24576"] < 0.1
    text = (tmp_path / "res/tables.md").read_text()
    assert "| V'=24576 | hellaswag | 150 | 0.250 |" in text
    assert "left out of the loss" in text and "GPU check of the output-layer gather" in text


def test_claim3_report_commits_its_own_finished_units_and_the_base_under_each_head(
    tmp_path: Path,
) -> None:
    """The evidence the next session's staging restores from: claim 3's finished evaluations
    (samples and records), never a unit restored from the control or a run cut short."""
    from restore_units import RESTORED

    c3 = tmp_path / "c3"
    samples(c3 / "evals/base__trained/samples.jsonl", 120, 1.0, tasks=R3.PRIMARY)
    (c3 / "evals/base__trained" / RESTORED).write_text("{}")  # the control's, committed there
    samples(c3 / "evals/base_V24576__trained/samples.jsonl", 120, 1.2, tasks=R3.PRIMARY)
    cut = c3 / "runs/sft_lr8e-05_ep3_eps0_V24576_s1"  # begun, lost with the machine
    cut.mkdir(parents=True)
    (cut / "metrics.jsonl").write_text('{"step": 1}\n')
    res = tmp_path / "res"
    out = R3.write_report(c3, tmp_path / "c2", res, bootstrap=100, claims_path=tmp_path / "c.json")
    assert sorted(p.name for p in (res / "samples").iterdir()) == ["base_V24576__trained.jsonl.gz"]
    assert (res / "records/evals/base_V24576__trained/done.json").is_file()
    assert not (res / "records/evals/base__trained").exists()
    assert not (res / "records/runs").exists()
    base = out["base_under_heads"]
    assert list(base) == ["V'=24576"] and set(base["V'=24576"]) == set(R3.PRIMARY)
    ece = base["V'=24576"]["arc_easy"]["ece"]  # sharper logits through the cut head
    assert ece["delta"] == pytest.approx(ece["b"] - ece["a"]) and ece["delta"] != 0
    assert "restricted minus full head" in (res / "tables.md").read_text()
    assert not (res / "claim3_effects.png").exists()  # no arm has its runs yet


def test_claim3_report_refuses_a_verdict_when_primary_questions_were_left_out(
    tmp_path: Path,
) -> None:
    """The amended protocol keeps every primary answer token in the subsets; an evaluation
    whose summary records a primary question left out (``--uncovered skip``) makes the test
    inconclusive with the evaluation named, while HellaSwag's left-out share is allowed."""
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    arms_grid(c2, c3, small=(2.5, 1.0))
    for s in (1, 2):
        for eps, sharp in ((0.0, 2.5), (0.1, 1.0)):
            left = {"hellaswag": {"questions": 100, "left_out": 80, "share": 0.8}}
            if (eps, s) == (0.1, 2):
                left["arc_easy"] = {"questions": 150, "left_out": 3, "share": 0.02}
            ev(c3, eps, s, sharp, vocab=24576, protocol={"uncovered_questions": left})
    arms = [R3.Arm("V'=24576", c3, (("vocab", 24576),)), R3.Arm("V'=262144", c2)]
    assert R3.primary_left_out(arms, (1, 2)) == ["V'=24576 eps 0.1 seed 2: arc_easy 3 of 150"]
    out = R3.write_report(c3, c2, tmp_path / "res", bootstrap=100, claims_path=tmp_path / "c")
    primary = out["tests"][PRIMARY_TEST]
    assert primary["verdict"] == "inconclusive"
    assert "left out by the head subset" in primary["reason"] and "arc_easy 3" in primary["reason"]
