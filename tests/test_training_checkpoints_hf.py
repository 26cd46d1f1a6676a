"""Checkpoints in Hugging Face layout: every ``step-N/`` is a ``save_pretrained`` folder holding
the weights of step N (``from_pretrained`` and ``calibrated-lm eval --model`` load it), with the
resume state beside it; resuming stays exact (tied heads included); old pickled checkpoints
(``model.pt``) still resume exactly."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from helpers_train import Killed, kill_at, logged, params, small_cfg, write_setup

from calibrated_lm.cli import main
from calibrated_lm.training import checkpoint as C
from calibrated_lm.training.data import PLAIN_CHAT_TEMPLATE
from calibrated_lm.training.loop import TrainConfig, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_setup(tmp_path_factory.mktemp("hf_ckpt"))


def _cfg(setup, out: str, **kw) -> TrainConfig:
    return small_cfg(*setup, out, **kw)


_Killed, _kill_at = Killed, kill_at


def _assert_sameparams(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_every_checkpoint_loads_with_from_pretrained_and_holds_its_steps_weights(setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model_dir, _ = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    seen = {}

    def snapshot(record):  # called after the step's update, before its checkpoint
        seen[record["step"]] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    cfg = _cfg(setup, "layout", keep_checkpoints=5)
    train(cfg, model_and_tokenizer=(model, tok), on_step=snapshot)
    root = Path(cfg.output) / "checkpoints"
    assert [p.name for p in C.list_checkpoints(Path(cfg.output))] == ["step-000002", "step-000004"]
    for step in (2, 4):
        folder = root / f"step-{step:06d}"
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "optimizer.pt"} <= names
        assert {"rng-rank0.pt", "state.json"} <= names and "model.pt" not in names
        loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        assert loaded.keys() == seen[step].keys()
        for k, v in seen[step].items():
            assert torch.equal(loaded[k], v), (step, k)  # fp32 safetensors: bit for bit
        # The tokenizer is the one trained with, plain template saved as the chat template.
        saved_tok = AutoTokenizer.from_pretrained(folder)
        assert saved_tok.chat_template == PLAIN_CHAT_TEMPLATE
        assert saved_tok("Paris is")["input_ids"] == tok("Paris is")["input_ids"]
        state = json.loads((folder / "state.json").read_text())
        assert state["step"] == step and state["total_steps"] == 4
        # 14 examples, micro-batches of 2, 2 per step: 4 steps per epoch.
        epoch, in_epoch = divmod(step, 4)
        assert state["data_position"] == {
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "steps_per_epoch": 4,
        }
        assert state["weights"] == {
            "format": "safetensors",
            "tied": {},
            "unused": [],
            "extra": None,
        }
        assert set(state["files"]) == names - {"state.json"}
    # The last checkpoint and final/ hold the same model.
    _assert_sameparams(params(Path(cfg.output) / "final"), params(root / "step-000004"))


def test_calibrated_lm_eval_scores_a_checkpoint(setup, tmp_path):
    cfg = _cfg(setup, "evaluated", max_steps=2)
    train(cfg)
    task = tmp_path / "quiz.jsonl"
    task.write_text(
        "".join(
            json.dumps({"context": f"Question {i}: a planet?", "choices": ["Mars", "Paris"],
                        "label": 0, "id": f"q{i}"}) + "\n"
            for i in range(5)
        )
    )  # fmt: skip
    step = Path(cfg.output) / "checkpoints" / "step-000002"
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(step), "--tasks", str(task), "--output", str(out)]
    assert main(argv + ["--device", "cpu", "--no-progress", "--bootstrap", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["quiz"]["n"] == 5


def test_tied_head_checkpoint_resumes_exactly(setup, tmp_path):
    """save_pretrained leaves lm_head.weight out of a tied model's safetensors; state.json
    records it as tied to the embedding, and the resumed run ends like an uninterrupted one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _, model_dir, _ = setup
    config = AutoConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    tied = AutoModelForCausalLM.from_config(config)
    tied_dir = tmp_path / "tied"
    tied.save_pretrained(tied_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tied_dir)
    ref = _cfg(setup, "x", model=str(tied_dir), output=str(tmp_path / "ref"))
    train(ref)
    state = json.loads((Path(ref.output) / "checkpoints/step-000002/state.json").read_text())
    assert state["weights"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    killed = _cfg(setup, "x", model=str(tied_dir), output=str(tmp_path / "killed"))
    with pytest.raises(_Killed):
        train(killed, on_step=_kill_at(3))
    ckpt = C.read_checkpoint(Path(killed.output) / "checkpoints" / "step-000002")
    assert ckpt["model"]["lm_head.weight"] is ckpt["model"]["model.embed_tokens.weight"]
    train(_cfg(setup, "x", model=str(tied_dir), output=killed.output, resume=True))
    assert [r["loss"] for r in logged(Path(killed.output))] == pytest.approx(
        [r["loss"] for r in logged(Path(ref.output))], rel=1e-6
    )
    _assert_sameparams(params(Path(ref.output) / "final"), params(Path(killed.output) / "final"))


def _to_legacy(folder: Path) -> None:
    """Rewrite an HF-layout checkpoint as the code before it wrote them: model.pt (a torch
    pickle of the full state dict), optimizer.pt, rng-rank0.pt and state.json, nothing else."""
    model_sd = C.read_checkpoint(folder)["model"]
    keep = {"optimizer.pt", "rng-rank0.pt", "state.json"}
    for p in folder.iterdir():
        if p.name not in keep:
            p.unlink()
    torch.save(model_sd, folder / "model.pt")
    state = json.loads((folder / "state.json").read_text())
    del state["weights"], state["data_position"]
    state["files"] = {
        p: (folder / p).stat().st_size for p in ("model.pt", *sorted(keep - {"state.json"}))
    }
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def test_pickled_checkpoint_of_before_the_hf_layout_still_resumes_exactly(setup, tmp_path):
    ref = _cfg(setup, "legacy_ref")
    train(ref)
    old = _cfg(setup, "legacy")
    with pytest.raises(_Killed):
        train(old, on_step=_kill_at(3))
    folder = Path(old.output) / "checkpoints" / "step-000002"
    _to_legacy(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.pt", "optimizer.pt", "rng-rank0.pt", "state.json"
    ]  # fmt: skip
    C.inspect_checkpoint(folder)
    result = train(_cfg(setup, "legacy", resume=True))
    assert result["last"]["loss"] == pytest.approx(logged(Path(ref.output))[-1]["loss"], rel=1e-6)
    _assert_sameparams(params(Path(ref.output) / "final"), params(Path(old.output) / "final"))
    # The new checkpoint written after the resume is in the HF layout.
    assert (Path(old.output) / "checkpoints" / "step-000004" / "config.json").is_file()


def test_legacy_checkpoint_is_refused_by_eval_with_a_sentence(setup, tmp_path, capsys):
    cfg = _cfg(setup, "legacy_eval", max_steps=2)
    train(cfg)
    folder = Path(cfg.output) / "checkpoints" / "step-000002"
    _to_legacy(folder)
    task = tmp_path / "quiz.jsonl"
    task.write_text(json.dumps({"context": "Q?", "choices": ["a", "b"], "label": 0}) + "\n")
    code = main(["eval", "--model", str(folder), "--tasks", str(task), "--output",
                 str(tmp_path / "e"), "--device", "cpu", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "has no config.json" in err and "Traceback" not in err
    # A legacy checkpoint whose model.pt is damaged is still found out cheaply.
    with (folder / "model.pt").open("r+b") as fh:
        fh.truncate(100)
    with pytest.raises(C.CheckpointError, match=r"its model.pt is truncated \(100 of \d+ bytes\)"):
        C.inspect_checkpoint(folder)


class _RenamingModel:
    """A stand-in whose save_pretrained, like transformers' checkpoint conversions and tied
    weights, renames one key and leaves two out (one equal to a saved tensor, one not)."""

    def save_pretrained(self, folder, state_dict):
        from safetensors.torch import save_file

        out = {k: v for k, v in state_dict.items() if k not in ("head", "lost")}
        out["renamed.b"] = out.pop("b")
        save_file(out, str(Path(folder) / "model.safetensors"))
        (Path(folder) / "config.json").write_text("{}")


def test_weights_that_save_pretrained_leaves_out_are_kept_for_the_resume(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 3, generator=g)
    state = {"emb": emb, "head": emb.clone(), "b": torch.randn(4, generator=g),
             "lost": torch.randn(2, 2, generator=g)}  # fmt: skip
    optim = {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}
    folder = C.write_checkpoint(
        tmp_path, 7, model_state=state, optim_state=optim, state={"step": 7, "config": {}},
        model=_RenamingModel(),
    )  # fmt: skip
    saved = json.loads((folder / "state.json").read_text())["weights"]
    assert saved == {"format": "safetensors", "tied": {"head": "emb"},
                     "unused": ["renamed.b"], "extra": "resume-extra.pt"}  # fmt: skip
    back = C.read_checkpoint(folder)["model"]
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k
    # The extra file is vouched for like the others.
    (folder / "resume-extra.pt").write_bytes(b"")
    with pytest.raises(C.CheckpointError, match="its resume-extra.pt is truncated"):
        C.read_checkpoint(folder)


def test_model_state_without_a_model_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="needs the model"):
        C.write_checkpoint(tmp_path, 1, model_state={"a": torch.ones(1)}, optim_state=None,
                           state={"step": 1, "config": {}})  # fmt: skip


def test_disk_full_is_recognised_from_oserrors_and_writer_messages():
    from safetensors import SafetensorError

    assert C.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert C.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not C.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert C.is_disk_full(SafetensorError("I/O error: No space left on device (os error 28)"))
    assert not C.is_disk_full(SafetensorError("I/O error: Permission denied (os error 13)"))
    assert not C.is_disk_full(RuntimeError("os error 280"))
