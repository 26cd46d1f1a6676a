"""The train loop: kill-and-resume exactness, extension without repeated steps, outputs, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers_train import RECORDS, logged, params, small_cfg, write_setup  # noqa: F401

from calibrated_lm.errors import UserError
from calibrated_lm.training.loop import TrainConfig, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_setup(tmp_path_factory.mktemp("train"))


def _cfg(setup, out: str, **kw) -> TrainConfig:
    return small_cfg(*setup, out, **{"max_steps": 6, **kw})


_params, _logged = params, logged


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(setup):
    ref = train(_cfg(setup, "ref"))
    out = Path(_cfg(setup, "ref").output)
    rows = _logged(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "tokens_per_s", "step_s", "confidence", "accuracy", "entropy"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert all(r["step_s"] > 0 for r in rows)
    assert 0 < rows[-1]["confidence"] <= 1 and 0 <= rows[-1]["accuracy"] <= 1
    assert rows[-1]["loss"] < rows[0]["loss"]

    class Killed(Exception):
        pass

    def kill_after_step_5(record):
        if record["step"] == 5:  # checkpoint 4 exists; step 5 is logged but lost
            raise Killed

    with pytest.raises(Killed):
        train(_cfg(setup, "killed"), on_step=kill_after_step_5)
    killed = Path(_cfg(setup, "killed").output)
    assert not (killed / "final").exists()
    resumed = train(_cfg(setup, "killed", resume=True))
    assert resumed["last"]["loss"] == pytest.approx(ref["last"]["loss"], rel=1e-6)
    assert [r["step"] for r in _logged(killed)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in _logged(killed)] == pytest.approx(
        [r["loss"] for r in rows], rel=1e-6
    )
    a, b = _params(out / "final"), _params(killed / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)

    # A finished run resumed with a larger --max-steps trains on without repeating steps.
    more = train(_cfg(setup, "ref", resume=True, max_steps=8))
    assert more["steps"] == 8
    assert [r["step"] for r in _logged(out)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    # ... and the final folder is a save_pretrained model that transformers loads.
    moved = _params(out / "final")
    assert any(not torch.equal(moved[k], a[k]) for k in a)


def test_existing_run_needs_resume_and_resume_needs_same_data_order(setup):
    cfg = _cfg(setup, "guard", max_steps=2)
    train(cfg)
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg)
    with pytest.raises(UserError, match="batch_size"):
        train(replace(cfg, resume=True, batch_size=3))
    with pytest.raises(UserError, match="no checkpoint"):
        train(_cfg(setup, "nothing", resume=True))


def test_checkpoint_from_before_length_grouping_resumes_ungrouped(setup):
    from calibrated_lm.training.checkpoint import STATE_FILE, list_checkpoints

    cfg = _cfg(setup, "legacy", max_steps=2, save_every=1, group_by_length=False)
    train(cfg)
    state_file = list_checkpoints(Path(cfg.output))[-1] / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["config"]["group_by_length"]  # as written before the option existed
    state_file.write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"group_by_length \(False -> True\)"):
        train(replace(cfg, resume=True, max_steps=3, group_by_length=True))
    assert train(replace(cfg, resume=True, max_steps=3))["steps"] == 3


def _manual_grad_norm(setup, reduction: str) -> float:
    """Gradient norm of step 1's loss, computed here from the definitions in loop.py."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrated_lm import patch_model
    from calibrated_lm.training.batching import StepPlan, collate
    from calibrated_lm.training.data import load_dataset

    _, model_dir, data_path = setup
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = patch_model(AutoModelForCausalLM.from_pretrained(model_dir), label_smoothing=0.1)
    data = load_dataset(data_path, tok, max_seq_len=64)
    lengths = [len(ex.input_ids) for ex in data.examples]
    plan = StepPlan(len(data.examples), 2, 2, seed=42, lengths=lengths)  # train()'s default
    batches = [
        collate([data.examples[i] for i in b], tok.eos_token_id) for b in plan.step_batches(0)
    ]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert len(set(counts)) > 1  # unequal micro-batches: the two reductions must differ
    for b, n in zip(batches, counts):
        total = model(**b, calibrated_lm_reduction="sum").loss
        (total / sum(counts) if reduction == "sum" else total / n / len(batches)).backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


