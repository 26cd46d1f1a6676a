"""``calibrated-lm metrics``: outputs, the synthetic example, and one-sentence errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from calibrated_lm.calibration import fit_temperature, summarize
from calibrated_lm.calibration.example import TAU
from calibrated_lm.calibration.samples import read_samples
from calibrated_lm.cli import main


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("metrics")
    path = out / "example.jsonl"
    rc = main(["metrics", "--example", str(path), "--output", str(out), "--bootstrap", "50"])
    return rc, out, path


def test_example_writes_summary_table_and_diagrams(example_run, capsys):
    rc, out, path = example_run
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    names = ["synthetic_4choice", "synthetic_3to5choice", "all"]
    assert list(summary["tasks"]) == names
    assert summary["protocol"]["bootstrap"] == 50
    assert summary["protocol"]["files"] == [str(path)]
    samples = read_samples([path])
    for name in names[:2]:
        t = samples[name]
        expected = summarize(t.choice_scores, t.labels, bootstrap=50)
        got = summary["tasks"][name]
        for key in ("n", "accuracy", "ece", "ece_ci95", "rms_ce", "mce", "brier", "nll"):
            assert got[key] == pytest.approx(expected[key]), key
    assert summary["tasks"]["all"]["n"] == sum(t.n for t in samples.values())
    for stem in ("synthetic_4choice", "synthetic_3to5choice", "all", "tasks_overlaid"):
        assert (out / f"reliability_{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (out / f"reliability_{stem}.svg").read_text()[:2000]


def test_example_is_over_confident_as_simulated(example_run):
    _, out, path = example_run
    tasks = json.loads((out / "summary.json").read_text())["tasks"]
    for s in tasks.values():
        assert s["overconfidence"] > 0.1 and s["ece_ci95"][0] > 0.1
    # The simulation divides calibrated logits by tau: scaling recovers T near 1 / tau.
    first = json.loads(path.read_text().splitlines()[0])
    assert first["prompt"].startswith("[synthetic]") and "not real model output" in first["prompt"]
    t = read_samples([path])["synthetic_4choice"]
    assert fit_temperature(t.choice_scores, t.labels) == pytest.approx(1 / TAU, rel=0.15)


def test_table_is_printed(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"task": "toy", "id": i, "choice_logprobs": [-1.0, -1.0 - i / 10], "label": 0}
            )
            + "\n"
            for i in range(20)
        )
    )
    assert main(["metrics", str(path), "--output", str(tmp_path / "o"), "--bootstrap", "0"]) == 0
    text = capsys.readouterr().out
    header, _, row = text.splitlines()[:3]
    assert header.split()[:4] == ["task", "n", "acc", "conf"]
    assert row.split()[:3] == ["toy", "20", "1.000"]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["tasks"]["toy"]["ece_ci95"] is None
    assert summary["tasks"]["all"]["n"] == 20


def _bad_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"task": "t", "id": 0, "choice_logprobs": [-1.0, -2.0], "label": 0}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"id": 1, "label": 5}) + "\n")
    return path


def test_bad_file_is_one_sentence_with_file_and_line(tmp_path, capsys):
    path = _bad_file(tmp_path)
    assert main(["metrics", str(path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}:2: label 5 is outside the 2 choices (0-based)\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["metrics"], "give at least one samples FILE"),
        (["metrics", "nope.jsonl"], "nope.jsonl: no such file"),
        (["metrics", "x.jsonl", "--n-bins", "0"], "--n-bins must be from 1 to 1000"),
        (
            ["metrics", "x.jsonl", "--bootstrap", "-3"],
            "--bootstrap must be 0 (no intervals) or at least 20",
        ),
    ],
)
def test_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_entry_point_prints_no_traceback(tmp_path):
    path = _bad_file(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, "-m", "calibrated_lm.cli", "metrics", str(path), "--output", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {path}:2: label 5 is outside the 2 choices (0-based)"


def test_chars_normalization_from_the_command(tmp_path):
    path = tmp_path / "s.jsonl"
    rows = [
        {"task": "toy", "id": i, "choice_logprobs": [-4.0, -6.0], "choice_char_lengths": [2, 6],
         "label": 1}
        for i in range(5)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    args = ["metrics", str(path), "--output", str(out), "--bootstrap", "0", "--n-bins", "5"]
    assert main([*args, "--normalization", "chars"]) == 0
    chars = json.loads((out / "summary.json").read_text())["tasks"]["toy"]
    assert chars["accuracy"] == 1.0 and chars["mean_confidence"] == pytest.approx(np.e / (1 + np.e))
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["tasks"]["toy"]["accuracy"] == 0.0


def test_example_never_replaces_an_existing_file(tmp_path, capsys):
    """--example onto an evaluation's samples (or any other file) refuses and leaves it; onto
    an earlier example of the same seed it reuses that file."""
    samples = tmp_path / "samples.jsonl"
    text = '{"task": "t", "id": 0, "choice_logprobs": [-1.0, -2.0], "label": 0}\n'
    samples.write_text(text)
    rc = main(["metrics", "--example", str(samples), "--output", str(tmp_path / "m")])
    assert rc == 2 and samples.read_text() == text
    err = capsys.readouterr().err
    assert "exists and is not the example file" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    example = tmp_path / "example.jsonl"
    args = ["metrics", "--example", str(example), "--output", str(tmp_path / "m2")]
    assert main([*args, "--bootstrap", "0"]) == 0
    first = example.read_bytes()
    assert main([*args, "--bootstrap", "0"]) == 0 and example.read_bytes() == first


def test_metrics_refuses_to_write_into_an_eval_folder(tmp_path, capsys):
    """eval's folder (run.json beside its summary): metrics would replace the summary and
    diagrams under eval's report.md, so it refuses before writing anything."""
    folder = tmp_path / "eval_run"
    folder.mkdir()
    (folder / "run.json").write_text("{}")
    (folder / "summary.json").write_text('{"eval": true}')
    path = tmp_path / "s.jsonl"
    path.write_text('{"task": "t", "id": 0, "choice_logprobs": [-1.0, -2.0], "label": 0}\n')
    assert main(["metrics", str(path), "--output", str(folder)]) == 2
    assert "holds a calibrated-lm eval run" in capsys.readouterr().err
    assert (folder / "summary.json").read_text() == '{"eval": true}'
    assert sorted(p.name for p in folder.iterdir()) == ["run.json", "summary.json"]


