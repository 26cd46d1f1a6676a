"""Paired and two-level bootstrap comparisons, and the published letter-logits reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibrated_lm.calibration import bootstrap_indices, calibration_error, percentile_interval
from calibrated_lm.calibration.letter_logits import read_letter_logits, read_letter_logits_file
from calibrated_lm.calibration.paired import paired_bootstrap, two_level_bootstrap
from calibrated_lm.calibration.record import SampleRecord
from calibrated_lm.calibration.samples import group_samples
from calibrated_lm.errors import UserError


def _model(rng, n, k, sharp):
    z = rng.normal(size=(n, k)) * sharp
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def _direct(p, y, m):
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    if m == "accuracy":
        return correct.mean()
    if m == "mean_confidence":
        return conf.mean()
    if m in ("ece", "rms_ce"):
        return calibration_error(conf, correct, n_bins=15, norm="l1" if m == "ece" else "l2")
    onehot = np.eye(p.shape[1])[y]
    if m == "brier":
        return ((p - onehot) ** 2).sum(1).mean()
    return -np.log(p[np.arange(len(y)), y]).mean()


@pytest.mark.parametrize("m", ["accuracy", "mean_confidence", "ece", "rms_ce", "brier", "nll"])
def test_paired_bootstrap_matches_a_loop_over_the_same_draws(m):
    rng = np.random.default_rng(3)
    n = 300
    y = rng.integers(0, 4, n)
    pa, pb = _model(rng, n, 4, 1.0), _model(rng, n, 4, 3.0)
    res = paired_bootstrap(pa, pb, y, draws=200, seed=5)[m]
    assert res["a"] == pytest.approx(_direct(pa, y, m))
    assert res["b"] == pytest.approx(_direct(pb, y, m))
    assert res["delta"] == pytest.approx(res["b"] - res["a"])
    idx = bootstrap_indices(n, 200, 5)
    loop = [_direct(pb[i], y[i], m) - _direct(pa[i], y[i], m) for i in idx]
    assert res["ci95"] == pytest.approx(percentile_interval(np.array(loop)), abs=1e-9)


def test_same_model_twice_has_a_zero_interval_and_seed_level_widens_it():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 3, n)
    p = _model(rng, n, 3, 2.0)
    same = paired_bootstrap(p, p, y, draws=100)
    assert all(v["delta"] == 0 and v["ci95"] == [0.0, 0.0] for v in same.values())
    # Two B seeds that disagree: the seed level adds their spread to the interval.
    b1, b2 = _model(rng, n, 3, 1.0), _model(rng, n, 3, 4.0)
    one = two_level_bootstrap([p], [b1], y, draws=300)["ece"]
    two = two_level_bootstrap([p, p], [b1, b2], y, draws=300)["ece"]
    assert one["delta"] == pytest.approx(_direct(b1, y, "ece") - _direct(p, y, "ece"))
    e1, e2 = _direct(b1, y, "ece"), _direct(b2, y, "ece")
    assert two["b"] == pytest.approx((e1 + e2) / 2)
    assert two["ci95"][1] - two["ci95"][0] > one["ci95"][1] - one["ci95"][0]
    with pytest.raises(ValueError, match="same number"):
        two_level_bootstrap([p], [], y)


def test_paired_metrics_come_from_the_registry() -> None:
    """Default: the registry's paired view, in its order; any registered metric by name, its
    draws equal to its point function on each resample (smooth ECE, classwise ECE: not in the
    paired view, each through its own resampled path)."""
    from calibrated_lm.calibration import registry
    from calibrated_lm.calibration.items import ItemArrays

    rng = np.random.default_rng(11)
    n = 150
    y = rng.integers(0, 3, n)
    pa, pb = _model(rng, n, 3, 1.0), _model(rng, n, 3, 3.0)
    res = paired_bootstrap(pa, pb, y, draws=40, seed=2)
    assert list(res) == [m.name for m in registry.metrics("paired")]
    named = paired_bootstrap(pa, pb, y, draws=40, seed=2, metrics=["smooth_ece", "classwise_ece"])
    assert list(named) == ["smooth_ece", "classwise_ece"]
    ia, ib = ItemArrays.from_probs(pa, y), ItemArrays.from_probs(pb, y)
    idx = bootstrap_indices(n, 40, 2)
    for name, r in named.items():
        m = registry.get(name)
        assert r["a"] == pytest.approx(m.point(ia, 15, "width"))
        loop = [m.point(ib.take(i), 15, "width") - m.point(ia.take(i), 15, "width") for i in idx]
        assert r["ci95"] == pytest.approx(percentile_interval(np.array(loop)), abs=1e-9)
    with pytest.raises(KeyError):
        paired_bootstrap(pa, pb, y, draws=5, metrics=["no_such_metric"])


def test_an_infinite_nll_stays_infinite_only_in_the_draws_that_hold_it() -> None:
    """A gold answer of probability 0 makes NLL +inf in the draws that take that question
    and finite in the others (0 * inf no longer turns a draw into NaN)."""
    y = np.array([0, 1, 0, 1, 0, 1])
    pa = np.array([[0.6, 0.4]] * 6)
    pb = pa.copy()
    pb[0] = [0.0, 1.0]  # question 0: gold probability 0 for B
    res = paired_bootstrap(pa, pb, y, draws=200, seed=0, metrics=["nll"])["nll"]
    assert res["b"] == np.inf and res["delta"] == np.inf
    assert np.isfinite(res["ci95"][0]) and res["ci95"][1] == np.inf


HEADER = "0,1,2,3,4,5,Logit_A,Logit_B,Logit_C,Logit_D,Predicted,Correct\n"


def _csv(folder: Path, subject: str, rows: list[str], header: str = HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{subject}_test_logits.csv"
    path.write_text(header + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def test_letter_logits_read_as_paired_records(tmp_path: Path) -> None:
    _csv(
        tmp_path,
        "anatomy",
        ['"What, here?",a,b,c,d,C,-3.5,-2.0,-1.25,-9,C,', "Q2,a,b,c,d,A,1,2,3,4,D,"],
    )
    _csv(tmp_path, "astronomy", ["Q,a,b,c,d,D,0,0,0,1,D,"])
    recs = read_letter_logits(tmp_path)
    assert all(isinstance(r, SampleRecord) for r in recs)  # the one typed record
    assert [r.id for r in recs] == ["anatomy/0", "anatomy/1", "astronomy/0"]
    assert recs[0].choice_logprobs == (-3.5, -2.0, -1.25, -9.0)
    assert [r.label for r in recs] == [2, 0, 3]
    assert recs[0].task == "mmlu" and recs[0].subject == "anatomy"
    assert recs[0].name == "mmlu_anatomy" and recs[0].group == "mmlu"  # the one naming rule
    assert recs[0].choices == ("a", "b", "c", "d")
    assert recs[1].source.endswith("anatomy_test_logits.csv:3")
    # They group and summarise like any samples file's records.
    assert list(group_samples(recs)) == ["mmlu_anatomy", "mmlu_astronomy"]
    assert SampleRecord.from_json(recs[0].to_json()) == recs[0]


@pytest.mark.parametrize(
    "rows, header, msg",
    [
        (["Q,a,b,c,d,B,1,x,3,4,B,"], HEADER, r"anatomy_test_logits.csv:2: Logit_B is not a number"),
        (["Q,a,b,c,d,B,1,2,3,4,B,", "Q,a,b,c,d,E,1,2,3,4,B,"], HEADER, r":3: gold letter 'E'"),
        (["Q,a,b,c,d,B,1,2,3,nan,B,"], HEADER, r":2: Logit_D is not finite"),
        (["Q,a,b,c,d,B,1,2"], HEADER, r":2: 8 fields, expected at least 10"),
        ([], HEADER.replace("Logit_C", "Logit_X"), r":1: missing column 'Logit_C'"),
        ([], HEADER, "no question rows"),
    ],
)
def test_letter_logits_bad_input_names_file_and_line(tmp_path, rows, header, msg) -> None:
    path = _csv(tmp_path, "anatomy", rows, header)
    with pytest.raises(UserError, match=msg):
        read_letter_logits_file(path)


def test_letter_logits_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a folder"):
        read_letter_logits(tmp_path / "missing")
    with pytest.raises(UserError, match="holds no"):
        read_letter_logits(tmp_path)
    bad = tmp_path / "x_test_logits.csv"
    bad.write_bytes(HEADER.encode() + b"Q\xff,a,b,c,d,A,1,2,3,4,A,\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_letter_logits(tmp_path)