def test_sum_and_mean_reductions_follow_their_definitions(setup):
    """sum: one token mean over the whole step; mean: a mean of micro-batch means."""
    norms = {}
    for reduction in ("sum", "mean"):
        run = train(_cfg(setup, reduction, max_steps=1, reduction=reduction))
        norms[reduction] = run["last"]["grad_norm"]
        assert norms[reduction] == pytest.approx(_manual_grad_norm(setup, reduction), rel=1e-4)
    assert norms["sum"] != pytest.approx(norms["mean"], rel=1e-3)
    with pytest.raises(UserError, match="reduction"):
        train(_cfg(setup, "bad", reduction="median"))


def test_out_of_memory_is_reported_with_figures(setup, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "__call__", boom)
    with pytest.raises(
        UserError, match=r"out of memory at step 1 .*batch size 2.*parameters .* GiB"
    ):
        train(_cfg(setup, "oom"))
    out = Path(_cfg(setup, "oom").output)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())

    def host_boom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")

    monkeypatch.setattr(LlamaForCausalLM, "__call__", host_boom)
    with pytest.raises(UserError, match=r"out of memory at step 1 .*host memory"):
        train(_cfg(setup, "oom-host"))


def test_cli_train_runs_and_reports(setup, capsys):
    import argparse

    from calibrated_lm.training import command

    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    root, model_dir, data = setup
    args = parser.parse_args(
        [
            "train",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output",
            str(root / "cli"),
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--max-steps",
            "2",
            "--max-seq-len",
            "64",
            "--label-smoothing",
            "0.1",
            "--temperature",
            "1.5",
            "--gradient-checkpointing",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "dropped: 0" in out and "trained 2 steps" in out
    assert (root / "cli" / "final" / "config.json").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Multi-process ranks: one xdist worker runs all of them (`--dist loadgroup`), so two rank sets
# never share the two cores at once.
@pytest.mark.xdist_group("ranks")
@pytest.mark.slow
def test_fsdp2_two_gloo_ranks_match_one_rank(setup, tmp_path):
    """torchrun with 2 CPU ranks (FSDP2 fully_shard over gloo) vs 1 rank with 2x accumulation,
    through an epoch's last step (7 micro-batches, 2 per step: step 4 has one, and the second
    rank runs a weight-0 copy so that both ranks join FSDP's collectives)."""
    root, model_dir, data = setup
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from calibrated_lm.training.loop import TrainConfig, train\n"
        f"cfg = TrainConfig(model={str(model_dir)!r}, data={str(data)!r}, output=sys.argv[1],\n"
        "    batch_size=2, grad_accum=int(sys.argv[2]), max_seq_len=64, max_steps=4, lr=3e-3,\n"
        "    save_every=1, progress=False, device='cpu')\n"
        "train(cfg)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(script),
        str(two),
        "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    train(
        TrainConfig(
            model=str(model_dir),
            data=str(data),
            output=str(one),
            batch_size=2,
            grad_accum=2,
            max_seq_len=64,
            max_steps=4,
            lr=3e-3,
            save_every=1,
            progress=False,
            device="cpu",
        )
    )
    assert [r["loss"] for r in _logged(two)] == pytest.approx(
        [r["loss"] for r in _logged(one)], rel=1e-5
    )
    a, b = _params(one / "final"), _params(two / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.xdist_group("ranks")
@pytest.mark.slow
def test_fsdp2_checkpoints_resume_and_evaluate_like_one_rank(setup, tmp_path):
    """2 gloo ranks stopped after step 2 and resumed: the checkpoint gathered on rank 0 loads
    with from_pretrained, the resume ends like one rank's uninterrupted run, and the held-out
    figures (3 micro-batches over 2 ranks: rank 1 runs a weight-0 copy) equal one rank's."""
    root, model_dir, data = setup
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:5]))
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from calibrated_lm.training.loop import TrainConfig, train\n"
        f"cfg = TrainConfig(model={str(model_dir)!r}, data={str(data)!r}, output=sys.argv[1],\n"
        "    batch_size=2, grad_accum=int(sys.argv[2]), max_seq_len=64, max_steps=int(sys.argv[3]),\n"
        f"    lr=3e-3, save_every=2, progress=False, device='cpu', eval_data={str(held)!r},\n"
        "    eval_every=2, resume=len(sys.argv) > 4)\n"
        "train(cfg)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    for steps, *resume in ((2,), (4, "resume")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), str(script), str(two), "1", str(steps),
               *resume]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    train(
        TrainConfig(model=str(model_dir), data=str(data), output=str(one), batch_size=2,
                    grad_accum=2, max_seq_len=64, max_steps=4, lr=3e-3, save_every=2,
                    progress=False, device="cpu", eval_data=str(held), eval_every=2)
    )  # fmt: skip
    got, want = _logged(two), _logged(one)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    for g, w in zip(got, want):
        assert ("eval_ece" in g) == ("eval_ece" in w) == (g["step"] % 2 == 0)
        for key in ("eval_loss", "eval_confidence", "eval_accuracy", "eval_ece", "eval_tokens"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["step"], key)
    for folder in ("checkpoints/step-000002", "final"):
        a, b = _params(one / folder), _params(two / folder)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{folder} {k}")


