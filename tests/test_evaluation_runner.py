"""eval end to end on a tiny model: outputs, resume after a crash, refusals that keep data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_eval import eval_config
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.runner import EvalConfig, run_eval

WORDS = ["carbon dioxide", "water", "the sun", "Paris", "France", "a star", "accuracy"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    model = build_tiny_lm(root / "model", chat_template=True)
    task = root / "quiz.jsonl"
    lines = []
    for i in range(23):
        k = 2 + i % 4  # 2 to 5 choices: variable choice counts everywhere
        choices = [WORDS[(i + j) % len(WORDS)] for j in range(k)]
        lines.append(
            json.dumps(
                {
                    "context": f"Question {i}: which one?\nAnswer:",
                    "choices": choices,
                    "label": i % k,
                    "id": f"q{i}",
                }
            )
        )
    task.write_text("\n".join(lines) + "\n")
    return model, task


def _cfg(setup, out: Path, **kw) -> EvalConfig:
    model, task = setup
    return eval_config(model, task, out, **{"bootstrap": 50, **kw})


def _records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_outputs_and_resume_after_crash(setup, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run_eval(_cfg(setup, out))
    full = _records(out / "samples.jsonl")
    assert len(full) == 23
    saved = json.loads((out / "summary.json").read_text())
    assert saved["tasks"]["quiz"]["n"] == 23 and "ece_ci95" in saved["tasks"]["quiz"]
    assert saved["protocol"]["chat_template_used"] is False
    assert saved["protocol"]["model"] == str(setup[0])
    assert (out / "reliability_quiz.png").stat().st_size > 1000
    assert "| quiz | 23 |" in (out / "report.md").read_text()
    assert summary["tasks"]["quiz"]["accuracy"] == pytest.approx(
        sum(
            max(range(len(r["choice_logprobs"])), key=r["choice_logprobs"].__getitem__)
            == r["label"]
            for r in full.values()
        )
        / 23
    )
    # Simulate a crash: 10 records kept, the 11th cut mid-line.
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:10]) + lines[10][:25])
    run_eval(_cfg(setup, out))
    text = (out / "samples.jsonl").read_text()
    again = [json.loads(x) for x in text.splitlines()]
    assert len(again) == 23 and len({r["id"] for r in again}) == 23  # none lost, none duplicated
    for r in again:
        assert r["choice_logprobs"] == pytest.approx(full[r["id"]]["choice_logprobs"], abs=1e-5)
    # Nothing left to do: a rerun scores zero questions and rewrites the same summary.
    third = run_eval(_cfg(setup, out))
    assert third["protocol"]["timing"]["questions_scored_this_run"] == 0
    assert third["tasks"]["quiz"]["ece"] == pytest.approx(summary["tasks"]["quiz"]["ece"])


def test_batch_size_does_not_change_scores(setup, tmp_path: Path) -> None:
    run_eval(_cfg(setup, tmp_path / "a", batch_size=1))
    run_eval(_cfg(setup, tmp_path / "b", batch_size="auto"))
    a, b = _records(tmp_path / "a/samples.jsonl"), _records(tmp_path / "b/samples.jsonl")
    for k in a:
        assert a[k]["choice_logprobs"] == pytest.approx(b[k]["choice_logprobs"], abs=2e-5)


def test_refusals_keep_results(setup, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_eval(_cfg(setup, out, chat_template="on"))
    before = (out / "samples.jsonl").read_bytes()
    assert json.loads(before.splitlines()[0])["prompt"].startswith("<|endoftext|>user\n")
    with pytest.raises(UserError, match="different protocol.*chat_template_used"):
        run_eval(_cfg(setup, out, chat_template="off"))
    lines = before.splitlines(keepends=True)
    (out / "samples.jsonl").write_bytes(b"".join(lines[:3]) + b"{oops\n" + b"".join(lines[3:]))
    with pytest.raises(UserError, match=r"samples.jsonl:4: invalid JSON .*: a damaged line"):
        run_eval(_cfg(setup, out, chat_template="on"))
    assert (out / "samples.jsonl").read_bytes().count(b"\n") == 24  # nothing deleted
    with pytest.raises(UserError, match="model path .*missing.gguf does not exist"):
        run_eval(_cfg(setup, tmp_path / "x", model=str(tmp_path / "missing.gguf")))


def test_out_of_memory_backs_off_or_suggests_smaller_batch(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from calibrated_lm.evaluation import scoring

    real = scoring.score_items

    def tight(model, encoder, items, *, batch_size, **kw):
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, encoder, items, batch_size=batch_size, **kw)

    monkeypatch.setattr(scoring, "score_items", tight)
    summary = run_eval(_cfg(setup, tmp_path / "auto", batch_size="auto"))
    assert summary["protocol"]["timing"]["batch_size"] == 2
    assert summary["tasks"]["quiz"]["n"] == 23
    with pytest.raises(UserError, match=r"out of memory at batch size 4.*--batch-size \(e.g. 2\)"):
        run_eval(_cfg(setup, tmp_path / "fixed", batch_size=4))


def test_bad_task_file_fails_before_the_model_loads(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"context": "Q?", "choices": ["a", "b"], "label": 0})
        + "\n"
        + json.dumps({"context": "Q?", "choices": ["a"], "label": 0})
        + "\n"
    )
    out = tmp_path / "out"
    # The model name is never resolved: data errors come first, and nothing is created.
    cfg = EvalConfig(model="no-such-model", tasks=[str(bad)], output=str(out), progress=False)
    with pytest.raises(UserError, match=r"bad\.jsonl:2: needs at least 2 choices"):
        run_eval(cfg)
    assert not out.exists()


def test_compare_scores_the_questions_the_summary_covers(setup, tmp_path: Path) -> None:
    """Review of 2026-12-07: after a run of 23 questions and a rerun with --limit 9 into the
    same folder, the summary covered 9 but compare scored all 23 the journal keeps."""
    from calibrated_lm.evaluation.compare import compare_runs

    out = tmp_path / "run"
    run_eval(_cfg(setup, out))
    small = run_eval(_cfg(setup, out, limit=9))
    assert small["tasks"]["quiz"]["n"] == 9
    assert len((out / "samples.jsonl").read_text().splitlines()) == 23  # kept for reuse
    kept = json.loads((out / "questions.json").read_text())["questions"]["quiz"]
    assert len(kept) == 9
    result = compare_runs([out], tmp_path / "cmp", bootstrap=0)
    (only,) = result["tasks"]["quiz"]["runs"].values()
    assert only["n"] == 9
    assert only["accuracy"] == pytest.approx(small["tasks"]["quiz"]["accuracy"])
    assert only["ece"] == pytest.approx(small["tasks"]["quiz"]["ece"])
    # A folder from before questions.json: all its questions, with a warning that says so.
    (out / "questions.json").unlink()
    old = compare_runs([out], tmp_path / "cmp_old", bootstrap=0)
    assert [r["n"] for r in old["tasks"]["quiz"]["runs"].values()] == [23]
    assert any("predates questions.json" in w for w in old["warnings"])
