"""Sample-file readers: our JSONL and lm-evaluation-harness --log_samples, with line-numbered errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from calibrated_lm.calibration import summarize
from calibrated_lm.calibration.samples import read_samples, task_groups
from calibrated_lm.errors import UserError


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_lm_eval_samples(path: Path, docs: list[dict]) -> list[dict]:
    """Write ``samples_<task>_<date>.jsonl`` exactly as lm-evaluation-harness 0.4.x does for a
    multiple_choice task (evaluator.py builds the record, EvaluationTracker sanitises it):
    per choice one loglikelihood request (context, target_delimiter + choice) whose response
    is the tuple (loglikelihood, is_greedy), stringified by ``sanitize_list``; ``target`` is
    ``str(doc_to_target(doc))``; acc / acc_norm are computed the harness's way."""
    records = []
    for doc_id, d in enumerate(docs):
        ctx, choices, lls = d["context"], d["choices"], d["lls"]
        greedy = [False] * len(lls)
        completion_len = np.array([float(len(c)) for c in choices])
        gold = d["gold_index"]
        record = {
            "doc_id": doc_id,
            "doc": d["doc"],
            "target": str(d["target"]),
            "arguments": {
                f"gen_args_{i}": {"arg_0": ctx, "arg_1": " " + c} for i, c in enumerate(choices)
            },
            "resps": [[[str(ll), str(g)]] for ll, g in zip(lls, greedy)],
            "filtered_resps": [[str(ll), str(g)] for ll, g in zip(lls, greedy)],
            "filter": "none",
            "metrics": ["acc", "acc_norm"],
            "doc_hash": _hash(json.dumps(d["doc"], indent=2, ensure_ascii=False)),
            "prompt_hash": _hash(ctx),
            "target_hash": _hash(str(d["target"])),
            "acc": 1.0 if int(np.argmax(lls)) == gold else 0.0,
            "acc_norm": 1.0 if int(np.argmax(np.array(lls) / completion_len)) == gold else 0.0,
        }
        records.append(record)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return records


def _arc_docs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        k = int(rng.integers(3, 6))
        texts = [f"answer text {'x' * int(rng.integers(1, 30))} {j}" for j in range(k)]
        labels = ["A", "B", "C", "D", "E"][:k]
        gold = int(rng.integers(0, k))
        lls = [round(float(v), 4) for v in -rng.uniform(2, 40, k)]
        docs.append(
            {
                "doc": {
                    "id": f"Mercury_{i}",
                    "question": f"Question {i}?",
                    "choices": {"text": texts, "label": labels},
                    "answerKey": labels[gold],
                },
                "context": f"Question: Question {i}?\nAnswer:",
                "choices": texts,
                "lls": lls,
                "target": gold,  # arc_easy.yaml: doc_to_target "{{choices.label.index(answerKey)}}"
                "gold_index": gold,
            }
        )
    return docs


