"""``calibrated-lm train`` arguments: bad values refused up front, resumes that would not
continue the same run refused, damaged metrics and checkpoints survived."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.cli import main
from calibrated_lm.errors import UserError
from calibrated_lm.training import checkpoint as C
from calibrated_lm.training.config_checks import validate_config
from calibrated_lm.training.loop import TrainConfig, train

NAN, INF = math.nan, math.inf

# (field, bad value, what the message must say)
BAD_VALUES = [
    ("max_grad_norm", -1.0, r"--max-grad-norm must be a positive .*or 0 for no clipping.*uphill"),
    ("max_grad_norm", NAN, r"--max-grad-norm .* got nan"),
    ("max_grad_norm", INF, r"--max-grad-norm .* got inf"),
    ("epochs", 0, r"--epochs must be a positive number .* got 0"),
    ("epochs", -1.0, r"--epochs .* got -1.0"),
    ("epochs", NAN, r"--epochs .* got nan"),
    ("max_steps", 0, r"--max-steps must be an integer of at least 1 .* got 0"),
    ("max_steps", -3, r"--max-steps .* got -3"),
    ("max_steps", 2.5, r"--max-steps .* got 2.5"),
    ("warmup_ratio", -0.1, r"--warmup-ratio must be a share of the steps between 0 and 1"),
    ("warmup_ratio", 1.5, r"--warmup-ratio .* got 1.5"),
    ("warmup_ratio", NAN, r"--warmup-ratio .* got nan"),
    ("label_smoothing", -0.1, r"--label-smoothing must be at least 0 and below 1"),
    ("label_smoothing", 1.0, r"--label-smoothing .* got 1.0"),
    ("label_smoothing", NAN, r"--label-smoothing .* got nan"),
    ("lr", NAN, r"--lr must be a positive finite learning rate, got nan"),
    ("lr", INF, r"--lr .* got inf"),
    ("lr", 0.0, r"--lr .* got 0.0"),
    ("lr", -1e-5, r"--lr .* got -1e-05"),
    ("temperature", 0.0, r"--temperature must be a positive number .* got 0.0"),
    ("temperature", -1.0, r"--temperature .* got -1.0"),
    ("temperature", NAN, r"--temperature .* got nan"),
    ("softcap", 0.0, r"--softcap must be a positive cap .* got 0.0"),
    ("softcap", -30.0, r"--softcap .* got -30.0"),
    ("softcap", NAN, r"--softcap .* got nan"),
    ("z_loss", -1e-4, r"--z-loss must be a coefficient of at least 0, got -0.0001"),
    ("z_loss", NAN, r"--z-loss .* got nan"),
    ("weight_decay", -0.1, r"--weight-decay must be a coefficient of at least 0"),
    ("log_every", 0, r"--log-every must be an integer of at least 1, got 0"),
    ("save_every", -1, r"--save-every must be an integer of at least 0 .* got -1"),
    ("keep_checkpoints", 0, r"--keep-checkpoints must be an integer of at least 1, got 0"),
    ("batch_size", 0, r"--batch-size must be an integer of at least 1, got 0"),
    ("grad_accum", 0, r"--grad-accum must be an integer of at least 1, got 0"),
    ("max_seq_len", 1, r"--max-seq-len must be an integer of at least 2 .* got 1"),
    ("seed", -1, r"--seed must be an integer between 0 and 4294967295, got -1"),
    ("reduction", "median", r"--reduction must be sum or mean, got 'median'"),
    ("device", "tpu", r"--device must be one of auto, cpu, cuda, cuda:N, mps, got 'tpu'"),
    ("device", "meta", r"--device must be one of .* got 'meta'"),
    ("device", "cuda", r"--device cuda: no CUDA GPU is available on this machine"),
    ("device", "cuda:1", r"--device cuda:1: no CUDA GPU is available"),
    ("device", "mps", r"--device mps: the Apple MPS backend is not available"),
    ("eval_every", -1, r"--eval-every must be an integer of at least 0 .* got -1"),
    ("eval_every", 2.5, r"--eval-every .* got 2.5"),
    ("eval_every", 5, r"--eval-every 5 needs --eval-data FILE"),
    ("eval_data", "", r"--eval-data must be a non-empty path"),
    ("eval_data", 3, r"--eval-data must be a path, got 3"),
    ("report_to", "mlflow", r"--report-to must be none, tensorboard, wandb .* got 'mlflow'"),
    ("report_to", "tensorboard,", r"--report-to .* got 'tensorboard,'"),
    ("report_to", "none,wandb", r"--report-to .* got 'none,wandb'"),
    ("report_to", None, r"--report-to .* got None"),
]


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as seen by the device check: no CUDA GPU, no MPS (whatever it has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _nowhere_cfg(tmp_path: Path, **kw) -> TrainConfig:
    """A config whose model and data do not exist: any load would fail differently."""
    base = dict(
        model=str(tmp_path / "no-such-model"),
        data=str(tmp_path / "no-such-data.jsonl"),
        output=str(tmp_path / "out"),
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_bad_value_is_one_sentence_before_anything_is_touched(
    tmp_path, no_gpu, name, value, message
):
    cfg = _nowhere_cfg(tmp_path, **{name: value})
    with pytest.raises(UserError, match=message) as info:
        train(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()

    # An existing run folder, resumed with the bad value, is left exactly as it was.
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "checkpoints" / "step-000002" / "state.json").write_text('{"step": 2}')
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"st')
    before = _snapshot(out)
    with pytest.raises(UserError, match=message):
        train(replace(cfg, output=str(out), resume=True))
    assert _snapshot(out) == before


def test_cuda_index_beyond_the_visible_gpus_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"--device cuda:3: this machine has 1 CUDA GPU\(s\)"):
        validate_config(_nowhere_cfg(tmp_path, device="cuda:3"))


@pytest.mark.parametrize("clip", [None, 0.0, 0, 0.5, 1.0])
def test_zero_or_none_max_grad_norm_means_no_clipping_and_is_accepted(tmp_path, clip):
    validate_config(_nowhere_cfg(tmp_path, max_grad_norm=clip, max_steps=None, save_every=0))


def test_cli_prints_the_sentence_and_exits_2(tmp_path, capsys):
    code = main(
        ["train", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "o")]
        + ["--max-grad-norm", "-0.5", "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --max-grad-norm must be a positive clipping threshold")
    assert "Traceback" not in err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- resuming

RECORDS = [
    {"instruction": "Which gas do plants take in?", "output": "carbon dioxide"},
    {"prompt": "The capital of France is", "completion": "Paris, on the Seine."},
    {"prompt": "Calibration means", "completion": "confidence matches accuracy"},
    {"instruction": "A planet?", "input": "A. Mars B. Venus", "output": "A. Mars"},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-step run with a checkpoint after every step (all kept)."""
    root = tmp_path_factory.mktemp("args")
    model = build_tiny_lm(root / "model", seed=1)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = TrainConfig(
        model=str(model),
        data=str(data),
        output=str(root / "base"),
        batch_size=2,
        grad_accum=1,
        max_seq_len=48,
        max_steps=3,
        lr=3e-3,
        warmup_ratio=0.0,
        save_every=1,
        keep_checkpoints=3,
        progress=False,
        device="cpu",
    )
    train(cfg)
    return cfg


