"""claims.json records and their generated tables; the positive control's report and its
pre-registered criterion on a synthetic work folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import claims as C  # noqa: E402
import control_report as R  # noqa: E402
from helpers_claims import samples as _samples  # noqa: E402


def test_records_verdicts_update_and_render(tmp_path: Path) -> None:
    a = C.record("1", "base -> instruct", "mmlu", "ece", 0.03, 0.10, [0.06, 0.08], headline=True)
    assert a["delta"] == pytest.approx(0.07) and a["verdict"] == "higher"
    assert C.record("2", "s", "t", "ece", 0.1, 0.05, [-0.08, -0.01])["verdict"] == "lower"
    assert C.record("2", "s", "t", "ece", 0.1, 0.1, [-0.01, 0.01])["verdict"] == "no clear change"
    with pytest.raises(ValueError, match="claim must be"):
        C.record("4", "s", "t", "ece", 0, 0, [0, 0])
    path = tmp_path / "claims.json"
    C.update([a], "claim1", path)
    b = C.record("control", "dose", "arc_easy", "ece", 0.1, 0.2, [0.05, 0.15])
    C.update([b], "control", path)
    C.update([a, a], "claim1", path)  # a source's records are replaced, not appended
    recs = json.loads(path.read_text())
    assert [r["source"] for r in recs] == ["control", "claim1", "claim1"]
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- claims:claim1:start -->\nold\n<!-- claims:claim1:end -->\ny\n")
    assert C.render_into(readme, C.blocks(recs)) == ["claim1"]
    text = readme.read_text()
    assert "old" not in text and "+0.070 [+0.060, +0.080]" in text and text.endswith("y\n")
    c3 = C.record("3", "primary: I", "primary mean", "d_ece_contrast", -0.02, -0.03, [-0.02, 0.0])
    assert C.blocks([c3])["claim3"].splitlines()[-1] == (
        "| primary: I | primary mean | D = ECE(eps 0.1) - ECE(eps 0) | -0.020 | -0.030 | "
        "-0.010 [-0.020, +0.000] | no clear change |"
    )


def test_bad_records_name_the_record() -> None:
    good = C.record("1", "s", "t", "ece", 0.1, 0.2, [0.0, 0.2])
    with pytest.raises(ValueError, match="record 1: missing verdict"):
        C.check_records([good, {k: v for k, v in good.items() if k != "verdict"}])
    with pytest.raises(ValueError, match="record 0: a must be a finite number"):
        C.check_records([{**good, "a": float("nan")}])


def _heldout(path: Path, conf: float, acc: float, m: int = 200) -> None:
    rng = np.random.default_rng(1)
    n = rng.integers(5, 30, m).astype(float)
    c = np.clip(conf + rng.normal(0, 0.05, m), 0, 1) * n
    a = np.clip(acc + rng.normal(0, 0.05, m), 0, 1) * n
    per = {"n": n.tolist(), "nll": (n * 2).tolist(), "confidence": c.tolist(),
           "accuracy": a.tolist(), "entropy": n.tolist()}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"per_example": per}))


def test_control_report_applies_the_preregistered_criterion(tmp_path: Path) -> None:
    work = tmp_path / "work"
    _samples(work / "evals/base__trained/samples.jsonl", 300, 1.0)
    _heldout(work / "heldout_base/heldout.json", 0.55, 0.50)
    # lr 8e-5 x 3 epochs: sharper logits (over-confident) and a higher held-out gap;
    # lr 8e-5 x 1 epoch: the base's scores again (no change).
    over, same = "sft_lr8e-05_ep3_eps0_s1", "sft_lr8e-05_ep1_eps0_s1"
    _samples(work / f"evals/{over}__trained/samples.jsonl", 300, 2.5)
    _samples(work / f"evals/{same}__trained/samples.jsonl", 300, 1.0)
    _heldout(work / f"runs/{over}/heldout.json", 0.70, 0.50)
    _heldout(work / f"runs/{same}/heldout.json", 0.55, 0.50)
    for name in (over, same):
        (work / f"runs/{name}/done.json").write_text(json.dumps({"steps": 3}))
        (work / f"runs/{name}/metrics.jsonl").write_text(
            json.dumps({"epoch": 1, "loss": 2.0, "confidence": 0.6, "accuracy": 0.5}) + "\n"
        )
    claims = tmp_path / "claims.json"
    out = R.write_report(work, tmp_path / "res", bootstrap=200, claims_path=claims)
    by = {d["name"]: d for d in out["doses"]}
    assert by[over]["criterion"]["met"]
    assert set(by[over]["criterion"]["primary_tasks_ece_up_overconfident"]) == {
        "arc_easy",
        "arc_challenge",
    }
    assert not by[same]["criterion"]["met"]
    assert by[same]["heldout"]["token_gap"]["delta"] == pytest.approx(0.0)
    assert out["selected_for_claim2"]["name"] == over
    assert "not met" in (tmp_path / "res/tables.md").read_text()
    assert (tmp_path / "res/samples/base__trained.jsonl.gz").exists()
    assert (tmp_path / "res/reliability_arc_easy.png").stat().st_size > 1000
    recs = json.loads(claims.read_text())
    assert {r["claim"] for r in recs} == {"control"} and all("ci95" in r for r in recs)


def test_claim2_report_verdicts_and_missing_seeds(tmp_path: Path) -> None:
    import claim2_report as R2
    from sft_calibration import SFTRun

    work = tmp_path / "w"

    def ev(eps, seed, sharp):
        name = SFTRun(eps, seed, lr=8e-5, epochs=3).name(8e-5)
        path = work / f"evals/{name}__trained/samples.jsonl"
        _samples(path, 120, sharp, tasks=R2.PRIMARY + R2.SECONDARY)

    for s in (1, 2, 3):
        ev(0.0, s, 2.5)  # over-confident eps 0
        ev(0.1, s, 1.0 + 0.05 * s)  # smoothed: calibrated again, same answers
    ev(0.2, 1, 1.0)  # one seed only
    # A run trained here: its training records are committed beside its evaluations (the
    # next session's stage restores the run from them and must not train it again).
    trained = work / "runs" / SFTRun(0.2, 1, lr=8e-5, epochs=3).name(8e-5)
    trained.mkdir(parents=True)
    for f in ("done.json", "metrics.jsonl", "command.txt"):
        (trained / f).write_text("{}\n")
    claims = tmp_path / "claims.json"
    out = R2.write_report(work, tmp_path / "res", bootstrap=100, claims_path=claims)
    kept = tmp_path / "res/records/runs" / trained.name
    assert sorted(p.name for p in kept.iterdir()) == ["command.txt", "done.json", "metrics.jsonl"]
    e1 = out["eps"]["0.1"]
    assert e1["seeds"] == [1, 2, 3] and e1["verdict"] == "reproduced"
    assert e1["primary_mean"]["ece"]["ci95"][1] < 0
    assert e1["primary_mean"]["accuracy"]["delta"] == pytest.approx(0.0, abs=1e-12)
    e2 = out["eps"]["0.2"]
    assert e2["verdict"] is None and e2["missing"] == ["seed 2", "seed 3"]
    assert out["eps"]["0.05"]["seeds"] == [] and out["eps"]["0.05"]["verdict"] is None
    text = (tmp_path / "res/tables.md").read_text()
    assert "eps 0.1: **reproduced** (ECE change [" in text and "missing: seed 2, seed 3" in text
    for png in ("claim2_changes.png", "reliability_primary.png"):
        assert (tmp_path / "res" / png).stat().st_size > 1000, png
    assert not list((tmp_path / "res").glob("*.svg"))
    recs = json.loads(claims.read_text())
    assert any(r["claim"] == "2" and r["verdict"].startswith("incomplete") for r in recs)


def test_claim2_verdict_rules() -> None:
    import claim2_report as R2

    acc_ok = {"ci95": [-0.005, 0.01]}
    assert R2.verdict({"ci95": [-0.03, -0.01]}, acc_ok) == "reproduced"
    assert R2.verdict({"ci95": [-0.03, -0.01]}, {"ci95": [-0.02, 0.0]}) == "inconclusive"
    assert R2.verdict({"ci95": [-0.004, 0.02]}, acc_ok) == "not reproduced"
    assert R2.verdict({"ci95": [-0.03, 0.02]}, {"ci95": [-0.05, -0.02]}) == "not reproduced"
    assert R2.verdict({"ci95": [-0.03, 0.02]}, acc_ok) == "inconclusive"


def test_claim2_report_keeps_an_earlier_heldout_pair_whose_files_are_gone(tmp_path: Path) -> None:
    import claim2_report as R2
    from sft_calibration import SFTRun

    work, res = tmp_path / "w", tmp_path / "res"
    names = {e: SFTRun(e, 1, lr=8e-5, epochs=3).name(8e-5) for e in (0.0, 0.1)}
    for e, sharp in ((0.0, 2.5), (0.1, 1.0)):
        _samples(work / f"evals/{names[e]}__trained/samples.jsonl", 80, sharp,
                 tasks=R2.PRIMARY + R2.SECONDARY)  # fmt: skip
    _heldout(work / f"runs/{names[0.0]}/heldout.json", 0.70, 0.50)
    _heldout(work / f"runs/{names[0.1]}/heldout.json", 0.55, 0.50)
    claims = tmp_path / "claims.json"
    first = R2.write_report(work, res, bootstrap=50, seeds=(1,), claims_path=claims)
    pair = first["eps"]["0.1"]["heldout"]["1"]
    assert pair["token_gap"]["delta"] < 0
    # The next session's work folder is restored without those files (as before session 12).
    for e in (0.0, 0.1):
        (work / f"runs/{names[e]}/heldout.json").unlink()
        (work / f"runs/{names[e]}/restored_from.txt").write_text("x\n")
    again = R2.write_report(work, res, bootstrap=50, seeds=(1,), claims_path=claims)
    kept = again["eps"]["0.1"]["heldout"]["1"]
    assert kept.pop("from_earlier_report") is True and kept == pair
    assert "| 0.1 | 1 (a) |" in (res / "tables.md").read_text()
    # Without an earlier report the pair is named missing, not made up.
    (res / "results.json").unlink()
    last = R2.write_report(work, res, bootstrap=50, seeds=(1,), claims_path=claims)
    assert last["eps"]["0.1"]["heldout"]["1"] == {"missing": "neither held-out file was kept"}


def test_committed_run_records_are_not_git_ignored() -> None:
    """The training records (held-out files) of a claim's runs are committed evidence; the
    work folders' `runs/` ignore rule once matched them too and they were lost."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs the git checkout")
    rec = "experiments/results/sft_claim2/records/runs/r/heldout.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", rec], cwd=root).returncode == 0
    assert not ignored
    assert subprocess.run(["git", "check-ignore", "-q", "runs/demo/x"], cwd=root).returncode == 0


def test_claim2_verdict_reasons_name_the_failing_interval() -> None:
    import claim2_report as R2

    def iv(lo, hi):
        return {"ci95": [lo, hi]}

    # eps 0.1's case in session 13: ECE clearly down, accuracy straddling the margin.
    why = R2.verdict_reason(iv(-0.040, -0.018), iv(-0.014, 0.001))
    assert R2.verdict(iv(-0.040, -0.018), iv(-0.014, 0.001)) == "inconclusive"
    assert why == "accuracy change [-0.014, +0.001] crosses the -0.01 margin"
    assert "reaches 0" in R2.verdict_reason(iv(-0.02, 0.01), iv(-0.005, 0.01))
    assert "inferior" in R2.verdict_reason(iv(-0.04, -0.02), iv(-0.04, -0.02))
    assert "no reduction" in R2.verdict_reason(iv(-0.001, 0.01), iv(-0.005, 0.005))
    assert R2.verdict_reason(iv(-0.04, -0.02), iv(-0.005, 0.005)).startswith("ECE change")
