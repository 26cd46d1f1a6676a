"""The metrics registry drives every table and JSON summary: a registered metric shows up in
them without other edits, and its direction is results_*.json's higher_is_better."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from calibrated_lm.calibration import registry
from calibrated_lm.calibration.items import ItemArrays
from calibrated_lm.calibration.record import SampleRecord
from calibrated_lm.calibration.registry import Metric
from calibrated_lm.calibration.report import METRICS, summarize
from calibrated_lm.calibration.samples import write_sample_records
from calibrated_lm.evaluation.compare import compare_runs, header, paired_header
from calibrated_lm.evaluation.lm_eval_results import lm_eval_results
from calibrated_lm.evaluation.report import build_summary, report_header


def _median_confidence(it: ItemArrays, n_bins: int, binning: str) -> float:
    return float(np.median(it.confidence))


MEDIAN = Metric(
    "median_confidence",
    "median conf",
    _median_confidence,
    None,
    views={"report": True, "compare": True, "lm_eval": False},
)


@pytest.fixture
def median_registered() -> Iterator[Metric]:
    registry.register(MEDIAN)
    try:
        yield MEDIAN
    finally:
        registry.unregister(MEDIAN.name)


def _records(n: int, sharpness: float, seed: int) -> list[SampleRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        z = rng.normal(size=3) * sharpness
        out.append(
            SampleRecord(
                "quiz",
                str(i),
                tuple(z.tolist()),
                int(rng.integers(3)),
                choice_char_lengths=(3, 4, 5),
            )  # fmt: skip
        )
    return out


def test_the_built_ins_are_the_summary_metrics_in_order() -> None:
    assert [m.name for m in registry.metrics()] == list(METRICS)
    s = summarize([[-1.0, -2.0], [-0.5, -0.1], [-3.0, -1.0]], [0, 1, 0], bootstrap=5)
    assert [k for k in s if k in METRICS] == list(METRICS)
    assert [k for k in s if k.endswith("_ci95")] == [f"{m}_ci95" for m in METRICS]
    assert registry.get("ece").direction == "lower" and registry.get("accuracy").higher_is_better
    assert registry.get("mean_confidence").higher_is_better is None
    with pytest.raises(ValueError, match="registered already"):
        registry.register(registry.get("ece"))
    with pytest.raises(ValueError, match="unknown views"):
        Metric("x", "x", _median_confidence, views={"nowhere": True})


def test_built_in_headings_are_the_tables_of_before() -> None:
    assert report_header() == ["task", "n", "accuracy [95% CI]", "mean conf", "ECE [95% CI]",
                               "RMS-CE [95% CI]", "Brier", "NLL"]  # fmt: skip
    assert header() == ["run", "n", "accuracy", "ECE", "RMS-CE", "T (fit on val)",
                        "ECE after T", "RMS-CE after T"]  # fmt: skip
    assert paired_header() == ["run - reference", "shared n", "accuracy (higher better)",
                               "mean conf", "ECE (lower better)", "RMS-CE (lower better)",
                               "Brier (lower better)", "NLL (lower better)"]  # fmt: skip


def test_a_registered_metric_shows_up_everywhere_without_other_edits(
    tmp_path: Path, median_registered: Metric
) -> None:
    for name, sharp in (("ref", 1.0), ("sharp", 3.0)):
        (tmp_path / name).mkdir()
        write_sample_records(tmp_path / name / "samples.jsonl", _records(150, sharp, 0))
    result = compare_runs(
        [tmp_path / "ref", tmp_path / "sharp"], tmp_path / "out", bootstrap=40, n_bins=10
    )
    md = (tmp_path / "out" / "compare.md").read_text()
    heading = next(line for line in md.splitlines() if line.startswith("| run |"))
    assert "| RMS-CE | median conf | T (fit on val) |" in heading
    assert header()[5] == "median conf"
    row = result["tasks"]["quiz"]["runs"]["ref"]
    recs = _records(150, 1.0, 0)
    conf = np.array([np.exp(max(r.choice_logprobs) - np.logaddexp.reduce(r.choice_logprobs))
                     for r in recs])  # fmt: skip
    assert row["median_confidence"] == pytest.approx(float(np.median(conf)))
    lo, hi = row["median_confidence_ci95"]  # bootstrapped through the metric's own function
    assert lo <= row["median_confidence"] <= hi and lo < hi
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["tasks"]["quiz"]["runs"]["ref"]["median_confidence"] == row["median_confidence"]
    # eval's table and the harness-style results file pick it up as well.
    summary = build_summary(
        recs, protocol={}, normalization="none", n_bins=10, binning="width", bootstrap=0
    )
    assert "median conf [95% CI]" in report_header()
    res = lm_eval_results(summary, recs)
    assert (
        res["results"]["quiz"]["median_confidence,none"]
        == summary["tasks"]["quiz"]["median_confidence"]
    )
    assert res["higher_is_better"]["quiz"]["median_confidence"] is None


def test_higher_is_better_in_results_json_is_the_registry_direction() -> None:
    recs = _records(80, 2.0, 1)
    summary = build_summary(
        recs, protocol={}, normalization="none", n_bins=10, binning="width", bootstrap=0
    )
    hib = lm_eval_results(summary, recs)["higher_is_better"]["quiz"]
    want = {m.name: m.higher_is_better for m in registry.metrics("lm_eval")}
    assert hib == {"acc": True, "acc_norm": True, **want}
    assert hib["ece"] is False and hib["nll"] is False and hib["mean_confidence"] is None


def test_the_per_draw_path_equals_the_vectorised_bootstrap() -> None:
    """A metric without a vectorised resample is bootstrapped draw by draw: replacing the
    built-in ECE by an equal function gives the same interval."""
    rng = np.random.default_rng(3)
    scores, labels = rng.normal(size=(120, 4)) * 2, rng.integers(0, 4, 120)
    fast = summarize(scores, labels, bootstrap=30, n_bins=10)
    ece = registry.get("ece")
    wrapped = Metric(ece.name, ece.label, lambda it, b, m: ece.point(it, b, m), ece.direction,
                     views=ece.views)  # fmt: skip
    registry.register(wrapped, replace=True)
    try:
        slow = summarize(scores, labels, bootstrap=30, n_bins=10)
    finally:
        registry.register(ece, replace=True)
    assert list(slow) == list(fast)
    assert slow["ece"] == fast["ece"]
    assert slow["ece_ci95"] == pytest.approx(fast["ece_ci95"], abs=1e-12)


def _abs_gap(it: ItemArrays, n_bins: int, binning: str) -> float:
    return abs(float(it.confidence.mean()) - float(it.correct.mean()))


def _p90_confidence(it: ItemArrays, n_bins: int, binning: str) -> float:
    return float(np.quantile(it.confidence, 0.9))


def test_a_metric_registered_into_the_paired_view_is_in_compares_paired_table_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paired differences take their metrics, labels and directions from the registry: a
    metric put into its ``paired`` view (here by monkeypatching the registry) is computed
    through its own point function, bootstrapped draw by draw on the same resamples as the
    built-ins, headed by its label and judged by its direction, with no other edit."""
    from calibrated_lm.calibration.bootstrap import bootstrap_indices, percentile_interval
    from calibrated_lm.evaluation.compare import paired_table

    gap = Metric("abs_gap", "|conf - acc|", _abs_gap, "lower", views={"paired": True})
    p90 = Metric("p90_conf", "p90 conf", _p90_confidence, None, has_ci=False,
                 views={"paired": True})  # fmt: skip
    monkeypatch.setitem(registry._REGISTRY, gap.name, gap)
    monkeypatch.setitem(registry._REGISTRY, p90.name, p90)
    for name, sharp in (("ref", 1.0), ("sharp", 4.0)):
        (tmp_path / name).mkdir()
        write_sample_records(tmp_path / name / "samples.jsonl", _records(200, sharp, 0))
    result = compare_runs(
        [tmp_path / "ref", tmp_path / "sharp"], tmp_path / "out", bootstrap=60, n_bins=10
    )
    assert paired_header()[-2:] == ["|conf - acc| (lower better)", "p90 conf"]
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    paired = saved["tasks"]["quiz"]["runs"]["sharp"]["paired"]
    entry = paired["abs_gap"]

    def items(sharp: float) -> ItemArrays:
        from calibrated_lm.calibration.scores import choice_log_probabilities

        # compare pairs the shared questions in the order of their ids (as text).
        recs = sorted(_records(200, sharp, 0), key=lambda r: str(r.id))
        logp, k = choice_log_probabilities([r.choice_logprobs for r in recs])
        return ItemArrays(logp, k, np.array([r.label for r in recs]))

    ia, ib = items(1.0), items(4.0)
    assert entry["a"] == pytest.approx(_abs_gap(ia, 10, "width"))
    assert entry["b"] == pytest.approx(_abs_gap(ib, 10, "width"))
    assert entry["delta"] == pytest.approx(entry["b"] - entry["a"])
    # compare's draws are bootstrap_indices(n, draws, 0), the same for both runs.
    loop = [_abs_gap(ib.take(i), 10, "width") - _abs_gap(ia.take(i), 10, "width")
            for i in bootstrap_indices(200, 60, 0)]  # fmt: skip
    assert entry["ci95"] == pytest.approx(percentile_interval(np.array(loop)), abs=1e-12)
    assert entry["direction"] == "lower"
    assert entry["ci95"][0] > 0 and entry["verdict"] == "worse"  # sharper: further from acc
    assert paired["p90_conf"]["ci95"] is None and paired["p90_conf"]["verdict"] is None
    assert paired["p90_conf"]["delta"] == pytest.approx(
        _p90_confidence(ib, 10, "width") - _p90_confidence(ia, 10, "width")
    )
    (row,) = paired_table(result, "quiz")
    assert row[-2].endswith(" worse") and "[" in row[-2]
    assert "[" not in row[-1]  # no interval: the difference alone
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "|conf - acc| (lower better)" in md and "p90 conf |" in md
