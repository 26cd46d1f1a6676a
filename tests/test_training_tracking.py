"""Tracking and held-out evaluation of ``calibrated-lm train``: ``--report-to tensorboard|wandb``
logs what ``metrics.jsonl`` logs (resumes included); ``--eval-data/--eval-every`` adds held-out
loss, confidence, accuracy, entropy and ECE, equal to an independent computation from the
logits, without changing training; bad values and files are sentences before any loading."""

from __future__ import annotations

import json
import struct
import sys
import types
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_train import Killed, kill_at, logged, params, small_cfg, write_setup

from calibrated_lm.calibration.metrics import calibration_error
from calibrated_lm.errors import UserError
from calibrated_lm.training import tracking as T
from calibrated_lm.training.heldout_eval import ECE_BINS, EVAL_KEYS
from calibrated_lm.training.loop import TrainConfig, train

# A step's speed differs between a run and its resume; every other figure is exact.
SPEED_KEYS = ("tokens_per_s", "step_s")

HELD_OUT = [
    {"prompt": "Which planet is red?", "completion": "Mars is the red planet"},
    {"instruction": "Boiling point of water?", "output": "100 degrees"},
    {"messages": [{"role": "user", "content": "A star?"},
                  {"role": "assistant", "content": "the sun is a star"}]},
    {"prompt": "Calibration is", "completion": "confidence that matches accuracy on average"},
    {"prompt": "France", "completion": "Paris"},
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, model_dir, data = write_setup(tmp_path_factory.mktemp("tracking"))
    held = root / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT))
    return root, model_dir, data, held


def _cfg(setup, out: str, **kw) -> TrainConfig:
    return small_cfg(*setup[:3], out, **kw)


_Killed, _kill_at = Killed, kill_at


# ----------------------------------------------------------------------------- held-out