def _copy(cfg: TrainConfig, tmp_path: Path) -> TrainConfig:
    out = tmp_path / "copy"
    shutil.copytree(cfg.output, out)
    return replace(cfg, output=str(out))


def _steps(out: str) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 1e-3}, r"lr \(0\.003 -> 0\.001\)"),
        ({"label_smoothing": 0.2}, r"label_smoothing \(0\.1 -> 0\.2\)"),
        ({"temperature": 2.0}, r"temperature \(None -> 2\.0\)"),
        ({"softcap": 30.0}, r"softcap \(None -> 30\.0\)"),
        ({"z_loss": 1e-4}, r"z_loss \(0\.0 -> 0\.0001\)"),
        ({"reduction": "mean"}, r"reduction \(sum -> mean\)"),
    ],
)
def test_resume_with_a_changed_objective_is_refused(run, tmp_path, change, message):
    cfg = _copy(run, tmp_path)
    before = _snapshot(Path(cfg.output))
    with pytest.raises(UserError, match=r"--resume: .*would change its objective.*" + message):
        train(replace(cfg, resume=True, max_steps=4, **change))
    assert _snapshot(Path(cfg.output)) == before


def test_resume_with_changed_data_content_is_refused_and_old_checkpoints_warn(
    run, tmp_path, capsys
):
    data = tmp_path / "data.jsonl"
    shutil.copy(run.data, data)
    cfg = replace(run, data=str(data), output=str(tmp_path / "own"), max_steps=1, save_every=0)
    train(cfg)
    state_file = C.list_checkpoints(Path(cfg.output))[-1] / C.STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()

    data.write_text(data.read_text().replace("Paris", "Lyon"))  # same path, other content
    with pytest.raises(UserError, match=r"--resume: the content of .*data\.jsonl changed since"):
        train(replace(cfg, resume=True, max_steps=2))

    # A checkpoint from before fingerprints (and file sizes) resumes, with one note that it
    # cannot check.
    del state["data_sha256"], state["files"]
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert train(replace(cfg, resume=True, max_steps=2))["steps"] == 2
    assert capsys.readouterr().err.count("predates data fingerprints") == 1


