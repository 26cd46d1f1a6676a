"""The lm-eval plugin: calibration metrics inside an lm-evaluation-harness run equal what
`calibrated-lm eval` reports for the same questions, prompts and model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_tiny_lm import build_tiny_lm

pytest.importorskip("lm_eval")

from calibrated_lm.cli import main  # noqa: E402
from calibrated_lm.integrations import lm_eval as plugin  # noqa: E402

TASK = """
task: qa_cal
class: !function calibrated_lm.integrations.lm_eval.CalibratedMultipleChoiceTask
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: ece
    aggregation: !function calibrated_lm.integrations.lm_eval.ece
    higher_is_better: false
  - metric: rms_ce
    aggregation: rms_ce
    higher_is_better: false
  - metric: smooth_ece
    aggregation: smooth_ece
    higher_is_better: false
  - metric: mean_confidence
    aggregation: mean_confidence
    higher_is_better: true
  - metric: ece_norm
    aggregation: ece_norm
    higher_is_better: false
"""


def test_lm_eval_run_reports_the_same_calibration_as_calibrated_lm_eval(tmp_path: Path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = build_tiny_lm(tmp_path / "tiny")
    rows = [
        {"context": f"Q{i}?", "choices": ["yes", "no", "maybe", "never"][: 2 + i % 3],
         "label": i % 2} for i in range(30)
    ]  # fmt: skip
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "qa_cal.yaml").write_text(TASK.format(data=data))
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model},dtype=float32",
        tasks=["qa_cal"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True,
        device="cpu",
        batch_size=4,
        num_fewshot=0,
    )
    theirs = res["results"]["qa_cal"]

    # The same questions through calibrated-lm (harness prompt, summed log-likelihoods).
    out = tmp_path / "ours"
    argv = ["eval", "--model", str(model), "--tasks", str(data), "--output", str(out),
            "--device", "cpu", "--bootstrap", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = next(iter(summary["tasks"].values()))
    assert theirs["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-12)
    for key, name in (("ece", "ece"), ("rms_ce", "rms_ce"), ("smooth_ece", "smooth_ece"),
                      ("mean_confidence", "mean_confidence")):  # fmt: skip
        assert theirs[f"{key},none"] == pytest.approx(ours[name], abs=1e-6), key

    # ece_norm: the per-question item holds ll / len(choice), as lm-eval's acc_norm divides.
    sample = res["samples"]["qa_cal"][0]
    lls = np.array([r[0] for r in sample["filtered_resps"]])
    lengths = np.array([len(c) for c in rows[sample["doc_id"]]["choices"]], dtype=float)
    gold, scores = sample["ece_norm"]
    assert gold == rows[sample["doc_id"]]["label"]
    np.testing.assert_allclose(scores, lls / lengths)
    items = [s["ece_norm"] for s in res["samples"]["qa_cal"]]
    assert theirs["ece_norm,none"] == pytest.approx(plugin.ece(items))


def test_aggregations_follow_their_definitions():
    # two questions: p = softmax([0, log 3]) = (0.25, 0.75) right; (0.5, 0.5) tie -> index 0
    items = [(1, [0.0, float(np.log(3.0))]), (1, [0.0, 0.0])]
    assert plugin.mean_confidence(items) == pytest.approx(0.625)
    # bins: 0.75 (correct) and 0.5 (wrong: argmax of a tie is 0): |1 - .75|/2 + |0 - .5|/2
    assert plugin.ece(items) == pytest.approx(0.375)
    assert plugin.rms_ce(items) == pytest.approx(np.sqrt((0.25**2 + 0.5**2) / 2))
