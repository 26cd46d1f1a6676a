"""``calibrated-lm eval --uncovered skip``: the questions with a choice token outside the head
subset are left out (exactly those), counted per task in run.json's protocol, the summary, the
report and the terminal; ``skip`` without a subset, a task with no covered question and a
rerun with another ``--uncovered`` are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import run_cli
from helpers_quiz import WORDS, answer_token_ids, write_choice_sets
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.runner import EvalConfig, run_eval
from calibrated_lm.evaluation.scoring import Encoder, check_in_subset
from calibrated_lm.evaluation.tasks import build_items, resolve_tasks
from calibrated_lm.models import head_subset as hs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("uncovered")
    model_dir = build_tiny_lm(root / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    v = len(tok)
    answers = answer_token_ids(tok)
    others = {t for w in WORDS if w != "water" for t in tok(" " + w).input_ids}
    water = set(tok(" water").input_ids) - others
    assert water  # " water" has a token of its own (its 'w')
    # Every answer token but water's own: the questions offering "water" are uncovered.
    required = [t for t in answers if t not in water] + [tok.eos_token_id]
    counts = (np.arange(v) % 3 == 0).astype(float)
    counts[list(water)] = -1.0  # never picked as a frequent token either
    subset = hs.select_vocabulary(counts, v // 3, required=required)
    assert not set(subset.kept) & water
    hs.save(subset, root)
    sets = [[WORDS[0], WORDS[2]], [WORDS[1], WORDS[3]], [WORDS[3], WORDS[4], WORDS[0]],
            [WORDS[2], WORDS[1]], [WORDS[4], WORDS[0]], [WORDS[1], WORDS[2], WORDS[3]],
            [WORDS[3], WORDS[2]]]  # fmt: skip
    mixed = write_choice_sets(root / "mixed.jsonl", sets)
    only_water = write_choice_sets(root / "wet.jsonl", [[WORDS[1], WORDS[0]], [WORDS[2], WORDS[1]]])
    return dict(root=root, model=model_dir, tok=tok, subset=subset, file=root / hs.FILE,
                mixed=mixed, wet=only_water)  # fmt: skip


def _cfg(s, out: Path, tasks: list[Path], **kw) -> EvalConfig:
    base = dict(model=str(s["model"]), tasks=[",".join(str(t) for t in tasks)], output=out,
                bootstrap=20, progress=False, device="cpu", batch_size=4,
                head_subset=str(s["file"]))  # fmt: skip
    base.update(kw)
    return EvalConfig(**base)


def _uncovered_ids(s, task: Path) -> set[str]:
    """The oracle: the questions the error mode's own check refuses, one at a time."""
    enc = Encoder(tokenizer=s["tok"], add_bos=False, prefix_id=s["tok"].eos_token_id)
    (t,) = resolve_tasks(str(task))
    t.docs(None, None)
    out = set()
    for item in build_items(t, split=None, limit=None, num_fewshot=0, chat=None):
        try:
            check_in_subset([item], [enc.encode_pairs(item.requests)], s["subset"])
        except UserError:
            out.add(item.id)
    return out


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_skip_leaves_out_exactly_the_uncovered_questions_and_counts_them(setup, tmp_path):
    s = setup
    expected = _uncovered_ids(s, s["mixed"])
    assert expected == {"q1", "q3", "q5"}  # the questions offering "water"
    out = tmp_path / "run"
    summary = run_eval(_cfg(s, out, [s["mixed"]], uncovered="skip"))
    assert sorted(_ids(out / "samples.jsonl")) == sorted({f"q{i}" for i in range(7)} - expected)
    proto = summary["protocol"]
    assert proto["uncovered"] == "skip"
    assert proto["uncovered_questions"] == {
        "mixed": {"questions": 7, "left_out": 3, "share": round(3 / 7, 6), "split": "test"}
    }
    assert summary["tasks"]["mixed"]["n"] == 4
    assert json.loads((out / "run.json").read_text())["uncovered"] == "skip"
    on_disk = json.loads((out / "summary.json").read_text())["protocol"]
    assert on_disk["uncovered_questions"]["mixed"]["left_out"] == 3
    report = (out / "report.md").read_text()
    assert "mixed: 3 of 7 questions (42.9%) left out" in report
    # A rerun resumes: nothing to score, the same counts.
    again = run_eval(_cfg(s, out, [s["mixed"]], uncovered="skip"))
    assert again["protocol"]["timing"]["questions_scored_this_run"] == 0
    assert again["protocol"]["uncovered_questions"] == proto["uncovered_questions"]
    # The default still refuses them, naming one.
    with pytest.raises(UserError, match=r"mixed question q[135]: choice \d \('water'\)"):
        run_eval(_cfg(s, tmp_path / "strict", [s["mixed"]]))