RANK_SCRIPT = """
import sys
import torch.distributed as dist
from calibrated_lm.errors import UserError
from calibrated_lm.training.loop import TrainConfig, train

data, output, owner, model = sys.argv[1:5]
if owner == "caller":
    dist.init_process_group(backend="gloo")
try:
    train(TrainConfig(model=model, data=data, output=output, max_steps=1, batch_size=2,
                      max_seq_len=64, progress=False, device="cpu"))
    print("finished | group alive:", dist.is_initialized())
except UserError as exc:
    print("stopped:", exc, "| group alive:", dist.is_initialized())
    sys.exit(3)
finally:
    if dist.is_initialized():  # the caller's group is the caller's to leave
        dist.destroy_process_group()
"""


@pytest.mark.xdist_group("ranks")
@pytest.mark.parametrize("owner", ["train", "caller"])
@pytest.mark.parametrize("ends", ["finished", "stopped"])
def test_two_ranks_leave_only_a_process_group_train_created(setup, tmp_path, owner, ends):
    """Two gloo ranks that finish, or stop with a message because their model cannot be
    loaded (after the process group exists): when train() returns or raises, the group it
    created is gone (a rank that exited with it alive could abort at exit, rc -6), and a
    group the caller created is still the caller's."""
    _, model_dir, data = setup
    model = model_dir if ends == "finished" else tmp_path / "no-such-model"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")  # fmt: skip
        cmd = [sys.executable, "-c", RANK_SCRIPT, str(data), str(tmp_path / "out"), owner,
               str(model)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))  # fmt: skip
    # Every rank's output before any check: where one rank fails first (a reset connection on
    # its peer), the other's log holds the cause (CI at 6ffb4c1 showed only rank 0's).
    texts = [p.communicate(timeout=180)[0].decode() for p in procs]
    logs = "\n".join(f"--- rank {r} (exit {p.returncode}):\n{t[-1500:]}"
                     for r, (p, t) in enumerate(zip(procs, texts, strict=True)))  # fmt: skip
    for p, text in zip(procs, texts, strict=True):
        assert p.returncode == (0 if ends == "finished" else 3), logs
        assert ends in text and (ends == "finished" or "no-such-model" in text), logs
        assert f"group alive: {owner == 'caller'}" in text, logs
    if ends == "finished":
        assert (tmp_path / "out" / "final" / "config.json").exists()


def test_bad_data_fails_before_the_model_is_loaded(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"question": 1}\n')
    cfg = TrainConfig(
        model=str(tmp_path / "no-such-model"),
        data=str(bad),
        output=str(tmp_path / "o"),
        progress=False,
        device="cpu",
    )
    with pytest.raises(UserError, match="record at line 2: unknown record layout"):
        train(cfg)