def test_metrics_keeps_another_commands_summary_and_reruns_over_its_own(tmp_path, capsys):
    """A capacity result (or any summary.json metrics did not write, unreadable ones too) is
    refused and left as it was; metrics' own summary is replaced by a rerun."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"task": "t", "id": 0, "choice_logprobs": [-1.0, -2.0], "label": 0}\n')
    for i, text in enumerate(['{"reach_ls": [], "model": "m"}', "{not json"]):
        folder = tmp_path / f"other{i}"
        folder.mkdir()
        (folder / "summary.json").write_text(text)
        assert main(["metrics", str(path), "--output", str(folder)]) == 2
        assert "not a metrics summary" in capsys.readouterr().err
        assert (folder / "summary.json").read_text() == text
        assert [p.name for p in folder.iterdir()] == ["summary.json"]
    own = tmp_path / "own"
    assert main(["metrics", str(path), "--output", str(own)]) == 0
    assert main(["metrics", str(path), "--output", str(own), "--n-bins", "5"]) == 0


def test_bins_and_draws_out_of_range_are_one_sentence(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    path.write_text('{"task": "t", "id": 0, "choice_logprobs": [-1.0, -2.0], "label": 0}\n')
    for opt, value, want in [
        ("--n-bins", "1000000", "--n-bins must be from 1 to 1000"),
        ("--bootstrap", "1", "--bootstrap must be 0 (no intervals) or at least 20"),
    ]:
        out = tmp_path / f"out{opt}"
        assert main(["metrics", str(path), "--output", str(out), opt, value]) == 2
        assert want in capsys.readouterr().err and not out.exists()


def test_a_rerun_removes_the_diagrams_of_tasks_it_no_longer_has(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    rows = [{"task": t, "id": i, "choice_logprobs": [-1.0, -2.0], "label": i % 2}
            for t in ("alpha", "beta") for i in range(4)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["metrics", str(path), "--output", str(out), "--bootstrap", "0"]) == 0
    assert (out / "reliability_beta.png").exists()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task"] == "alpha"))
    assert main(["metrics", str(path), "--output", str(out), "--bootstrap", "0"]) == 0
    assert "removed" in capsys.readouterr().out
    left = sorted(p.name for p in out.glob("reliability_*"))
    assert left == ["reliability_alpha.png", "reliability_alpha.svg"]
