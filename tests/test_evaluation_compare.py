"""compare: overlaid diagrams, table with CIs, temperature fitted on the validation split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibrated_lm.calibration import fit_temperature
from calibrated_lm.calibration.samples import read_sample_records
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.compare import compare_runs


def _write(path: Path, scores: np.ndarray, labels: np.ndarray, task: str = "quiz") -> None:
    with path.open("w") as fh:
        for i, (s, y) in enumerate(zip(scores, labels)):
            rec = {
                "task": task,
                "id": str(i),
                "choice_logprobs": s.tolist(),
                "label": int(y),
                "choice_char_lengths": [3] * len(s),
            }
            fh.write(json.dumps(rec) + "\n")


def _run(folder: Path, sharpness: float, seed: int, with_val: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    folder.mkdir()

    def draw(n):
        y = rng.integers(0, 4, n)
        s = rng.normal(size=(n, 4))
        s[np.arange(n), y] += 1.0
        return s * sharpness, y

    s, y = draw(300)
    _write(folder / "samples.jsonl", s, y)
    (folder / "summary.json").write_text(json.dumps({"protocol": {"model": folder.name}}))
    if with_val:
        vs, vy = draw(200)
        _write(folder / "samples_validation.jsonl", vs, vy)
        return fit_temperature(vs, vy)
    return None


def test_compare_fits_temperature_on_validation(tmp_path: Path) -> None:
    t_sharp = _run(tmp_path / "sharp", 4.0, 0, True)
    _run(tmp_path / "base", 1.0, 1, False)
    out = tmp_path / "cmp"
    result = compare_runs([tmp_path / "sharp", tmp_path / "base"], out, bootstrap=30)
    rows = result["tasks"]["quiz"]["runs"]
    sharp, base = rows["sharp (sharp)"], rows["base (base)"]
    assert sharp["temperature"] == pytest.approx(t_sharp)
    assert sharp["temperature"] > 2.0  # over-sharp logits need T > 1
    assert sharp["ece_after_T"] < sharp["ece"]  # scaling fitted on held-out data helps here
    assert "temperature" not in base
    assert len(sharp["ece_ci95"]) == 2
    assert (out / "compare_quiz.png").stat().st_size > 1000
    md = (out / "compare.md").read_text()
    assert "| base (base) | 300 |" in md and "(n=200)" in md


def _same_questions(folder: Path, scores: np.ndarray, y: np.ndarray, keep: int | None = None):
    folder.mkdir()
    n = len(y) if keep is None else keep
    _write(folder / "samples.jsonl", scores[:n], y[:n])


def test_compare_reports_paired_differences_on_shared_questions(tmp_path: Path) -> None:
    from calibrated_lm.calibration.paired import paired_bootstrap
    from calibrated_lm.evaluation.report import record_probabilities

    rng = np.random.default_rng(7)
    y = rng.integers(0, 4, 200)
    s = rng.normal(size=(200, 4))
    s[np.arange(200), y] += 1.0
    _same_questions(tmp_path / "ref", s, y)
    _same_questions(tmp_path / "sharp", s * 3, y, keep=120)  # a subset of the same questions
    out = tmp_path / "cmp"
    result = compare_runs([tmp_path / "ref", tmp_path / "sharp"], out, bootstrap=100)
    assert result["reference"] == "ref"  # no summary.json: the folder name
    (warning,) = result["warnings"]
    assert "different questions" in warning and "n=200" in warning and "n=120" in warning
    rows = result["tasks"]["quiz"]["runs"]
    paired = next(e for label, e in rows.items() if label.startswith("sharp"))["paired"]
    assert paired["n"] == 120
    ref = read_sample_records(tmp_path / "ref/samples.jsonl")
    sh = read_sample_records(tmp_path / "sharp/samples.jsonl")
    pa, yy = record_probabilities(ref[:120], "none")
    pb, _ = record_probabilities(sh, "none")
    want = paired_bootstrap(pa, pb, yy, draws=100)
    assert paired["ece"]["delta"] == pytest.approx(want["ece"]["delta"])
    assert paired["ece"]["delta"] > 0 and paired["ece"]["ci95"][0] > 0  # sharper: less calibrated
    md = (out / "compare.md").read_text()
    assert "**Warning**" in md and "| sharp" in md and "shared n" in md


def test_compare_refuses_an_empty_run(tmp_path: Path) -> None:
    from calibrated_lm.errors import UserError

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/samples.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no scored question"):
        compare_runs([tmp_path / "empty"], tmp_path / "cmp")


def test_compare_reads_lm_eval_log_samples_folders(tmp_path: Path) -> None:
    """Two lm-evaluation-harness --output_path folders (samples in a per-model sub-folder):
    paired on doc_id, the differences those of the harness's own scores; MMLU subtasks pooled."""
    from test_calibration_samples import _arc_docs, write_lm_eval_samples

    from calibrated_lm.calibration.paired import paired_bootstrap

    docs = _arc_docs(150, seed=3)
    sharp = [{**d, "lls": [v * 2.5 for v in d["lls"]]} for d in docs]
    stamp = "2026-12-02T05-00-00.000000"
    for name, ds in (("a", docs), ("b", sharp)):
        (tmp_path / name / "model__x").mkdir(parents=True)
        write_lm_eval_samples(tmp_path / name / "model__x" / f"samples_arc_easy_{stamp}.jsonl", ds)
        write_lm_eval_samples(
            tmp_path / name / "model__x" / f"samples_mmlu_anatomy_{stamp}.jsonl", ds[:40]
        )
    result = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp", bootstrap=50)
    assert result["warnings"] == []  # the same questions in both
    rows = result["tasks"]["arc_easy"]["runs"]
    paired = next(e for label, e in rows.items() if label.startswith("b"))["paired"]
    assert paired["n"] == 150

    def probs(ds):
        p = np.zeros((len(ds), 5))
        for i, d in enumerate(ds):
            s = np.array(d["lls"])
            e = np.exp(s - s.max())
            p[i, : len(s)] = e / e.sum()
        return p

    y = np.array([d["gold_index"] for d in docs])
    want = paired_bootstrap(probs(docs), probs(sharp), y, draws=50)
    assert paired["accuracy"]["delta"] == pytest.approx(0.0)  # scaling keeps every argmax
    assert paired["ece"]["delta"] == pytest.approx(want["ece"]["delta"])
    # The same questions: each side of a difference is the number of the per-run table.
    ref_row = next(e for label, e in rows.items() if label.startswith("a"))
    other = next(e for label, e in rows.items() if label.startswith("b"))
    for m in ("accuracy", "ece", "rms_ce"):
        assert paired[m]["a"] == pytest.approx(ref_row[m], abs=1e-12)
        assert paired[m]["b"] == pytest.approx(other[m], abs=1e-12)
    assert paired["ece"]["verdict"] == "worse" and paired["ece"]["direction"] == "lower"
    assert paired["mean_confidence"]["verdict"] is None  # no better direction
    assert "mmlu" in result["tasks"]  # mmlu_<subject> files pooled into mmlu

    # the same task twice in one folder is ambiguous: refused with the file names
    write_lm_eval_samples(
        tmp_path / "a" / "model__x" / "samples_arc_easy_2026-12-01T00-00-00.jsonl", docs
    )
    with pytest.raises(UserError, match="2 lm-eval sample files of task arc_easy"):
        compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp2")
    with pytest.raises(UserError, match="no lm-eval samples_<task>_<date>.jsonl"):
        compare_runs([tmp_path / "cmp"], tmp_path / "cmp3")