class _NanGrad(torch.autograd.Function):
    """Identity in forward, NaN gradient in backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _poison_calls(monkeypatch, poisoned):
    """Make the model's loss have a NaN gradient on the given (0-based) forward calls."""
    from transformers import LlamaForCausalLM

    real = LlamaForCausalLM.__call__
    calls = {"n": 0}

    def call(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if calls["n"] in poisoned:
            out.loss = _NanGrad.apply(out.loss)
        calls["n"] += 1
        return out

    monkeypatch.setattr(LlamaForCausalLM, "__call__", call)


def test_non_finite_gradient_skips_the_step_and_keeps_parameters_finite(setup, monkeypatch):
    # grad_accum=2: calls 2 and 3 are the two micro-batches of step 2.
    _poison_calls(monkeypatch, {2})
    train(_cfg(setup, "nan-once", save_every=0))
    out = Path(_cfg(setup, "nan-once").output)
    rows = _logged(out)
    assert [r["skipped"] for r in rows] == [False, True, False, False, False, False]
    assert rows[1]["grad_norm"] is None and all(math.isfinite(r["loss"]) for r in rows)
    # The skipped step names where the non-finite gradients are (here: everywhere, capped at 5).
    params = _params(out / "final")
    assert len(rows[1]["nonfinite_grads"]) == 5
    assert set(rows[1]["nonfinite_grads"]) <= set(params)
    assert not any("nonfinite_grads" in r for i, r in enumerate(rows) if i != 1)
    assert all(torch.isfinite(v).all() for v in params.values())


def test_repeated_non_finite_gradients_abort_with_a_sentence(setup, monkeypatch):
    _poison_calls(monkeypatch, set(range(100)))
    with pytest.raises(UserError, match=r"training diverged: .* 5 optimizer steps in a row"):
        train(_cfg(setup, "nan-always", max_steps=8, save_every=0))


def test_swap_in_replaces_a_folder_and_leaves_nothing_aside(tmp_path):
    from calibrated_lm.training.checkpoint import swap_in

    final, tmp = tmp_path / "final", tmp_path / ".tmp-final"
    for folder, text in ((final, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / "weights").write_text(text)
    swap_in(tmp, final)
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_length_grouping_changes_micro_batches_not_the_sum_reduced_training(setup):
    """Same examples per step and a token-summed loss: the same parameters either way."""
    a = train(_cfg(setup, "grouped", max_steps=3, save_every=0))
    b = train(_cfg(setup, "drawn", max_steps=3, save_every=0, group_by_length=False))
    pa, pb = _params(Path(a["final"])), _params(Path(b["final"]))
    assert max(float((pa[k] - pb[k]).abs().max()) for k in pa) < 1e-5
    assert a["last"]["loss"] == pytest.approx(b["last"]["loss"], rel=1e-5)


def test_sigterm_checkpoints_the_current_step_and_resume_matches(setup):
    """A real SIGTERM mid-run (what `timeout` and schedulers send) ends the run after that
    step with a checkpoint of it, even off the --save-every grid; resuming ends like a run
    never stopped."""
    import signal

    from calibrated_lm.training.stop import TrainingStopped

    ref = train(_cfg(setup, "ref_term", save_every=0))

    def term_at_step_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped) as info:
        train(_cfg(setup, "termed", save_every=4), on_step=term_at_step_3)
    assert info.value.step == 3 and info.value.signum == signal.SIGTERM
    assert "SIGTERM" in str(info.value) and "--resume" in str(info.value)
    out = Path(_cfg(setup, "termed").output)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    assert not (out / "final").exists()
    # the handler is gone again: the default SIGTERM action is back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed = train(_cfg(setup, "termed", save_every=4, resume=True))
    assert resumed["last"]["loss"] == pytest.approx(ref["last"]["loss"], rel=1e-6)
    a, b = _params(Path(_cfg(setup, "ref_term").output) / "final"), _params(out / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_train_refuses_an_eval_run_folder(setup, tmp_path):
    """train into eval's --output (its run.json): refused before anything is written."""
    cfg = _cfg(setup, "x")
    out = tmp_path / "eval_run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    with pytest.raises(UserError, match="holds a calibrated-lm eval run"):
        train(replace(cfg, output=str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_a_signal_during_the_final_save_waits_for_it(setup, monkeypatch, capsys):
    """SIGINT while the last checkpoint and final/ are written (a Ctrl-C at the end of a run)
    no longer cuts torch.save mid-archive: the save finishes, the run returns, and the
    message names the folder."""
    import signal

    from calibrated_lm.training import loop

    real = loop.save_final

    def interrupted_save(*a, **kw):
        signal.raise_signal(signal.SIGINT)  # delivered while final/ is being written
        return real(*a, **kw)

    monkeypatch.setattr(loop, "save_final", interrupted_save)
    before = signal.getsignal(signal.SIGINT)
    out = train(_cfg(setup, "late_sigint", max_steps=2, save_every=0))
    final = Path(out["final"])
    assert (final / "config.json").is_file() and out["steps"] == 2
    assert "SIGINT came during the final save" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before
    assert sorted(p.name for p in (final.parent / "checkpoints").iterdir()) == ["step-000002"]


@pytest.mark.parametrize("via", ["direct", "gnu-timeout"])
def test_cli_train_stopped_by_sigterm_says_so_and_exits_143(setup, tmp_path, via):
    """End to end: `calibrated-lm train` in its own process, SIGTERM once it has logged a
    step: exit status 128 + 15, a sentence naming the checkpoint, and that checkpoint.

    ``gnu-timeout`` runs it as the device runner does, under ``timeout --preserve-status``, and
    sends SIGTERM to timeout, which relays it as it does when its time is up: to the child,
    then to its whole process group, so the run gets it twice (the suspected cause of session
    25's lost stop checkpoint; on the CPU the two deliveries coalesce, and the stop code from
    before f29d4a2 passes too). A run killed by the signal would end by it (timeout re-raises
    it: -15 here), not with its own 143."""
    import shutil
    import signal
    import time

    if via == "gnu-timeout" and shutil.which("timeout") is None:
        pytest.skip("GNU timeout is not installed")
    root, model_dir, data = setup
    out = tmp_path / "cli_term"
    wrap = ["timeout", "--preserve-status", "1000"] if via == "gnu-timeout" else []
    cmd = [*wrap, sys.executable, "-c", "import sys; from calibrated_lm.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "train", "--model", str(model_dir), "--data",
           str(data), "--output", str(out), "--batch-size", "2", "--grad-accum", "1",
           "--max-steps", "100000", "--max-seq-len", "64", "--save-every", "0",
           "--no-progress", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # A new session: timeout's group kill stays inside timeout's own group, away from pytest.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no step logged within 120 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (stdout, stderr)
    assert "stopped: stopped by SIGTERM after step" in stderr and "Traceback" not in stderr
    steps = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0].startswith("step-")
    step = int(steps[0].split("-")[1])
    assert f"after step {step} of 100000" in stderr


def test_compile_trains_like_eager(setup, monkeypatch):
    """--compile compiles the decoder layers and changes no number (aot_eager here: the graph
    capture without code generation, so the test stays fast on a CPU)."""
    from calibrated_lm.models import compile as C

    real = C.compile_decoder
    calls = []

    def traced(model, **kw):
        calls.append(real(model, backend="aot_eager"))
        return calls[-1]

    monkeypatch.setattr(C, "compile_decoder", traced)
    eager = train(_cfg(setup, "eager_c", max_steps=3, save_every=0))
    compiled = train(_cfg(setup, "compiled_c", max_steps=3, save_every=0, compile=True))
    assert calls == [2]  # the tiny model's two decoder layers
    assert compiled["last"]["loss"] == pytest.approx(eager["last"]["loss"], rel=1e-5)
    root = Path(_cfg(setup, "x").output).parent
    a, b = _params(root / "eager_c" / "final"), _params(root / "compiled_c" / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_compile_with_deepspeed_is_refused_before_loading(setup):
    with pytest.raises(UserError, match="--compile does not work with --deepspeed"):
        train(_cfg(setup, "nope", compile=True, deepspeed="ds.json"))


def test_a_finished_model_is_kept_and_resume_knows_its_files_and_model(setup, tmp_path):
    """Review of 2026-12-07: a new run into a folder whose checkpoints were removed replaced
    its final/ and metrics.jsonl without a word; --resume refused the same data or model
    spelled another way, and took another model's checkpoint with a page of missing keys."""
    import shutil

    root, model_dir, data = setup
    cfg = _cfg(setup, "kept", max_steps=2)
    train(cfg)
    # The same files, spelled with "./" in them: resumed (one more step), not refused.
    respelled = replace(
        cfg,
        resume=True,
        max_steps=3,
        data=f"{data.parent}/./{data.name}",
        model=f"{model_dir.parent}/./{model_dir.name}",
    )
    assert train(respelled)["steps"] == 3
    # Asked for fewer steps than the checkpoint holds: nothing trained, its own step reported.
    result = train(replace(cfg, resume=True, max_steps=1))
    assert not result["last"]
    assert result["steps"] == 3
    # Checkpoints removed, final/ kept: a new run is refused and loses nothing.
    out = Path(cfg.output)
    shutil.rmtree(out / "checkpoints")
    lines = (out / "metrics.jsonl").read_text()
    weights = _params(out / "final")
    with pytest.raises(UserError, match="already holds a finished run's model"):
        train(cfg)
    assert (out / "metrics.jsonl").read_text() == lines
    after = _params(out / "final")
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in after)
    # Another model (one layer fewer) now at the run's --model path: one sentence, before
    # any weight is loaded into it.
    swapped = tmp_path / "model"
    shutil.copytree(model_dir, swapped)
    cfg2 = _cfg(setup, "kept2", max_steps=2, model=str(swapped))
    train(cfg2)
    conf = json.loads((swapped / "config.json").read_text())
    conf["num_hidden_layers"] = 1
    (swapped / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match=r"does not fit the model --model loads \(0 weight"):
        train(replace(cfg2, resume=True, max_steps=3))


def test_progress_false_prints_no_tokenizing_bar(setup, capsys):
    train(_cfg(setup, "quiet", max_steps=1, progress=False))
    assert "tokenizing" not in capsys.readouterr().err
    train(_cfg(setup, "loud", max_steps=1, progress=True))
    assert "tokenizing" in capsys.readouterr().err
