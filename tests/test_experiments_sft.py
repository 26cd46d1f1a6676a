"""Experiment helpers of experiments/sft_calibration.py: data mix, transport bundle, planning,
paired differences. No model is loaded."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from calibrated_lm.calibration.record import SampleRecord

EXP = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXP))

import common  # noqa: E402
import sft_calibration as sc  # noqa: E402
import sft_report  # noqa: E402


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_mix_keeps_every_record_once_and_drops_provenance_fields(tmp_path):
    a = _write(tmp_path / "a.json", [{"instruction": f"a{i}", "output": "x"} for i in range(30)])
    b = _write(
        tmp_path / "b.json",
        [{"instruction": f"b{i}", "output": "y", "generator": "gpt4"} for i in range(10)],
    )
    info = common.mix_instruction_data([a, b], tmp_path / "mix", holdout_frac=0.1, seed=3)
    train = json.loads((tmp_path / "mix" / "train.json").read_text())
    held = json.loads((tmp_path / "mix" / "heldout.json").read_text())
    assert (info["n_train"], info["n_heldout"]) == (36, 4)
    names = sorted(r["instruction"] for r in train + held)
    assert names == sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(10)])
    assert all(set(r) <= set(common.ALPACA_FIELDS) for r in train + held)
    again = common.mix_instruction_data([a, b], tmp_path / "mix2", holdout_frac=0.1, seed=3)
    assert json.loads((tmp_path / "mix2" / "heldout.json").read_text()) == held
    assert again["heldout_by_source"] == info["heldout_by_source"]


def test_bundle_leaves_out_the_token_cache(tmp_path):
    work = tmp_path / "work"
    (work / "token_cache").mkdir(parents=True)
    (work / "token_cache" / "abc.npz").write_bytes(b"x" * 100)
    (work / "runs" / "r").mkdir(parents=True)
    (work / "runs" / "r" / "done.json").write_text("{}")
    out = tmp_path / "b.tgz"
    common.bundle(work, out)
    import tarfile

    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert any(n.endswith("runs/r/done.json") for n in names)
    assert not any("token_cache" in n for n in names)


def test_bundle_slims_samples_skips_weights_and_round_trips(tmp_path):
    work = tmp_path / "work"
    ev = work / "evals" / "base"
    ev.mkdir(parents=True)
    rec = {
        "task": "arc_easy",
        "id": "q1",
        "choice_logprobs": [-1.0, -2.0],
        "label": 0,
        "choice_char_lengths": [3, 4],
        "prompt": "long prompt " * 50,
        "choices": ["abc", "abcd"],
    }
    (ev / "samples.jsonl").write_text(json.dumps(rec) + "\n" + '{"task": "arc_easy", "id"')
    (ev / "summary.json").write_text("{}")
    (ev / "diagram.svg").write_text("<svg/>")
    final = work / "runs" / "r1" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"\0" * 100)
    (work / "runs" / "r1" / "metrics.jsonl").write_text('{"step": 1}\n')
    (work / "data").mkdir()
    (work / "data" / "train.json").write_text("[]")
    (work / "data" / "data.json").write_text("{}")
    (work / "locks").mkdir()
    (work / "locks" / "prepare.lock").write_text("")
    names = common.bundle(work, tmp_path / "b.tgz")
    assert sorted(names) == [
        "data/data.json",
        "evals/base/samples.jsonl",
        "evals/base/summary.json",
        "runs/r1/metrics.jsonl",
    ]
    out = tmp_path / "back"
    common.unbundle(tmp_path / "b.tgz", out)
    lines = (out / "evals" / "base" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the line cut short by a crash is not carried
    slim = json.loads(lines[0])
    assert "prompt" not in slim and "choices" not in slim
    assert slim["choice_logprobs"] == [-1.0, -2.0] and slim["choice_char_lengths"] == [3, 4]
    # newer_than: results restored from elsewhere (older) stay behind.
    os.utime(ev / "summary.json", (1_000, 1_000))
    os.utime(work / "data" / "data.json", (1_000, 1_000))
    names = common.bundle(work, tmp_path / "c.tgz", newer_than=2_000)
    assert sorted(names) == ["evals/base/samples.jsonl", "runs/r1/metrics.jsonl"]


def test_budget_plan_lists_every_setting_and_is_resumable(tmp_path, capsys):
    exp = sc.Experiment(sc.PROFILES["budget"], tmp_path, [], "cpu")
    names = [u.name for u in exp.units()]
    assert names[:2] == ["prepare", "eval/base"]
    assert "train/sft_lr2e-05_eps0.1_T0.5_s1" in names
    assert "eval/sft_lr2e-05_eps0.1_C32_s1" in names
    assert names[-1] == "eval/reference"
    assert sum(n.startswith("train/") for n in names) == len(sc.PROFILES["budget"].runs)
    done = next(u for u in exp.units() if u.name == "eval/base")
    common.write_json(done.folder / sc.DONE, {"unit_s": 1.0})
    sc.plan(exp, 480)
    out = capsys.readouterr().out
    assert "eval/base" in out and "done" in out.split("eval/base")[1].splitlines()[0]


def test_full_plan_waits_for_learning_rate_selection(tmp_path):
    exp = sc.Experiment(sc.PROFILES["full"], tmp_path, [], "cpu")
    names = [u.name for u in exp.units()]
    assert "select_lr" in names
    assert "train/sft_lr?_eps0_s1" not in names  # reuses the eps=0 selection run
    assert "eval/sft_lr?_eps0_s1" in names
    common.write_json(tmp_path / "select_lr" / sc.DONE, {"lr": 8e-5})
    names = [u.name for u in exp.units()]
    assert "eval/sft_lr8e-05_eps0.2_s2" in names
    assert names.count("train/sft_lr8e-05_eps0_s1") == 1


def test_profile_is_pinned_to_the_work_folder(tmp_path):
    sc._check_profile(tmp_path, "budget")
    sc._check_profile(tmp_path, "budget")
    with pytest.raises(SystemExit, match="holds a 'budget' run"):
        sc._check_profile(tmp_path, "full")


class _FakeExperiment:
    """prepare -> three "lr" trains -> select -> two trains; every action logs start and end."""

    def __init__(self, work: Path, long_eval: bool = False):
        self.work, self.long_eval = work, long_eval
        self.log: list[tuple[str, str]] = []  # ("start" | "end", unit name), in order
        self.lock = threading.Lock()
        self.shared_gpu = False
        # Estimates of 10 ms per unit (the actions take 50 ms; only a limit check uses them).
        self.p = sc.dataclasses.replace(
            sc.PROFILES["smoke"],
            est=dict.fromkeys(("prepare", "train", "select"), 0.01) | {"eval": 1000.0},
        )

    def _action(self, name: str):
        def act():
            import time

            with self.lock:
                self.log.append(("start", name))
            time.sleep(0.05)
            with self.lock:
                self.log.append(("end", name))
            return {}

        return act

    def units(self):
        w = self.work
        unit = lambda name, kind, needs=(): sc.Unit(  # noqa: E731
            name, kind, w / name.replace("/", "_"), self._action(name), needs=needs
        )
        lr = [unit(f"train/lr{i}", "train", ("prepare",)) for i in range(3)]
        units = [unit("prepare", "prepare"), *lr]
        if self.long_eval:  # first in line, but estimated far past any limit the tests use
            units.insert(1, unit("eval/long", "eval", ("prepare",)))
        units.append(unit("select", "select", tuple(u.name for u in lr)))
        if (w / "select" / sc.DONE).exists():  # like the real list: grows after the selection
            units += [unit(f"train/after{i}", "train", ("select",)) for i in range(2)]
        return units


def test_two_workers_share_the_units_once_each_in_dependency_order(tmp_path):
    exp = _FakeExperiment(tmp_path)
    log = exp.log
    left = []
    workers = [
        threading.Thread(target=lambda: left.append(sc.run_units(exp, 60, poll_s=0.02)))
        for _ in range(2)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=30)
    assert left == [0, 0]
    started = [name for ev, name in log if ev == "start"]
    assert sorted(started) == sorted(u.name for u in exp.units())  # each exactly once
    pos = {(ev, name): i for i, (ev, name) in enumerate(log)}
    for u in exp.units():
        for need in u.needs:
            assert pos[("end", need)] < pos[("start", u.name)], (need, u.name)


def test_a_unit_past_the_limit_is_passed_over_for_shorter_ones(tmp_path, capsys):
    exp = _FakeExperiment(tmp_path, long_eval=True)
    log = exp.log
    assert sc.run_units(exp, 60, poll_s=0.02) == 1
    assert ("start", "eval/long") not in log and ("end", "train/after1") in log
    assert capsys.readouterr().out.count("[wait] eval/long") == 1


def test_units_another_worker_adds_mid_pass_are_not_left_behind(tmp_path):
    """select_lr finished by another worker after this one listed the units: the SFT units it
    adds must still run here, not be left for the next chunk."""
    exp = _FakeExperiment(tmp_path)
    log = exp.log
    for name in ("prepare", "train/lr0", "train/lr1", "train/lr2"):
        common.write_json(tmp_path / name.replace("/", "_") / sc.DONE, {"unit_s": 0.01})
    listed = exp.units

    def units():
        out = listed()
        if not (tmp_path / "select" / sc.DONE).exists():  # the other worker, just too late
            common.write_json(tmp_path / "select" / sc.DONE, {"unit_s": 0.01})
        return out

    exp.units = units
    assert sc.run_units(exp, 60, poll_s=0.02) == 0
    assert ("end", "train/after1") in log


def test_a_lock_file_left_by_a_dead_worker_does_not_block(tmp_path):
    exp = _FakeExperiment(tmp_path)
    log = exp.log
    stale = sc.UnitLock(tmp_path, "prepare")
    stale.path.parent.mkdir(parents=True)
    stale.path.write_text("")  # the file stays when its holder dies; the flock does not
    assert sc.run_units(exp, 60, poll_s=0.02) == 0
    assert ("end", "prepare") in log


def test_a_worker_stops_when_the_rest_waits_on_a_unit_nobody_runs(tmp_path):
    exp = _FakeExperiment(tmp_path)
    log = exp.log
    held = sc.UnitLock(tmp_path, "train/lr2")
    assert held.acquire()  # "another worker" runs lr2 and never finishes within the limit
    try:
        left = sc.run_units(exp, 2.0, poll_s=0.05)
    finally:
        held.release()
    assert left == 2  # lr2 and select
    assert ("end", "train/lr1") in log and ("start", "select") not in log


def test_last_chunk_resumes_begun_training_but_starts_none(tmp_path, capsys):
    """--no-new-training: a run with a checkpoint resumes, the others are not begun (the
    machine goes back after the chunk), and the worker stops instead of waiting on them."""
    exp = _FakeExperiment(tmp_path)
    log = exp.log
    ckpt = tmp_path / "train_lr1" / "checkpoints" / "step-3"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    # A first checkpoint cut off mid-write: nothing to resume from, so lr2 is not begun.
    (tmp_path / "train_lr2" / "checkpoints" / ".tmp-step-3").mkdir(parents=True)
    assert sc.run_units(exp, 60, poll_s=0.02, new_training=False) == 3  # lr0, lr2, select
    assert [name for ev, name in log if ev == "start"] == ["prepare", "train/lr1"]
    out = capsys.readouterr().out
    assert out.count("[skip] train/lr0") == 1 and out.count("[skip] train/lr2") == 1
    # The next session's first chunk begins them.
    assert sc.run_units(exp, 60, poll_s=0.02) == 0


def test_last_chunk_resumes_a_begun_training_only_if_it_fits(tmp_path, capsys):
    """In the last chunk a resume that the limit would stop is lost with the machine: the
    begun run waits (est 1000 s > 60 s) instead of starting."""
    exp = _FakeExperiment(tmp_path)
    exp.p = sc.dataclasses.replace(exp.p, save_every=5, est=exp.p.est | {"train": 1000.0})
    (tmp_path / "train_lr1" / "checkpoints" / "step-3").mkdir(parents=True)
    (tmp_path / "train_lr1" / "checkpoints" / "step-3" / "state.json").write_text("{}")
    assert sc.run_units(exp, 60, poll_s=0.02, new_training=False) == 4
    assert [name for ev, name in exp.log if ev == "start"] == ["prepare"]
    assert "[wait] train/lr1" in capsys.readouterr().out


def _begin(folder, step: int, total: int, step_s: list[float]) -> None:
    """A begun training run: its checkpoint at ``step`` and its metrics.jsonl's lines."""
    ckpt = folder / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": step, "total_steps": total}))
    lines = [json.dumps({"step": i + 1, "step_s": t}) for i, t in enumerate(step_s)]
    (folder / "metrics.jsonl").write_text("\n".join(lines + ['{"step": 9, "ste']) + "\n")