def _reference_eval(model_dir: Path, held: Path, label_smoothing: float) -> dict[str, float]:
    """The held-out figures from the full logits of the plain (unpatched) transformers model."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrated_lm.training.data import read_records, tokenize_records

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    data = tokenize_records(read_records(held), tok, max_seq_len=64)
    conf, correct, losses = [], [], []
    with torch.no_grad():
        for ex in data.examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
            target = torch.tensor(ex.labels[1:])
            keep = target != -100
            logits, target = logits[keep], target[keep]
            probs = logits.softmax(-1)
            conf.append(probs.max(-1).values)
            correct.append(logits.argmax(-1) == target)
            losses.append(
                F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="none")
            )
    c, y, loss = torch.cat(conf), torch.cat(correct), torch.cat(losses)
    return {
        "eval_loss": float(loss.mean()),
        "eval_confidence": float(c.mean()),
        "eval_accuracy": float(y.float().mean()),
        "eval_ece": calibration_error(c.numpy(), y.numpy(), n_bins=ECE_BINS),
        "eval_tokens": int(c.numel()),
    }


def test_held_out_figures_equal_an_independent_computation_from_the_logits(setup):
    _, _, _, held = setup
    cfg = _cfg(setup, "heldout", max_steps=2, eval_data=str(held), eval_every=1)
    train(cfg)
    rows = logged(Path(cfg.output))
    assert [r["step"] for r in rows] == [1, 2] and all(set(EVAL_KEYS) <= set(r) for r in rows)
    want = _reference_eval(Path(cfg.output) / "final", held, cfg.label_smoothing)
    got = rows[-1]  # evaluated after step 2: the weights saved in final/
    assert got["eval_tokens"] == want["eval_tokens"] > 20
    for key in ("eval_loss", "eval_confidence", "eval_accuracy", "eval_ece"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert 0 < got["eval_entropy"] < np.log(300)
    assert rows[0]["eval_loss"] != pytest.approx(rows[1]["eval_loss"], rel=1e-6)


def test_eval_every_picks_the_steps_and_evaluation_does_not_change_training(setup):
    _, _, _, held = setup
    plain = train(_cfg(setup, "no_eval", max_steps=5, save_every=0, log_every=3))
    cfg = _cfg(setup, "eval_2", max_steps=5, save_every=0, log_every=3, eval_data=str(held),
               eval_every=2)  # fmt: skip
    evaluated = train(cfg)
    rows = logged(Path(cfg.output))
    # Logged: every 3rd step, every evaluated step (2, 4) and the last one (evaluated too).
    assert [r["step"] for r in rows] == [2, 3, 4, 5]
    assert [("eval_loss" in r) for r in rows] == [True, False, True, True]
    plain_rows = {r["step"]: r for r in logged(Path(_cfg(setup, "no_eval").output))}
    assert [r["step"] for r in plain_rows.values()] == [3, 5]
    for r in rows:
        if r["step"] in plain_rows:
            assert r["loss"] == plain_rows[r["step"]]["loss"]  # bit for bit
    a, b = params(Path(plain["final"])), params(Path(evaluated["final"]))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # --eval-every 0: only after the last step.
    cfg0 = _cfg(setup, "eval_0", max_steps=3, save_every=0, eval_data=str(held))
    train(cfg0)
    assert [("eval_ece" in r) for r in logged(Path(cfg0.output))] == [False, False, True]


def test_killed_run_with_evaluation_resumes_to_the_same_figures(setup):
    _, _, _, held = setup
    ref = _cfg(setup, "eval_ref", eval_data=str(held), eval_every=1)
    train(ref)
    killed = _cfg(setup, "eval_killed", eval_data=str(held), eval_every=3)
    with pytest.raises(_Killed):
        train(killed, on_step=_kill_at(3))
    # Resumed with another --eval-every: allowed, it changes no training.
    train(replace(killed, resume=True, eval_every=1))
    want = {r["step"]: r for r in logged(Path(ref.output))}
    got = logged(Path(killed.output))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for r in got:
        if "eval_loss" in r:
            for key in EVAL_KEYS:
                assert r[key] == pytest.approx(want[r["step"]][key], rel=1e-6), (r["step"], key)
    assert [("eval_loss" in r) for r in got] == [False, False, True, True]


def test_bad_eval_files_are_sentences_before_the_model_is_loaded(setup, tmp_path):
    root, _, data, _ = setup
    nowhere = dict(model=str(tmp_path / "no-such-model"), data=str(data),
                   output=str(tmp_path / "o"), progress=False, device="cpu")  # fmt: skip
    with pytest.raises(UserError, match=r"--eval-data: data file .*missing.jsonl does not exist"):
        train(TrainConfig(**nowhere, eval_data=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"question": 1}\n')
    with pytest.raises(UserError, match=r"--eval-data .*bad.jsonl: record at line 2: unknown"):
        train(TrainConfig(**nowhere, eval_data=str(bad)))
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "compl')
    with pytest.raises(
        UserError, match=r"--eval-data: .*torn.jsonl: malformed JSON record at line 2"
    ):
        train(TrainConfig(**nowhere, eval_data=str(torn)))
    # Readable records of which none keeps a target token: after the model is loaded.
    empty = tmp_path / "no_answers.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    cfg = _cfg(setup, "x", output=str(tmp_path / "e"), eval_data=str(empty), max_steps=1)
    with pytest.raises(UserError, match=r"--eval-data .*no_answers.jsonl: no example left .*"
                                        r"1 no assistant turn"):  # fmt: skip
        train(cfg)
    assert not list((tmp_path / "e").glob("checkpoints/*"))


# ----------------------------------------------------------------------------- trackers


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_what_metrics_jsonl_logs_and_a_resume_adds_no_duplicates(setup):
    pytest.importorskip("tensorboard")
    _, _, _, held = setup
    cfg = _cfg(setup, "tb", report_to="tensorboard", eval_data=str(held), eval_every=2)
    with pytest.raises(_Killed):
        train(cfg, on_step=_kill_at(3))  # step 3 logged, then lost: redone after the resume
    train(replace(cfg, resume=True))
    rows = logged(Path(cfg.output))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    scalars = _tensorboard_scalars(Path(cfg.output) / T.TENSORBOARD_DIR)
    numeric = {k for r in rows for k, v in r.items() if k != "step" and v is not None}
    assert set(scalars) == numeric  # every field, eval_* included
    for key in ("loss", "lr", "confidence", "accuracy", "grad_norm", "eval_loss", "eval_ece"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in scalars[key]] == [s for s, _ in want], key  # purged, not doubled
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in want], rel=1e-6)
    assert [v for _, v in scalars["skipped"]] == [0.0] * 4


class _FakeRun:
    def __init__(self, calls, kwargs):
        self.calls, self.kwargs = calls, kwargs

    def log(self, data, step):
        self.calls.append(("log", step, dict(data)))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module that records its calls: the exact arguments, and failures
    the real library does not easily produce (the real one, offline, is tested below)."""
    calls: list = []
    module = types.ModuleType("wandb")
    ids = iter(["run-a", "run-b"])

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _FakeRun(calls, kwargs)

    module.init = init
    module.util = types.SimpleNamespace(generate_id=lambda: next(ids))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_gets_every_record_and_a_resume_continues_the_same_run(setup, fake_wandb):
    cfg = _cfg(setup, "wb", report_to="wandb", max_steps=3)
    with pytest.raises(_Killed):
        train(cfg, on_step=_kill_at(3))
    train(replace(cfg, resume=True))
    inits = [c[1] for c in fake_wandb if c[0] == "init"]
    assert [i["id"] for i in inits] == ["run-a", "run-a"]  # kept in OUTPUT/tracking.json
    assert all(i["resume"] == "allow" and i["dir"] == cfg.output for i in inits)
    assert inits[0]["config"]["label_smoothing"] == 0.1 and inits[0]["name"] == "wb"
    logs = [c for c in fake_wandb if c[0] == "log"]
    assert [c[1] for c in logs] == [1, 2, 3, 3]  # step 3 again after the resume (W&B drops it)
    last = {step: data for _, step, data in logs}  # step 3: the resumed run's line
    first = {}  # what W&B keeps: it ignores a step logged again
    for _, step, data in logs:
        first.setdefault(step, data)
    rows = logged(Path(cfg.output))
    assert last[3] == T.scalars(rows[2])  # the resumed run's step 3: metrics.jsonl's line
    for row in rows:
        # The redone step 3 logs the same figures (an exact resume) but its speed.
        same = {k: v for k, v in first[row["step"]].items() if k not in SPEED_KEYS}
        assert same == pytest.approx({k: v for k, v in T.scalars(row).items() if k in same})
        assert set(first[row["step"]]) == set(T.scalars(row))
    assert sum(c[0] == "finish" for c in fake_wandb) == 2  # closed on the exception too
    assert json.loads((Path(cfg.output) / T.TRACKING_FILE).read_text()) == {"wandb_run_id": "run-a"}
    # A new run in another folder gets a new id.
    train(_cfg(setup, "wb2", report_to="wandb", max_steps=1))
    assert [c[1]["id"] for c in fake_wandb if c[0] == "init"][-1] == "run-b"


