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
  - metric: brier
    aggregation: brier
    higher_is_better: false
  - metric: nll
    aggregation: !function calibrated_lm.integrations.lm_eval.nll
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
            "--device", "cpu", "--bootstrap", "1000", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = next(iter(summary["tasks"].values()))
    assert theirs["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-12)
    for key in ("ece", "rms_ce", "smooth_ece", "mean_confidence", "brier", "nll"):
        assert theirs[f"{key},none"] == pytest.approx(ours[key], abs=1e-6), key

    # Standard errors in lm-eval's own key spelling, "<metric>_stderr,<filter>": finite, and
    # about a quarter of our 95% bootstrap interval (a normal interval is +-1.96 SE; the
    # percentile interval of 30 questions is only roughly normal).
    assert isinstance(theirs["acc_stderr,none"], float)  # lm-eval's own, still there
    for key in ("ece", "rms_ce", "smooth_ece", "mean_confidence", "brier", "nll"):
        se = theirs[f"{key}_stderr,none"]
        assert isinstance(se, float) and np.isfinite(se) and se > 0, key
        lo, hi = ours[f"{key}_ci95"]
        assert 0.6 < (hi - lo) / (2 * 1.96 * se) < 1.6, (key, se, lo, hi)
    assert np.isfinite(theirs["ece_norm_stderr,none"]) and theirs["ece_norm_stderr,none"] > 0

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


def _items(n: int, seed: int) -> list[tuple[int, list[float]]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(4)), (rng.normal(size=4) * 2).tolist()) for _ in range(n)]


def test_bootstrap_stderr_is_lm_evals_estimator_and_shrinks_with_more_items():
    from lm_eval.api.metrics import mean_stderr

    # Mean confidence: the bootstrap SE of a mean is the closed-form SE lm-eval gives a mean,
    # s / sqrt(n), up to sqrt((n - 1) / n) and the Monte-Carlo error of 1,000 draws (~2%).
    items = _items(400, 0)
    conf = [float(np.max(np.exp(s) / np.sum(np.exp(s)))) for _, s in items]
    se = plugin.bootstrap_stderr("mean_confidence", items, 100_000)
    assert se == pytest.approx(mean_stderr(conf), rel=0.08)
    assert plugin.bootstrap_stderr("ece", items, 1000, seed=0) == plugin.bootstrap_stderr(
        "ece", items, 1000, seed=0
    )  # seeded
    # ECE's standard error falls about as 1 / sqrt(n): 16x the items, about a quarter.
    small = plugin.bootstrap_stderr("ece", _items(100, 1), 1000)
    large = plugin.bootstrap_stderr("ece", _items(1600, 1), 1000)
    assert 0.1 < large / small < 0.45
    assert np.isnan(plugin.bootstrap_stderr("ece", items[:1], 1000))


def test_the_stderr_lookup_is_wrapped_for_the_plugin_only():
    import lm_eval.evaluator_utils as eu
    from lm_eval.api import metrics as lm_metrics

    assert eu.stderr_for_metric is lm_metrics.stderr_for_metric  # both references wrapped
    # lm-eval's own metrics: its own answers.
    assert eu.stderr_for_metric(lm_metrics.mean, 100) is lm_metrics.mean_stderr
    assert eu.stderr_for_metric(lm_metrics.mean, 0) is None
    # The plugin's: our bootstrap, none with --bootstrap_iters 0 (lm-eval then writes N/A).
    assert eu.stderr_for_metric(plugin.ece, 0) is None
    items = _items(50, 2)
    assert eu.stderr_for_metric(plugin.smooth_ece, 200)(items) == pytest.approx(
        plugin.bootstrap_stderr("smooth_ece", items, 200)
    )


def test_reloading_the_plugin_wraps_the_lookup_once():
    import importlib

    import lm_eval.evaluator_utils as eu

    before = eu.stderr_for_metric
    importlib.reload(plugin)
    assert eu.stderr_for_metric is before


def test_the_plugin_offers_the_registrys_lm_eval_view(monkeypatch: pytest.MonkeyPatch):
    """A metric added to the registry's lm_eval view is an aggregation of the plugin (after
    the import that builds them), with a standard error, without other edits."""
    import importlib

    from calibrated_lm.calibration import registry
    from calibrated_lm.calibration.registry import Metric

    def p90(it, n_bins, binning):
        return float(np.quantile(it.confidence, 0.9))

    extra = Metric("p90_confidence", "p90 conf", p90, None, views={"lm_eval": False})
    monkeypatch.setitem(registry._REGISTRY, extra.name, extra)
    try:
        module = importlib.reload(plugin)
        assert (
            "p90_confidence" in module.METRIC_NAMES and "p90_confidence_norm" in module.METRIC_NAMES
        )
        items = _items(80, 4)
        conf = [float(np.max(np.exp(s) / np.sum(np.exp(s)))) for _, s in items]
        assert module.p90_confidence(items) == pytest.approx(float(np.quantile(conf, 0.9)))
        assert module.bootstrap_stderr("p90_confidence", items, 300) > 0
        assert module.HIGHER_IS_BETTER["p90_confidence"] is None
    finally:
        monkeypatch.undo()
        importlib.reload(plugin)
    assert "p90_confidence" not in plugin.METRIC_NAMES