def test_torn_last_metrics_line_is_dropped_on_resume(run, tmp_path, capsys):
    cfg = _copy(run, tmp_path)
    with (Path(cfg.output) / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "epoch": 2.0, "lo')  # killed while writing step 4's line
    train(replace(cfg, resume=True, max_steps=4))
    assert [r["step"] for r in _steps(cfg.output)] == [1, 2, 3, 4]
    assert "dropped 1 unreadable (torn) line" in capsys.readouterr().err


def _empty_state(ckpt: Path) -> None:
    (ckpt / C.STATE_FILE).write_text("")


def _torn_state(ckpt: Path) -> None:
    text = (ckpt / C.STATE_FILE).read_text()
    (ckpt / C.STATE_FILE).write_text(text[: len(text) // 2])


def _truncated_model(ckpt: Path) -> None:
    with (ckpt / "model.safetensors").open("r+b") as fh:
        fh.truncate(fh.seek(0, 2) // 2)


def _garbled_header(ckpt: Path) -> None:
    # Same size: only the header check finds out.
    with (ckpt / "model.safetensors").open("r+b") as fh:
        fh.write(b"\0" * 200)


def _unlisted_truncated_model(ckpt: Path) -> None:
    # As a checkpoint from before state.json listed its files, cut short: the header's sizes.
    state = json.loads((ckpt / C.STATE_FILE).read_text())
    del state["files"]
    (ckpt / C.STATE_FILE).write_text(json.dumps(state))
    _truncated_model(ckpt)


def _garbled_tensors(ckpt: Path) -> None:
    # The header parses and the file has the size it describes, but one tensor's shape no
    # longer fits its byte range: only loading the tensors finds out.
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["shape"][0] += 1
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # padded like the original
    assert len(text) == n
    f.write_bytes(raw[:8] + text + raw[8 + n :])


def _no_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()


def _truncated_optimizer(ckpt: Path) -> None:
    with (ckpt / "optimizer.pt").open("r+b") as fh:
        fh.truncate(fh.seek(0, 2) // 2)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_empty_state, "its state.json is empty"),
        (_torn_state, "its state.json is not valid JSON"),
        (_truncated_model, r"its model.safetensors is truncated \(\d+ of \d+ bytes\)"),
        (_garbled_header, r"its model.safetensors is not a complete safetensors file"),
        (_unlisted_truncated_model, r"its model.safetensors is not a complete safetensors file"),
        (_garbled_tensors, r"its model.safetensors cannot be loaded \(SafetensorError"),
        (_no_config, r"its config.json is missing"),
        (_truncated_optimizer, r"its optimizer.pt is truncated"),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    run, tmp_path, capsys, damage, why
):
    cfg = _copy(run, tmp_path)
    damage(Path(cfg.output) / "checkpoints" / "step-000003")
    result = train(replace(cfg, resume=True, max_steps=3))
    err = capsys.readouterr().err
    assert re.search(f"--resume: skipping checkpoint step-000003: {why}", err), err
    assert "resuming from the newest intact checkpoint, step-000002" in err
    # Step 3 is trained again from step 2's checkpoint, exactly as the first time.
    assert result["steps"] == 3
    assert [r["step"] for r in _steps(cfg.output)] == [1, 2, 3]
    assert _steps(cfg.output)[-1]["loss"] == pytest.approx(_steps(run.output)[-1]["loss"])
    C.inspect_checkpoint(Path(cfg.output) / "checkpoints" / "step-000003")  # rewritten whole


def test_no_intact_checkpoint_is_a_sentence(run, tmp_path):
    cfg = _copy(run, tmp_path)
    for ckpt in C.list_checkpoints(Path(cfg.output)):
        _empty_state(ckpt)
    with pytest.raises(UserError, match=r"--resume: no intact checkpoint in .*step-000003: its"):
        train(replace(cfg, resume=True))


def _fill_disk_at(monkeypatch, where: str, folder_suffix: str) -> None:
    """Make the write of ``where`` (``optimizer``: torch.save of optimizer.pt; ``weights``:
    save_pretrained's safetensors writer) fail as a full disk does, in folders whose name
    ends with ``folder_suffix``."""
    from safetensors import SafetensorError
    from transformers import LlamaForCausalLM

    if where == "optimizer":
        real_save = C._save
        full = Path("/dev/full")

        def save(obj, path):
            if path.name == "optimizer.pt" and path.parent.name.endswith(folder_suffix):
                if full.is_char_device():  # the kernel's own ENOSPC
                    with full.open("wb") as fh:
                        torch.save(obj, fh)
                        fh.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            real_save(obj, path)

        monkeypatch.setattr(C, "_save", save)
        return
    real_pretrained = LlamaForCausalLM.save_pretrained

    def save_pretrained(self, folder, *args, **kwargs):
        if Path(folder).name.endswith(folder_suffix):
            (Path(folder) / "config.json").write_text("{}")  # a part written before it failed
            # What safetensors' Rust writer raises (not an OSError).
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real_pretrained(self, folder, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", save_pretrained)


@pytest.mark.parametrize("where", ["optimizer", "weights"])
def test_full_disk_during_a_checkpoint_keeps_the_earlier_ones(run, tmp_path, monkeypatch, where):
    _fill_disk_at(monkeypatch, where, "000002")
    cfg = replace(run, output=str(tmp_path / "full"))
    with pytest.raises(
        UserError,
        match=r"no space left on the device while writing checkpoint step-000002 .*"
        r"checkpoints already written are kept \(newest: step-000001\); .*--resume",
    ):
        train(cfg)
    root = Path(cfg.output) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]
    C.inspect_checkpoint(root / "step-000001")


def test_full_disk_while_saving_final_is_a_sentence_and_resume_saves_it(run, tmp_path, monkeypatch):
    _fill_disk_at(monkeypatch, "weights", "-final")
    cfg = replace(run, output=str(tmp_path / "full-final"))
    with pytest.raises(
        UserError,
        match=r"no space left on the device while saving the model to .*final .*"
        r"checkpoints already written are kept \(newest: step-000003\); .*--resume",
    ):
        train(cfg)
    out = Path(cfg.output)
    assert not (out / "final").exists() and not (out / ".tmp-final").exists()
    monkeypatch.undo()
    assert train(replace(cfg, resume=True))["steps"] == 3  # nothing to train: saves final/
    assert (out / "final" / "model.safetensors").is_file()
