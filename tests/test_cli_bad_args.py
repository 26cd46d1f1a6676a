"""Every command checks all its arguments first: a bad value is exit status 2 and one sentence
(or argparse's usage error), no traceback, no model loaded, the output folder left as it was.

The property-based tests draw bad values of each numeric option; the model, task, samples file
and run folders named on the command line do not exist, so any attempt to load or read them
first would fail differently (and the sentence must name the option)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
from helpers_cli import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _not_an_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return True
    return False


def _ints_below(limit: int) -> st.SearchStrategy[str]:
    return st.integers(max_value=limit - 1, min_value=-(10**12)).map(str)


def _garbage() -> st.SearchStrategy[str]:
    """Text that argparse's int() refuses (floats, words, empty, NaN, ...)."""
    words = st.sampled_from(["", "x", "1.5", "nan", "inf", "-inf", "1e3", "0x10", "one", " "])
    return words | st.text(min_size=0, max_size=6).filter(_not_an_int)


def _valid_device(s: str) -> bool:
    """The devices this machine has: on a GPU machine `cuda` and `cuda:0` are good values."""
    import torch

    if s in ("auto", "cpu") or (s.startswith("cpu") and s[3:4] in ("", ":")):
        return True
    if torch.cuda.is_available() and (s == "cuda" or s.startswith("cuda:")):
        index = s[5:]
        return index == "" or (index.isdigit() and int(index) < torch.cuda.device_count())
    return False


def _bad_device() -> st.SearchStrategy[str]:
    named = st.sampled_from(["tpu", "gpu", "cuda", "cuda:0", "cuda:7", "mps", "meta", "", "xla"])
    drawn = st.text(alphabet="abcdefghijklmnopqrstuvwxyz:0123456789", max_size=8)
    return (named | drawn).filter(lambda s: not _valid_device(s))


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {"<dirs>": ",".join(sorted(p.name for p in folder.rglob("*") if p.is_dir()))}


_run = run_cli