def test_the_cli_prints_one_line_per_task(setup, tmp_path, capsys):
    from calibrated_lm.cli import main

    s = setup
    single = write_choice_sets(tmp_path / "dry.jsonl", [[WORDS[0], WORDS[2]], [WORDS[3], WORDS[4]]])
    code = main(
        ["eval", "--model", str(s["model"]), "--tasks", f"{s['mixed']},{single}", "--output",
         str(tmp_path / "cli"), "--bootstrap", "20", "--device", "cpu", "--no-progress",
         "--head-subset", str(s["file"]), "--uncovered", "skip"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "mixed: 3 of 7 questions (42.9%) left out" in printed
    assert "dry: 0 of 2 questions (0.0%) left out" in printed


def test_skip_without_a_subset_is_refused_before_loading(setup, tmp_path):
    s = setup
    out = tmp_path / "none"
    with pytest.raises(UserError, match="--uncovered skip .* but this run has none"):
        run_eval(_cfg(s, out, [s["mixed"]], head_subset=None, uncovered="skip"))
    assert not out.exists()
    code, err = run_cli(
        ["eval", "--model", str(s["model"]), "--tasks", str(s["mixed"]), "--output", str(out),
         "--device", "cpu", "--no-progress", "--uncovered", "skip"]
    )  # fmt: skip
    assert code == 2 and "but this run has none" in err
    with pytest.raises(UserError, match="--uncovered must be error or skip, not 'maybe'"):
        run_eval(_cfg(s, out, [s["mixed"]], uncovered="maybe"))
    # error is accepted without a subset (today's behaviour).
    run_eval(_cfg(s, out, [s["mixed"]], head_subset=None, uncovered="error"))
    assert "uncovered" not in json.loads((out / "run.json").read_text())


def test_a_task_with_no_covered_question_is_refused(setup, tmp_path):
    s = setup
    out = tmp_path / "wet"
    with pytest.raises(UserError, match=r"task wet \(test split\): all 2 questions have a choice"):
        run_eval(_cfg(s, out, [s["mixed"], s["wet"]], uncovered="skip"))
    assert not (out / "samples.jsonl").exists() or not (out / "samples.jsonl").read_text()
    assert not (out / "summary.json").exists()


def test_a_rerun_with_another_uncovered_mode_is_refused_before_loading(
    setup, tmp_path, monkeypatch
):
    s = setup
    covered = write_choice_sets(
        tmp_path / "dry.jsonl", [[WORDS[0], WORDS[2]], [WORDS[3], WORDS[4]]]
    )
    out = tmp_path / "run"
    run_eval(_cfg(s, out, [covered]))  # error mode, with a subset: recorded as such
    assert json.loads((out / "run.json").read_text())["uncovered"] == "error"
    import calibrated_lm.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "open_model", no_load)
    with pytest.raises(UserError, match="uncovered: 'error' -> 'skip'"):
        run_eval(_cfg(s, out, [covered], uncovered="skip"))
    monkeypatch.undo()
    # A folder of an earlier version, with a subset but no entry, counts as error.
    run = json.loads((out / "run.json").read_text())
    del run["uncovered"]
    (out / "run.json").write_text(json.dumps(run))
    run_eval(_cfg(s, out, [covered]))
    with pytest.raises(UserError, match="uncovered: 'error' -> 'skip'"):
        run_eval(_cfg(s, out, [covered], uncovered="skip"))