def test_compare_diagrams_name_the_normalisation(tmp_path: Path, monkeypatch) -> None:
    """Issue 14 item 6: n and the normalisation in every diagram's title, compare's too."""
    import calibrated_lm.calibration as calibration

    seen = []
    real = calibration.reliability_diagram

    def spy(series, path_stem, **kwargs):
        seen.append(kwargs)
        return real(series, path_stem, **kwargs)

    monkeypatch.setattr(calibration, "reliability_diagram", spy)
    _run(tmp_path / "a", 1.0, 0, False)
    _run(tmp_path / "b", 2.0, 1, False)
    compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp", bootstrap=20,
                 normalization="chars")  # fmt: skip
    assert [k["normalization"] for k in seen] == ["chars"]


def test_a_samples_file_given_for_a_run_folder_is_named(tmp_path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text("{}\n")
    with pytest.raises(UserError, match="is a file; compare takes eval run folders"):
        compare_runs([path, tmp_path / "other"], tmp_path / "out")


def test_no_bootstrap_gives_differences_without_intervals_or_verdicts(tmp_path: Path) -> None:
    """--bootstrap 0 used to resample once and print that single draw as a "95% interval",
    with better/worse verdicts from it."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 100)
    s = rng.normal(size=(100, 4))
    _same_questions(tmp_path / "ref", s, y)
    _same_questions(tmp_path / "sharp", s * 3, y)
    out = tmp_path / "cmp"
    result = compare_runs([tmp_path / "ref", tmp_path / "sharp"], out, bootstrap=0)
    paired = next(e for k, e in result["tasks"]["quiz"]["runs"].items() if k != "ref")["paired"]
    assert paired["n"] == 100 and paired["ece"]["delta"] != 0
    assert all(paired[m]["ci95"] is None and paired[m]["verdict"] is None for m in ("ece", "nll"))
    md = (out / "compare.md").read_text()
    assert "no intervals" in md and "95% bootstrap intervals" not in md
    (row,) = [line for line in md.splitlines() if line.startswith("| sharp") and "+" in line]
    assert "[" not in row and "worse" not in row and "better" not in row


@pytest.mark.parametrize("draws", [1, 19])
def test_too_few_draws_for_an_interval_are_refused(tmp_path: Path, draws: int) -> None:
    _same_questions(tmp_path / "ref", np.zeros((4, 2)), np.zeros(4, dtype=int))
    with pytest.raises(UserError, match="--bootstrap must be 0 \\(no intervals\\) or at least 20"):
        compare_runs([tmp_path / "ref", tmp_path / "ref"], tmp_path / "cmp", bootstrap=draws)
    assert not (tmp_path / "cmp").exists()


def test_an_eval_folder_without_its_test_journal_is_not_read_as_lm_eval(tmp_path: Path) -> None:
    """Its samples_validation.jsonl matches lm-eval's samples_*.jsonl: it was read as the
    run's results of a task, without a word."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 50)
    s = rng.normal(size=(50, 4))
    _same_questions(tmp_path / "ref", s, y)
    run = tmp_path / "val_only"
    run.mkdir()
    _write(run / "samples_validation.jsonl", s, y)
    with pytest.raises(UserError, match="val_only is an eval run folder .* without its samples"):
        compare_runs([tmp_path / "ref", run], tmp_path / "cmp", bootstrap=20)


def test_an_unfinished_eval_is_compared_with_a_warning(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, 4, 40)
    s = rng.normal(size=(40, 4))
    _same_questions(tmp_path / "ref", s, y)
    _same_questions(tmp_path / "cut", s, y, keep=25)
    (tmp_path / "cut" / "run.json").write_text("{}")  # started, never wrote its summary
    result = compare_runs([tmp_path / "ref", tmp_path / "cut"], tmp_path / "cmp", bootstrap=20)
    assert any(w.startswith("cut: its eval has not finished") for w in result["warnings"])
    (tmp_path / "cut" / "summary.json").write_text(json.dumps({"protocol": {}}))
    again = compare_runs([tmp_path / "ref", tmp_path / "cut"], tmp_path / "cmp2", bootstrap=20)
    assert not any("has not finished" in w for w in again["warnings"])


def test_runs_scored_with_another_normalization_are_named(tmp_path: Path, capsys) -> None:
    from calibrated_lm.cli import main

    rng = np.random.default_rng(8)
    y = rng.integers(0, 4, 30)
    s = rng.normal(size=(30, 4))
    for name, norm in (("plain", "none"), ("perchar", "chars")):
        _same_questions(tmp_path / name, s, y)
        summary = {"protocol": {"normalization": norm}}
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "cmp"
    argv = ["compare", str(tmp_path / "plain"), str(tmp_path / "perchar"), "--output", str(out)]
    assert main([*argv, "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    assert "normalization: none (the reference's (plain))" in printed
    assert "warning: every run is compared with normalization none" in printed
    assert "perchar: chars" in printed
    assert "perchar: chars" in (out / "compare.md").read_text()
    # Chosen on the command line: said so, and the run that differs is still named.
    assert main([*argv, "--bootstrap", "20", "--normalization", "chars"]) == 0
    printed = capsys.readouterr().out
    assert "normalization: chars (--normalization)" in printed and "plain: none" in printed


def test_runs_with_no_task_in_common_are_warned_about(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    y = rng.integers(0, 4, 20)
    s = rng.normal(size=(20, 4))
    for name, task in (("a", "easy"), ("b", "hard")):
        (tmp_path / name).mkdir()
        _write(tmp_path / name / "samples.jsonl", s, y, task=task)
    result = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp", bootstrap=20)
    (w,) = result["warnings"]
    assert w.startswith("the runs share no task (a: easy; b: hard)")


def test_a_journal_that_is_a_folder_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "odd" / "samples.jsonl").mkdir(parents=True)
    with pytest.raises(UserError, match="samples.jsonl is not a file"):
        compare_runs([tmp_path / "odd"], tmp_path / "cmp", bootstrap=20)


def test_verdicts() -> None:
    from calibrated_lm.calibration.registry import get
    from calibrated_lm.evaluation.compare import verdict

    ece, acc = get("ece"), get("accuracy")
    assert verdict(ece, [0.01, 0.02]) == "worse" and verdict(acc, [0.01, 0.02]) == "better"
    assert verdict(ece, [-0.01, 0.02]) == "no clear difference"
    # Float rounding of the same scores: a consistent sign, a size far below any display.
    assert verdict(ece, [-3e-7, -1e-7]) == "no clear difference"
    assert verdict(ece, [-3e-6, -1e-6]) == "better"
    assert verdict(ece, None) is None


def test_a_rerun_removes_the_diagrams_of_tasks_it_no_longer_has(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    y = rng.integers(0, 4, 20)
    s = rng.normal(size=(20, 4))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        with (tmp_path / name / "samples.jsonl").open("w") as fh:
            for task in ("easy", "hard"):
                for i, (row, lab) in enumerate(zip(s, y)):
                    rec = {"task": task, "id": str(i), "choice_logprobs": row.tolist(),
                           "choice_char_lengths": [3] * len(row)}  # fmt: skip
                    fh.write(json.dumps({**rec, "label": int(lab)}) + "\n")
    out = tmp_path / "cmp"
    compare_runs([tmp_path / "a", tmp_path / "b"], out, bootstrap=20)
    assert (out / "compare_hard.png").exists()
    for name in ("a", "b"):
        _write(tmp_path / name / "samples.jsonl", s, y, task="easy")
    compare_runs([tmp_path / "a", tmp_path / "b"], out, bootstrap=20)
    assert sorted(p.name for p in out.glob("compare_*")) == ["compare_easy.png", "compare_easy.svg"]


def test_the_same_run_twice_is_refused(tmp_path: Path) -> None:
    _same_questions(tmp_path / "ref", np.zeros((4, 2)), np.zeros(4, dtype=int))
    with pytest.raises(UserError, match="is given twice"):
        compare_runs([tmp_path / "ref", tmp_path / "x" / ".." / "ref"], tmp_path / "cmp")


def test_samples_without_lengths_compare_unnormalised(tmp_path: Path) -> None:
    """The samples format needs no lengths unless a length normalisation asks for them; compare
    used to ask for character lengths even with normalization none."""
    rng = np.random.default_rng(11)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        rows = [{"task": "t", "id": str(i), "choice_logprobs": rng.normal(size=4).tolist(),
                 "label": i % 4} for i in range(30)]  # fmt: skip
        (tmp_path / name / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp", bootstrap=20)
    assert result["normalization"] == "none"
    assert result["tasks"]["t"]["runs"]["b"]["paired"]["n"] == 30
    with pytest.raises(UserError, match="samples.jsonl:1: --normalization chars needs choice"):
        compare_runs([tmp_path / "a"], tmp_path / "cmp2", bootstrap=20, normalization="chars")


def test_each_task_s_draws_are_counted_on_a_bar(tmp_path: Path, monkeypatch) -> None:
    from helpers_progress import recording_bars

    bars = recording_bars(monkeypatch)
    t_sharp = _run(tmp_path / "sharp", 4.0, 0, True)
    _run(tmp_path / "other", 1.0, 1, False)  # other gold answers: no paired difference
    scores = [r.choice_logprobs for r in read_sample_records(tmp_path / "sharp/samples.jsonl")]
    y = [r.label for r in read_sample_records(tmp_path / "sharp/samples.jsonl")]
    _same_questions(tmp_path / "base", np.array(scores) / t_sharp, np.array(y))
    runs = [tmp_path / "base", tmp_path / "sharp", tmp_path / "other"]
    compare_runs(runs, tmp_path / "cmp", bootstrap=40)
    (draws,) = [b for b in bars if b["desc"] == "quiz bootstrap"]
    # base's summary, sharp's before and after T, other's, and sharp - base: 5 x 40 draws;
    # other - base is counted as a pass but has none (its gold answers differ).
    assert draws == {"desc": "quiz bootstrap", "total": 240, "n": 200}