def test_a_begun_run_is_estimated_from_its_own_checkpoint_and_steps(tmp_path):
    prof = sc.PROFILES["claim3"]
    unit = sc.Unit("train/r", "train", tmp_path / "r", lambda: {})
    # Not begun: the profile's whole-run figure, for a GPU shared between workers or not.
    assert sc._estimate(unit, {}, prof, True) == prof.est["train"]
    assert sc._estimate(unit, {}, prof) == prof.est["train_alone"] < prof.est["train"]
    assert sc._estimate(unit, {}, sc.PROFILES["control"]) == sc.PROFILES["control"].est["train"]
    # 80 steps beside an idle worker, 20 beside a training one: the 90th percentile (1.6 s)
    _begin(unit.folder, 516, 564, [1.0] * 80 + [1.6] * 20)
    want = 1.1 * (48 * 1.6 + sc.TRAIN_TAIL_S)
    assert sc._estimate(unit, {}, prof) == pytest.approx(want)
    # Finished runs' timings never stand in for a training unit (their unit_s is one chunk).
    assert sc._estimate(unit, {"train": [90.0]}, prof) == pytest.approx(want)
    # A run logged before step_s existed falls back to the profile's figure.
    (unit.folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert sc._estimate(unit, {"train": [90.0]}, prof, True) == prof.est["train"]


def test_a_begun_run_adds_the_overhead_finished_runs_had_on_a_gpu_shared_the_same_way(tmp_path):
    """Session 22: a run 11 steps from its end, alone on an H100, was estimated at 153 s (the
    two-worker 130 s for load, final save and held-out pass) and waited; it took 70 s. Finished
    runs' own last-chunk overheads, kept apart by whether the GPU was shared, now stand in."""
    prof = sc.PROFILES["claim3"]
    done = []
    for name, overhead, shared in (("a", 40.0, False), ("b", 61.0, False), ("c", 120.0, True)):
        u = sc.Unit(f"train/{name}", "train", tmp_path / name, lambda: {})
        u.folder.mkdir()
        common.write_json(
            u.folder / sc.DONE, {"unit_s": 500.0, "overhead_s": overhead, "shared_gpu": shared}
        )
        done.append(u)
    old = sc.Unit("train/old", "train", tmp_path / "old", lambda: {})  # before the fields
    old.folder.mkdir()
    common.write_json(old.folder / sc.DONE, {"unit_s": 90.0, "train_s": 10.0})
    timed = sc._past_timings([*done, old])
    assert timed["train_overhead/alone"] == [40.0, 61.0]
    assert timed["train_overhead/shared"] == [120.0]
    unit = sc.Unit("train/r", "train", tmp_path / "r", lambda: {})
    _begin(unit.folder, 553, 564, [0.8] * 553)
    assert sc._estimate(unit, timed, prof) == pytest.approx(1.1 * (11 * 0.8 + 61.0))
    assert sc._estimate(unit, timed, prof, True) == pytest.approx(1.1 * (11 * 0.8 + 120.0))
    # Nothing timed the same way: the two-worker figure.
    assert sc._estimate(unit, sc._past_timings([old]), prof) == pytest.approx(
        1.1 * (11 * 0.8 + sc.TRAIN_TAIL_S)
    )


def test_a_chunks_step_seconds_count_only_the_steps_after_its_checkpoint(tmp_path):
    _begin(tmp_path, 3, 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert sc._checkpoint_step(tmp_path) == 3
    assert sc._checkpoint_step(tmp_path / "none") is None
    assert sc._step_seconds(tmp_path, 3) == pytest.approx(9.0)  # the cut-off line is skipped
    assert sc._step_seconds(tmp_path, 0) == pytest.approx(15.0)


def test_last_chunk_resumes_a_begun_run_whose_rest_fits_though_a_whole_run_would_not(
    tmp_path, capsys
):
    """Session 14's loss: claim 3's first run was 48 steps from its end, the last chunk
    compared the profile's 400 s for a whole run with its 380 s and let the run go."""
    exp = _FakeExperiment(tmp_path)
    exp.p = sc.dataclasses.replace(exp.p, save_every=5, est=exp.p.est | {"train": 1000.0})
    _begin(tmp_path / "train_lr1", 3, 4, [0.01, 0.01, 0.01])
    limit = 1.1 * (0.01 + sc.TRAIN_TAIL_S) + 5  # the rest fits; a whole run (1000 s) would not
    sc.run_units(exp, limit, poll_s=0.02, new_training=False)
    assert "train/lr1" in [name for ev, name in exp.log if ev == "start"]
    assert "[wait] train/lr1" not in capsys.readouterr().out


def test_last_chunk_resumes_a_begun_run_only_if_its_evaluations_fit_too(tmp_path, capsys):
    """The weights of a run finished in the last chunk go with the machine: a resume whose
    evaluations cannot follow it in the time left would be device time for nothing."""

    class WithEval(_FakeExperiment):
        def units(self):
            units = super().units()
            ev = sc.Unit("eval/lr1", "eval", self.work / "eval_lr1", self._action("eval/lr1"))
            return [*units, dataclasses.replace(ev, needs=("train/lr1",))]

    exp = WithEval(tmp_path)  # evaluations estimated at 1000 s
    exp.p = sc.dataclasses.replace(exp.p, save_every=5)
    _begin(tmp_path / "train_lr1", 3, 4, [0.01, 0.01, 0.01])
    limit = 1.1 * (0.01 + sc.TRAIN_TAIL_S) + 5  # the rest of the run alone would fit
    sc.run_units(exp, limit, poll_s=0.02, new_training=False)
    assert "train/lr1" not in [name for ev, name in exp.log if ev == "start"]
    assert "[wait] train/lr1" in capsys.readouterr().out


def test_lr_table_lists_the_finished_eps0_runs_in_lr_order(tmp_path):
    held = {"nll": 2.0, "accuracy": 0.5, "mean_confidence": 0.6, "overconfidence": 0.1}
    for lr, done in ((8e-5, True), (5e-6, True), (2e-5, False)):  # 2e-5: killed before its marker
        d = tmp_path / "runs" / f"sft_lr{lr:g}_eps0_s1"
        common.write_json(d / "heldout.json", {**held, "nll": 2.0 + lr})
        if done:
            common.write_json(d / sc.DONE, {"lr": lr})
    common.write_json(tmp_path / "runs" / "sft_lr5e-06_eps0.1_s1" / sc.DONE, {"lr": 5e-6})
    assert sft_report._lr_selection(tmp_path) is None  # nothing selected yet
    common.write_json(tmp_path / "select_lr" / sc.DONE, {"lr": 5e-6, "rule": "lowest NLL"})
    sel = sft_report._lr_selection(tmp_path)
    assert sel["lr"] == 5e-6
    assert [(c["lr"], c["nll"]) for c in sel["candidates"]] == [
        (5e-6, 2.0 + 5e-6),
        (8e-5, 2.0 + 8e-5),
    ]


def _records(conf_correct: list[tuple[list[float], int]]) -> list[SampleRecord]:
    return [
        SampleRecord("t", str(i), tuple(s), y, choice_char_lengths=(1, 1))
        for i, (s, y) in enumerate(conf_correct)
    ]


def test_paired_difference_of_identical_runs_is_exactly_zero():
    rng = np.random.default_rng(0)
    recs = _records([(list(rng.normal(size=2)), int(rng.integers(2))) for _ in range(200)])
    d = sft_report.paired_difference(recs, recs, "ece", draws=50)
    assert d["diff"] == 0.0 and d["ci95"] == [0.0, 0.0] and not d["differs"]


def test_paired_difference_detects_a_more_confident_model():
    rng = np.random.default_rng(1)
    base = []
    sharp = []
    for _ in range(400):
        y = int(rng.integers(2))
        margin = rng.normal(0.2, 0.5)  # weakly informative scores
        s = [margin, 0.0] if y == 0 else [0.0, margin]
        base.append((s, y))
        sharp.append(([8 * v for v in s], y))  # same ranking, far more confident
    d = sft_report.paired_difference(_records(sharp), _records(base), "ece", draws=200)
    acc = sft_report.paired_difference(_records(sharp), _records(base), "accuracy", draws=50)
    assert d["diff"] > 0.1 and d["differs"]
    assert acc["diff"] == 0.0


def _committed(root: Path, evals: dict[str, list[dict]], runs: tuple[str, ...] = ()) -> Path:
    """A results folder as a report commits it: records/evals/<unit>/, samples/<unit>.gz."""
    import gzip

    for unit, rows in evals.items():
        rec = root / "records" / "evals" / unit
        rec.mkdir(parents=True)
        (rec / "done.json").write_text(json.dumps({"eval_s": 1.0}))
        (rec / "summary.json").write_text("{}")
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        (root / "samples").mkdir(exist_ok=True)
        (root / "samples" / f"{unit}.jsonl.gz").write_bytes(gzip.compress(body))
    for run in runs:
        (root / "records" / "runs" / run).mkdir(parents=True)
        (root / "records" / "runs" / run / "done.json").write_text(json.dumps({"steps": 564}))
        (root / "records" / "runs" / run / "metrics.jsonl").write_text('{"step": 1}\n')
    return root


def test_restore_units_rebuilds_finished_units_and_their_lost_evaluations_are_left_out(tmp_path):
    import restore_units as ru

    rows = [{"task": "arc_easy", "id": "1", "choice_logprobs": [-1.0, -2.0], "label": 0}]
    s1 = sc.SFTRun(0.0, 1, lr=8e-5, epochs=3).name(8e-5)
    s2 = sc.SFTRun(0.05, 1, lr=8e-5, epochs=3).name(8e-5)
    control = _committed(
        tmp_path / "control",
        {"base__trained": rows, "base__plain": rows, f"{s1}__trained": rows, f"{s1}__plain": rows},
    )
    claim2 = _committed(tmp_path / "claim2", {f"{s2}__trained": rows}, runs=(s2,))
    work = tmp_path / "work"
    ru.restore(control, ["base", s1], work)
    ru.restore(claim2, [s2], work)
    # evaluations come back whole, with their samples journal
    got = [json.loads(x) for x in (work / "evals" / f"{s2}__trained" / "samples.jsonl").open()]
    assert got == rows
    # the committed training records of claim 2's run; a marker for the control's (no records)
    assert json.loads((work / "runs" / s2 / "done.json").read_text()) == {"steps": 564}
    assert "weights not kept" in (work / "runs" / s1 / "done.json").read_text()
    for folder in (work / "runs" / s1, work / "runs" / s2, work / "evals" / "base__plain"):
        assert (folder / ru.RESTORED).exists()
    exp = sc.Experiment(sc.PROFILES["claim2"], work, [], "cpu")
    names = {u.name: u for u in exp.units()}
    assert names[f"train/{s1}"].done() and names[f"eval/{s1}/plain"].done()
    assert names[f"train/{s2}"].done() and names[f"eval/{s2}/trained"].done()
    # s2's plain evaluation was never run and its weights are gone: it is not a pending unit
    assert f"eval/{s2}/plain" not in names
    s3 = sc.SFTRun(0.1, 1, lr=8e-5, epochs=3).name(8e-5)
    assert not names[f"train/{s3}"].done() and f"eval/{s3}/plain" in names
    with pytest.raises(SystemExit, match="no committed evaluations"):
        ru.restore(control, ["nothing_here"], tmp_path / "w2")


def test_evaluations_are_estimated_per_format(tmp_path):
    def unit(name: str, kind: str, secs: float | None) -> sc.Unit:
        folder = tmp_path / name.replace("/", "_")
        folder.mkdir()
        if secs is not None:
            (folder / sc.DONE).write_text(json.dumps({"unit_s": secs}))
        return sc.Unit(name, kind, folder, lambda: {})

    done = [unit("eval/a/trained", "eval", 80.0), unit("eval/a/plain", "eval", 21.0)]
    plain, trained = unit("eval/b/plain", "eval", None), unit("eval/b/trained", "eval", None)
    single = unit("eval/c", "eval", None)  # one-format profiles: the kind's timings
    timed = sc._past_timings(done)
    prof = sc.PROFILES["claim2"]
    assert sc._estimate(plain, timed, prof) == pytest.approx(21.0 * 1.1)
    assert sc._estimate(trained, timed, prof) == pytest.approx(80.0 * 1.1)
    assert sc._estimate(single, timed, prof) == pytest.approx(80.0 * 1.1)


def test_claim3_plan_scores_the_base_under_each_subset_and_trains_the_primary_runs_first(
    tmp_path,
):
    from calibrated_lm.models import head_subset as HS

    prof = sc.PROFILES["claim3"]
    for v, path in sc.CLAIM3_SUBSETS.items():  # the committed subsets, of gemma's 262,144
        subset = HS.load(path.parent)
        assert subset is not None and subset.size == v and subset.vocab_size == 262144
    names = [u.name for u in sc.Experiment(prof, tmp_path, [], "cpu").units()]
    for v in (65536, 24576):
        assert f"eval/base_V{v}/trained" in names and f"eval/base_V{v}/plain" in names
    trains = [n for n in names if n.startswith("train/")]
    assert trains[:2] == [
        "train/sft_lr8e-05_ep3_eps0_V24576_s1",
        "train/sft_lr8e-05_ep3_eps0.1_V24576_s1",
    ]
    assert "train/sft_lr8e-05_ep3_eps0.1_T0.5_s2" in trains
    # V' = 262,144 is claim 2's runs: not trained again here.
    assert not any("V" not in n and "T0.5" not in n and "C32" not in n for n in trains)
    run = prof.runs[0]
    from calibrated_lm.training.loop import TrainConfig

    line = sc._train_cli(
        TrainConfig(model="m", data="d", output="o", head_subset=str(sc.CLAIM3_SUBSETS[run.vocab]))
    )
    assert f"--head-subset {sc.CLAIM3_SUBSETS[24576]}" in line


def test_claim3_scores_restricted_runs_skipping_uncovered_and_remedies_also_applied(
    tmp_path, monkeypatch
):
    """Every evaluation under a head subset (the base's, and a run trained with one) leaves out
    the questions the subset cannot score; a remedy run is scored as saved and, in a
    ``trained_applied`` unit, with its training T or C applied at scoring time; the command line
    written beside each evaluation says so."""
    prof = sc.PROFILES["claim3"]
    exp = sc.Experiment(prof, tmp_path, [], "cpu")
    units = {u.name: u for u in exp.units()}
    applied = [n for n in units if n.endswith("/trained_applied")]
    # Only remedy runs (T 0.5 or C 32) get the applied format: 2 remedies x 2 eps x 2 seeds.
    assert len(applied) == 8 and all(("T0.5" in n) != ("C32" in n) for n in applied)
    assert "eval/base/trained_applied" not in units

    seen = []

    def fake_run_eval(cfg):
        seen.append(cfg)
        return {"protocol": {"timing": {}}}

    import calibrated_lm.evaluation.runner as R

    monkeypatch.setattr(R, "run_eval", fake_run_eval)
    units["eval/base_V24576/trained"].action()
    units["eval/sft_lr8e-05_ep3_eps0.1_V24576_s1/trained"].action()
    units["eval/sft_lr8e-05_ep3_eps0_T0.5_s1/trained"].action()
    units["eval/sft_lr8e-05_ep3_eps0_T0.5_s1/trained_applied"].action()
    units["eval/sft_lr8e-05_ep3_eps0.1_C32_s2/trained_applied"].action()
    base_v, run_v, as_saved, t_applied, c_applied = seen
    assert base_v.uncovered == "skip" and base_v.head_subset == str(sc.CLAIM3_SUBSETS[24576])
    # The trained run's folder carries its own head_subset.json: skip, no explicit subset.
    assert run_v.uncovered == "skip" and run_v.head_subset is None
    assert as_saved.uncovered == "error" and as_saved.logit_temperature is None
    assert (t_applied.logit_temperature, t_applied.logit_softcap) == (0.5, None)
    assert (c_applied.logit_temperature, c_applied.logit_softcap) == (None, 32.0)
    assert t_applied.chat_template == as_saved.chat_template != "off"
    assert t_applied.tasks == as_saved.tasks
    folder = tmp_path / "evals" / "sft_lr8e-05_ep3_eps0_T0.5_s1__trained_applied"
    assert "--logit-temperature 0.5" in (folder / "command.txt").read_text()
    line = (tmp_path / "evals" / "base_V24576__trained" / "command.txt").read_text()
    assert "--uncovered skip" in line and "--head-subset" in line


def _fake_training(monkeypatch, calls: list[bool]) -> None:
    """train() as the loop behaves at its edges: it refuses to overwrite a finished final/, and
    otherwise writes one. Held-out stats and the tokenizer copy are stubbed out."""
    from calibrated_lm.training import loop

    def fake_train(cfg):
        calls.append(cfg.resume)
        final = Path(cfg.output) / "final"
        if final.exists():
            raise AssertionError(f"train() would refuse: {final} exists")
        final.mkdir(parents=True)
        (final / "weights.txt").write_text("new")
        return {"steps": 3, "last": {"loss": 1.0}, "template": "tulu"}

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(sc, "heldout_stats", lambda *a, **k: {"nll": 1.0})
    monkeypatch.setattr(sc, "_copy_base_tokenizer", lambda base, folder: None)


def test_train_unit_removes_a_stale_final_only_when_there_is_nothing_to_resume(
    tmp_path, monkeypatch
):
    calls: list[bool] = []
    _fake_training(monkeypatch, calls)
    exp = sc.Experiment(sc.PROFILES["claim3"], tmp_path, [], "cpu")
    run = sc.SFTRun(0.0, 1, lr=8e-5, epochs=3)
    out = tmp_path / "runs" / run.name(8e-5)
    # An attempt stopped after its checkpoints were removed and before done.json: final/ is
    # left, nothing to resume. The unit trains again instead of stopping on train()'s refusal.
    (out / "final").mkdir(parents=True)
    (out / "final" / "weights.txt").write_text("old")
    result = exp._train(run, 8e-5)
    assert calls == [False] and result["steps"] == 3
    assert (out / "final" / "weights.txt").read_text() == "new"
    assert (out / "heldout.json").exists()
    # A run with a checkpoint resumes: its folder is left as it is (here the fake's refusal
    # shows that final/ was not removed first).
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    with pytest.raises(AssertionError, match="would refuse"):
        exp._train(run, 8e-5)
    assert calls == [False, True]
    assert (out / "final" / "weights.txt").read_text() == "new"