def _assert_refused(argv: list[str], option: str, output: Path) -> None:
    before = _snapshot(output)
    code, err = _run(argv)
    assert code == 2, (argv, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if lines and lines[0].startswith("usage:"):
        # argparse: usage lines, then "calibrated-lm <cmd>: error: argument --x: ..."
        assert ": error: " in lines[-1] and option in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert option in lines[0], err  # blames the option, not the (missing) model or data
    assert _snapshot(output) == before


@pytest.fixture
def output(tmp_path: Path) -> Path:
    """An existing output folder with something in it, which must stay exactly as it is."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.json").write_text('{"kept": true}\n')
    return out


NOWHERE = "/nonexistent/calibrated-lm-test"


# ----------------------------------------------------------------------------- eval


@st.composite
def eval_bad(draw) -> tuple[str, str]:
    option = draw(
        st.sampled_from(["--n-bins", "--bootstrap", "--batch-size", "--num-fewshot", "--device"])
    )
    if option == "--n-bins":
        value = draw(_ints_below(1) | _garbage())
    elif option == "--bootstrap":
        value = draw(_ints_below(0) | _garbage())
    elif option == "--num-fewshot":
        value = draw(_ints_below(0) | _garbage())
    elif option == "--batch-size":
        value = draw(_ints_below(1) | _garbage().filter(lambda s: s != "auto"))
    else:
        value = draw(_bad_device())
    return option, value


@SETTINGS
@given(bad=eval_bad())
def test_eval_bad_values(bad, output: Path) -> None:
    option, value = bad
    argv = ["eval", "--model", f"{NOWHERE}/model", "--tasks", f"{NOWHERE}/quiz.jsonl"]
    argv += ["--output", str(output), f"{option}={value}", "--no-progress"]
    _assert_refused(argv, option, output)


# ----------------------------------------------------------------------------- train

_TRAIN_INT_MINIMUM = {
    "--batch-size": 1,
    "--grad-accum": 1,
    "--max-seq-len": 2,
    "--max-steps": 1,
    "--log-every": 1,
    "--save-every": 0,
    "--keep-checkpoints": 1,
    "--eval-every": 0,
    "--seed": 0,
}


def _not_a_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


def _bad_report_to(value: str) -> bool:
    from calibrated_lm.errors import UserError
    from calibrated_lm.training.tracking import parse_report_to

    try:
        parse_report_to(value)
    except UserError:
        return True
    return False


@st.composite
def train_bad(draw) -> tuple[str, str]:
    option = draw(
        st.sampled_from(
            [*_TRAIN_INT_MINIMUM, "--lr", "--label-smoothing", "--max-grad-norm", "--report-to"]
            + ["--device"]
        )
    )
    if option in _TRAIN_INT_MINIMUM:
        value = draw(_ints_below(_TRAIN_INT_MINIMUM[option]) | _garbage())
        if option == "--seed":
            value = draw(st.just(value) | st.integers(min_value=2**32).map(str))
        elif option == "--eval-every":
            # Any positive N without --eval-data FILE is refused too (nothing to score).
            value = draw(st.just(value) | st.integers(1, 10**6).map(str))
    elif option in ("--lr", "--label-smoothing", "--max-grad-norm"):
        good = {
            "--lr": lambda x: 0 < x < math.inf,
            "--label-smoothing": lambda x: 0 <= x < 1,
            "--max-grad-norm": lambda x: 0 <= x < math.inf,
        }[option]
        floats = st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not good(x))
        words = st.text(max_size=6).filter(_not_a_float)
        value = draw(floats.map(repr) | words)
    elif option == "--report-to":
        named = st.sampled_from(["", "all", "mlflow", "none,wandb", "tensorboard,", "wandb;tb"])
        value = draw((named | st.text(max_size=12)).filter(_bad_report_to))
    else:
        value = draw(_bad_device())
    return option, value


@SETTINGS
@given(bad=train_bad())
def test_train_bad_values(bad, output: Path) -> None:
    option, value = bad
    argv = ["train", "--model", f"{NOWHERE}/model", "--data", f"{NOWHERE}/data.jsonl"]
    argv += ["--output", str(output), f"{option}={value}", "--no-progress"]
    _assert_refused(argv, option, output)


# ----------------------------------------------------------------------------- metrics


@st.composite
def metrics_bad(draw) -> tuple[str, str]:
    option = draw(st.sampled_from(["--n-bins", "--bootstrap", "--seed"]))
    limit = 1 if option == "--n-bins" else 0
    return option, draw(_ints_below(limit) | _garbage())


@SETTINGS
@given(bad=metrics_bad())
def test_metrics_bad_values(bad, output: Path) -> None:
    option, value = bad
    argv = ["metrics", f"{NOWHERE}/samples.jsonl", "--output", str(output), f"{option}={value}"]
    _assert_refused(argv, option, output)


def test_metrics_negative_seed_blames_the_seed(tmp_path: Path, output: Path) -> None:
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"task": "t", "id": 1, "choice_logprobs": [-1, -2], "label": 0}) + "\n")
    code, err = _run(["metrics", str(f), "--output", str(output), "--seed", "-5"])
    assert code == 2 and err == "error: --seed must be 0 or more, got -5\n"


# ----------------------------------------------------------------------------- compare


@st.composite
def compare_bad(draw) -> tuple[str, str]:
    option = draw(st.sampled_from(["--n-bins", "--bootstrap"]))
    limit = 1 if option == "--n-bins" else 0
    return option, draw(_ints_below(limit) | _garbage())


@SETTINGS
@given(bad=compare_bad())
def test_compare_bad_values(bad, output: Path) -> None:
    option, value = bad
    argv = ["compare", f"{NOWHERE}/a", f"{NOWHERE}/b", "--output", str(output)]
    _assert_refused(argv + [f"{option}={value}"], option, output)


# ----------------------------------------------------------------------------- capacity


@st.composite
def capacity_bad(draw) -> tuple[str, str]:
    option = draw(st.sampled_from(["--batch", "--samples", "--seed", "--device", "--eps"]))
    if option in ("--batch", "--samples"):
        value = draw(_ints_below(1) | _garbage())
    elif option == "--seed":
        value = draw(_ints_below(0) | _garbage())
    elif option == "--device":
        value = draw(_bad_device())
    else:
        value = draw(
            st.floats(allow_nan=True, allow_infinity=True)
            .filter(lambda x: math.isnan(x) or not 0 < x < 1)
            .map(repr)
            | st.sampled_from(["", "x", "0.1,,y", "1", "0"])
        )
    return option, value


@SETTINGS
@given(bad=capacity_bad())
def test_capacity_bad_values(bad, output: Path) -> None:
    option, value = bad
    argv = ["capacity", "--model", f"{NOWHERE}/model", "--output", str(output)]
    _assert_refused(argv + [f"{option}={value}"], option, output)


def test_capacity_missing_model_creates_no_folder(tmp_path: Path) -> None:
    code, err = _run(["capacity", "--model", str(tmp_path / "missing")])
    assert code == 2 and err.startswith("error: model path")
    out = tmp_path / "cap"
    code, err = _run(["capacity", "--model", str(tmp_path / "missing"), "--output", str(out)])
    assert code == 2 and not out.exists()


# ----------------------------------------------------------------------------- bad files


def _good_record(i: int) -> dict:
    return {"task": "quiz", "id": str(i), "choice_logprobs": [-1.0, -2.0, -0.5], "label": i % 3}


def _run_folder(root: Path, name: str, records: list, summary: str | None = None) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "samples.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    )
    (folder / "summary.json").write_text(
        summary if summary is not None else json.dumps({"protocol": {"model": name}})
    )
    return folder


@pytest.mark.parametrize(
    ("record", "summary", "message"),
    [
        ({"task": "quiz", "id": "9", "label": 0}, None, r'samples.jsonl:4: missing field "choice_logprobs"'),
        ('{"task": "quiz", "id": "9", "choice_logprobs": [NaN, -1], "label": 0}', None,
         r'samples.jsonl:4: "choice_logprobs" contains NaN'),
        (_good_record(9) | {"label": "B"}, None, r"samples.jsonl:4: \"label\" must be an integer"),
        (_good_record(9) | {"label": 7}, None, r"samples.jsonl:4: label 7 is outside the 3"),
        (_good_record(2), None, r"samples.jsonl:4: duplicate id '2'"),
        (_good_record(9), '{"protocol": ', r"summary.json is damaged"),
        (_good_record(9), "[1, 2]", r"summary.json is not an eval summary"),
    ],
)  # fmt: skip
def test_compare_refuses_bad_runs_before_writing(tmp_path: Path, record, summary, message) -> None:
    good = _run_folder(tmp_path, "good", [_good_record(i) for i in range(4)])
    bad = _run_folder(tmp_path, "bad", [_good_record(i) for i in range(3)] + [record], summary)
    out = tmp_path / "cmp"
    code, err = _run(["compare", str(good), str(bad), "--output", str(out), "--bootstrap", "0"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_compare_refuses_duplicate_labels_and_torn_journals(tmp_path: Path) -> None:
    good = _run_folder(tmp_path, "good", [_good_record(i) for i in range(4)])
    out = tmp_path / "cmp"
    code, err = _run(["compare", str(good), str(good), "--output", str(out)])
    assert code == 2 and "is given twice" in err
    other = _run_folder(tmp_path, "other", [_good_record(i) for i in range(4)])
    argv = ["compare", str(good), str(other), "--labels", "x,x", "--output", str(out)]
    code, err = _run(argv)
    assert code == 2 and "two runs are labelled" in err
    code, err = _run(["compare", str(good), "--labels", "a,b", "--output", str(out)])
    assert code == 2 and "2 labels for 1 runs" in err
    torn = _run_folder(tmp_path, "torn", [_good_record(i) for i in range(3)])
    with (torn / "samples.jsonl").open("a") as fh:
        fh.write('{"task": "quiz", "id": "3", "choice_lo')
    code, err = _run(["compare", str(torn), "--output", str(out)])
    assert code == 2 and "samples.jsonl:4: the last line is cut short" in err
    assert not out.exists()


def test_non_utf8_inputs_are_sentences(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    line = json.dumps(_good_record(1)).encode()
    bad.write_bytes(line + b"\n" + line[:-1] + b', "prompt": "\xff\xfe"}\n')
    code, err = _run(["metrics", str(bad), "--output", str(tmp_path / "m")])
    assert (
        code == 2 and err.startswith(f"error: {bad}:2: not UTF-8 text") and "Traceback" not in err
    )
    assert not (tmp_path / "m").exists()

    task = tmp_path / "quiz.jsonl"
    task.write_bytes(b'{"context": "Q?", "choices": ["a", "b"], "label": 0}\n'
                     b'{"context": "Q\xe9?", "choices": ["a", "b"], "label": 0}\n')  # fmt: skip
    argv = ["eval", "--model", f"{NOWHERE}/m", "--tasks", str(task)]
    code, err = _run(argv + ["--output", str(tmp_path / "e")])
    assert (
        code == 2 and err.startswith(f"error: {task}:2: not UTF-8 text") and "Traceback" not in err
    )
    assert not (tmp_path / "e").exists()

    run = tmp_path / "run"
    run.mkdir()
    (run / "samples.jsonl").write_bytes(bad.read_bytes())
    code, err = _run(["compare", str(run), "--output", str(tmp_path / "c")])
    assert code == 2 and "samples.jsonl:2: not UTF-8 text" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()