def test_failing_wandb_init_is_a_sentence(setup, fake_wandb, monkeypatch):
    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)\nmore lines")

    monkeypatch.setattr(sys.modules["wandb"], "init", init)
    with pytest.raises(UserError, match=r"--report-to wandb: wandb.init failed \(api_key not "
                                        r"configured \(no-tty\)\); log in .*WANDB_MODE=offline"):  # fmt: skip
        train(_cfg(setup, "wb_fail", report_to="wandb", max_steps=1))


# The real wandb, offline: what it wrote is read back from its transaction log.

_LOG_BLOCK = 32 * 1024  # a run-ID.wandb file: LevelDB-style log blocks of checksummed chunks
_LOG_CHUNK = struct.Struct("<IHB")  # CRC-32 (seeded with the type byte), data length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> list:
    """The ``wandb_internal_pb2.Record`` messages of one transaction log, in order. After the
    7-byte header (``:W&B``, magic 0xBEE1, version 0), each record is cut into chunks that stay
    inside a 32 KiB block (a block tail shorter than a chunk header is padding). Every chunk's
    checksum is checked, so a misread of the format fails here, not in the comparisons."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), data[:7]
    records, parts, pos = [], [], 7
    while pos < len(data):
        room = _LOG_BLOCK - pos % _LOG_BLOCK
        if room < _LOG_CHUNK.size:
            pos += room
            continue
        crc, size, kind = _LOG_CHUNK.unpack_from(data, pos)
        body = data[pos + _LOG_CHUNK.size : pos + _LOG_CHUNK.size + size]
        assert len(body) == size, f"{path}: chunk at byte {pos} is cut short"
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc, f"{path}: checksum at {pos}"
        assert kind in (_FULL, _FIRST, _MIDDLE, _LAST), (pos, kind)
        assert (kind in (_FULL, _FIRST)) == (not parts), (pos, kind)  # chunks in order
        parts.append(body)
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
        pos += _LOG_CHUNK.size + size
    assert not parts, f"{path}: ends inside a record"
    return records


def _history_value(item):
    kind = item.WhichOneof("value")
    if kind is None:
        return json.loads(item.value_json)
    return json.loads(item.json) if kind == "json" else getattr(item, kind)


def _wandb_run_log(path: Path) -> tuple:
    """(the run record, [(step, {key: value})] of its history records, exited) of one log."""
    records = _wandb_records(path)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    history = [
        (
            r.history.step.num,
            {(i.key or "/".join(i.nested_key)): _history_value(i) for i in r.history.item},
        )
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    exited = any(r.WhichOneof("record_type") == "exit" for r in records)
    assert len(runs) == 1, path
    return runs[0], history, exited


def test_real_wandb_offline_logs_what_metrics_jsonl_logs_and_a_resume_keeps_the_run(
    setup, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    # Offline, silent, no login; nothing of wandb's own (cache, settings, logs) outside tmp_path.
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID",
                 "WANDB_RESUME", "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_TAGS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    _, _, _, held = setup
    cfg = _cfg(setup, "wb_real", output=str(tmp_path / "wb_real"), report_to="wandb",
               eval_data=str(held), eval_every=2)  # fmt: skip
    with pytest.raises(_Killed):
        train(cfg, on_step=_kill_at(3))  # step 3 logged, then lost: redone after the resume
    train(replace(cfg, resume=True))
    out = Path(cfg.output)
    rows = logged(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    run_id = json.loads((out / T.TRACKING_FILE).read_text())["wandb_run_id"]

    # Offline, each wandb.init writes a run folder of its own (offline-run-TIME-ID) under
    # OUTPUT/wandb: no server tells the second one that the run exists. Both carry the same
    # run id and ask for a resume (resume="allow"), which `wandb sync` acts on when uploading.
    logs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2, logs
    read = sorted((_wandb_run_log(p) for p in logs), key=lambda x: x[0].start_time.ToNanoseconds())
    for run, history, exited in read:
        assert run.run_id == run_id and run.resume and exited  # finished, even when killed
        assert run.project == "calibrated-lm" and run.display_name == "wb_real"
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["label_smoothing"] == cfg.label_smoothing == 0.1
        assert config["max_steps"] == 4 and config["report_to"] == "wandb"
        steps = [step for step, _ in history]
        assert steps == sorted(set(steps))  # no step twice within one run log
        for step, values in history:
            assert values["_step"] == step
    (_, first, _), (_, second, _) = read
    # The killed run logged steps 1-3; the resumed one redoes step 3 (after the step-2
    # checkpoint), so step 3 is in both logs, with the same figures but its speed (an exact
    # resume). Which copy `wandb sync` keeps is W&B's to decide (no server here to check).
    assert [s for s, _ in first] == [1, 2, 3] and [s for s, _ in second] == [3, 4]
    want = {r["step"]: T.scalars(r) for r in rows}
    for step, values in second:  # the resumed run: metrics.jsonl's lines, bit for bit
        assert {k: v for k, v in values.items() if not k.startswith("_")} == want[step], step
    for step, values in first:
        figures = {k: v for k, v in values.items() if not k.startswith("_")}
        assert set(figures) == set(want[step]), step  # every field, eval_* included
        if step < 3:
            assert figures == want[step], step
        else:
            for key in SPEED_KEYS:
                del figures[key]
            assert figures == pytest.approx(
                {k: v for k, v in want[step].items() if k not in SPEED_KEYS}, rel=1e-6
            )
    assert {"eval_loss", "eval_ece"} <= set(want[2]) and "eval_loss" not in want[3]


def test_missing_tracker_package_is_a_sentence_before_loading(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = TrainConfig(model=str(tmp_path / "m"), data=str(tmp_path / "d.jsonl"),
                      output=str(tmp_path / "o"), report_to="tensorboard,wandb", device="cpu")  # fmt: skip
    with pytest.raises(UserError, match=r"--report-to wandb needs the wandb package, which is "
                                        r"not installed: pip install 'calibrated-lm\[wandb\]'"):  # fmt: skip
        train(cfg)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("none", ()),
        ("tensorboard", ("tensorboard",)),
        ("TensorBoard, wandb", ("tensorboard", "wandb")),
        ("wandb,tensorboard,wandb", ("wandb", "tensorboard")),
    ],
)
def test_report_to_values(value, want):
    assert T.parse_report_to(value) == want


@pytest.mark.parametrize("value", ["", "all", "none,tensorboard", "tensorboard;wandb", ",", 1])
def test_bad_report_to_values_are_sentences(value):
    with pytest.raises(UserError, match=r"--report-to must be none, tensorboard, wandb or a"):
        T.parse_report_to(value)


def test_scalars_are_the_numeric_fields_but_the_step():
    record = {"step": 3, "loss": 1.5, "skipped": True, "grad_norm": None, "target_tokens": 7,
              "nonfinite_grads": ["a"], "note": "x"}  # fmt: skip
    assert T.scalars(record) == {"loss": 1.5, "skipped": 1.0, "target_tokens": 7.0}


def test_cli_train_with_eval_and_tensorboard(setup, capsys):
    pytest.importorskip("tensorboard")
    from calibrated_lm.cli import main

    root, model_dir, data, held = setup
    out = root / "cli"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
            "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--max-seq-len", "64",
            "--eval-data", str(held), "--eval-every", "1", "--report-to", "tensorboard",
            "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "eval data: 5 records, 5 examples" in printed
    rows = logged(out)
    assert all("eval_ece" in r for r in rows)
    scalars = _tensorboard_scalars(out / T.TENSORBOARD_DIR)
    assert [s for s, _ in scalars["eval_accuracy"]] == [1, 2]