def _mmlu_docs(subject: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        choices = [f"option {j} for {subject}" for j in range(4)]
        gold = int(rng.integers(0, 4))
        lls = [round(float(v), 4) for v in -rng.uniform(0.5, 6, 4)]
        docs.append(
            {
                "doc": {
                    "question": f"q{i}",
                    "subject": subject,
                    "choices": choices,
                    "answer": gold,
                },
                "context": f"The following are multiple choice questions about {subject}.\n\nq{i}",
                "choices": ["A", "B", "C", "D"],
                "lls": lls,
                "target": gold,  # doc_to_target: answer (int)
                "gold_index": gold,
            }
        )
    return docs


def test_lm_eval_samples_match_the_harness_acc_and_acc_norm(tmp_path):
    path = tmp_path / "samples_arc_easy_2024-06-01T10-11-12.123456.jsonl"
    records = write_lm_eval_samples(path, _arc_docs(120, seed=0))
    tasks = read_samples([path])
    assert list(tasks) == ["arc_easy"]
    t = tasks["arc_easy"]
    assert t.n == 120 and t.group is None
    assert t.ids[:3] == [0, 1, 2]
    assert t.choice_scores[0].tolist() == [float(x[0]) for x in records[0]["filtered_resps"]]
    raw = summarize(t.choice_scores, t.labels, bootstrap=0)
    assert raw["accuracy"] == pytest.approx(np.mean([r["acc"] for r in records]))
    # --normalization chars reproduces the harness's acc_norm (lengths without the delimiter).
    tasks = read_samples([path], normalization="chars")
    t = tasks["arc_easy"]
    norm = summarize(
        t.choice_scores, t.labels, choice_char_lengths=t.choice_char_lengths,
        normalization="chars", bootstrap=0,
    )  # fmt: skip
    assert norm["accuracy"] == pytest.approx(np.mean([r["acc_norm"] for r in records]))
    assert raw["accuracy"] != norm["accuracy"]  # the data make the two differ


def test_mmlu_subject_files_are_pooled_into_mmlu(tmp_path):
    a = tmp_path / "samples_mmlu_abstract_algebra_2024-06-01T10-11-12.123456.jsonl"
    b = tmp_path / "samples_mmlu_anatomy_2024-06-01T10-11-12.123456.jsonl"
    write_lm_eval_samples(a, _mmlu_docs("abstract_algebra", 30, seed=1))
    write_lm_eval_samples(b, _mmlu_docs("anatomy", 20, seed=2))
    tasks = read_samples([a, b])
    assert sorted(tasks) == ["mmlu_abstract_algebra", "mmlu_anatomy"]
    assert task_groups(tasks) == {"mmlu": ["mmlu_abstract_algebra", "mmlu_anatomy"]}
    assert tasks["mmlu_anatomy"].labels == [d["gold_index"] for d in _mmlu_docs("anatomy", 20, 2)]


def test_text_target_and_ambiguous_numeric_choices(tmp_path):
    docs = [
        # text target matched against the choices (harness: choices.index(gold))
        {"doc": {}, "context": "Capital?", "choices": ["Paris", "Rome"], "lls": [-1.0, -2.0],
         "target": "Rome", "gold_index": 1},
        # numeric choices: "2" could be index 2 or the text "2" (index 1); acc decides
        {"doc": {}, "context": "1+1?", "choices": ["1", "2", "3"], "lls": [-3.0, -1.0, -2.0],
         "target": "2", "gold_index": 1},
    ]  # fmt: skip
    path = tmp_path / "samples_toy_2024-01-01T00-00-00.000001.jsonl"
    write_lm_eval_samples(path, docs)
    assert read_samples([path])["toy"].labels == [1, 1]


def test_our_format_with_subjects_and_lengths_from_choices(tmp_path):
    path = tmp_path / "ours.jsonl"
    rows = [
        {"task": "arc_challenge", "id": "a1", "choice_logprobs": [-1.0, -2.0, -3.0], "label": 2,
         "choices": ["x", "yy", "zzz"]},
        {"task": "arc_challenge", "id": "a2", "choice_logprobs": [-1.0, -2.0], "label": 0,
         "choice_char_lengths": [4, 5]},
        {"task": "mmlu", "id": 1, "subject": "anatomy", "choice_logprobs": [-1, -2, -3, -4],
         "label": 1, "choice_char_lengths": [1, 1, 1, 1]},
        {"task": "mmlu", "id": 2, "subject": "virology", "choice_logprobs": [-1, -2, -3, -4],
         "label": 3, "choice_char_lengths": [1, 1, 1, 1]},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tasks = read_samples(path, normalization="chars")
    assert sorted(tasks) == ["arc_challenge", "mmlu_anatomy", "mmlu_virology"]
    assert tasks["arc_challenge"].labels == [2, 0]
    assert tasks["arc_challenge"].choice_char_lengths[0].tolist() == [1, 2, 3]
    assert task_groups(tasks) == {"mmlu": ["mmlu_anatomy", "mmlu_virology"]}
    assert tasks["mmlu_virology"].sources == [f"{path}:4"]


GOOD = {"task": "t", "id": 0, "choice_logprobs": [-1.0, -2.0], "label": 1}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, GOOD | {"id": 1}, '{"task": "t", "id": 2, "choice_lo'], r":3: invalid JSON"),
        ([GOOD, {"task": "t", "id": 1, "choice_logprobs": [-1.0]}], r':2: missing field "label"'),
        ([GOOD, GOOD | {"id": 1, "label": 2}], r":2: label 2 is outside the 2 choices"),
        ([GOOD, GOOD | {"id": 1, "label": "1"}], r':2: "label" must be an integer'),
        ([GOOD, GOOD | {"id": 1, "choice_logprobs": ["a", -1]}], r":2: .*only numbers"),
        ([GOOD, GOOD], r":2: duplicate id 0 in task 't' \(first at .*:1\)"),
        ([GOOD | {"id": 1}, GOOD | {"choice_char_lengths": [1]}], r":2: 1 choice lengths for 2"),
        ([{"question": "?"}], r":1: unrecognised samples format"),
        (["[1, 2]"], r":1: expected a JSON object"),
        ([], r"no samples \(the file is empty\)"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(UserError, match=message) as info:
        read_samples([path])
    assert str(info.value).startswith(str(path))


def test_chars_needs_lengths_and_missing_file(tmp_path):
    path = tmp_path / "ours.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(UserError, match=r"ours.jsonl:1: --normalization chars needs"):
        read_samples([path], normalization="chars")
    with pytest.raises(UserError, match="no such file"):
        read_samples([tmp_path / "missing.jsonl"])


def test_lm_eval_errors_are_line_numbered(tmp_path):
    path = tmp_path / "samples_arc_easy_2024-06-01T10-11-12.123456.jsonl"
    write_lm_eval_samples(path, _arc_docs(3, seed=0))
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["target"] = "7"
    rec["doc"] = {}
    lines[1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r":2: target '7' is outside the \d choices"):
        read_samples([path])


def test_pre_0_4_3_unsanitised_records_are_read(tmp_path):
    # Before lm-eval 0.4.3 responses were JSON numbers/booleans and arguments a list of pairs.
    rec = {
        "doc_id": 0, "doc": {"label": 1}, "target": 1,
        "arguments": [["ctx", " yes"], ["ctx", " no"]],
        "resps": [[[-2.5, False]], [[-0.5, True]]],
        "filtered_resps": [[-2.5, False], [-0.5, True]],
    }  # fmt: skip
    path = tmp_path / "samples_boolq_2024-01-01T00-00-00.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    t = read_samples([path], normalization="chars")["boolq"]
    assert t.choice_scores[0].tolist() == [-2.5, -0.5]
    assert t.labels == [1] and t.choice_char_lengths[0].tolist() == [3, 2]


def test_command_pools_mmlu_subjects(tmp_path):
    from calibrated_lm.cli import main

    a = tmp_path / "samples_mmlu_anatomy_2024-06-01T10-11-12.123456.jsonl"
    b = tmp_path / "samples_mmlu_virology_2024-06-01T10-11-12.123456.jsonl"
    c = tmp_path / "samples_arc_easy_2024-06-01T10-11-12.123456.jsonl"
    write_lm_eval_samples(a, _mmlu_docs("anatomy", 25, seed=3))
    write_lm_eval_samples(b, _mmlu_docs("virology", 15, seed=4))
    write_lm_eval_samples(c, _arc_docs(30, seed=5))
    out = tmp_path / "out"
    assert main(["metrics", str(a), str(b), str(c), "--output", str(out), "--bootstrap", "20"]) == 0
    tasks = json.loads((out / "summary.json").read_text())["tasks"]
    assert list(tasks) == ["mmlu_anatomy", "mmlu_virology", "arc_easy", "mmlu", "all"]
    assert tasks["mmlu"]["n"] == 40 and tasks["all"]["n"] == 70
    pooled = (25 * tasks["mmlu_anatomy"]["accuracy"] + 15 * tasks["mmlu_virology"]["accuracy"]) / 40
    assert tasks["mmlu"]["accuracy"] == pytest.approx(pooled)
    assert (out / "reliability_mmlu.png").exists()


def test_multiple_input_tasks_are_refused_with_a_reason(tmp_path):
    docs = [
        {"doc": {"sentence": "The trophy _ ..."}, "context": "The trophy", "choices": ["fit."] * 2,
         "lls": [-3.0, -2.0], "target": "fit.", "gold_index": 0},
    ]  # fmt: skip
    path = tmp_path / "samples_winogrande_2024-01-01T00-00-00.000001.jsonl"
    write_lm_eval_samples(path, docs)
    with pytest.raises(UserError, match=r":1: every choice has the same continuation"):
        read_samples([path])


def test_one_tasks_records_of_two_splits_are_not_pooled(tmp_path, capsys):
    from calibrated_lm.cli import main

    def rec(i, split):
        return {"task": "t", "id": i, "choice_logprobs": [-1.0, -2.0], "label": 0, "split": split}

    a, b = tmp_path / "samples.jsonl", tmp_path / "samples_validation.jsonl"
    a.write_text("".join(json.dumps(rec(i, "test")) + "\n" for i in range(3)))
    b.write_text("".join(json.dumps(rec(i + 3, "validation")) + "\n" for i in range(3)))
    out = tmp_path / "out"
    assert main(["metrics", str(a), str(b), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "task t has records of split test" in err and "samples_validation.jsonl:1" in err
    assert main(["metrics", str(a), "--output", str(out), "--bootstrap", "0"]) == 0


def test_a_summary_given_as_samples_says_so(tmp_path):
    from calibrated_lm.calibration.samples import read_sample_records
    from calibrated_lm.errors import UserError

    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"protocol": {"tool": "x"}, "tasks": {}}, indent=2))
    with pytest.raises(UserError, match="summary.json:1: .*one JSON document"):
        read_sample_records(path)
