"""A rerun with nothing left to score reads no weights: ``open_model`` (tokenizer and config)
describes the model as the loaded one would (class, dtype, device, head rows), the protocol and
the scores stay those of the run that scored them, and a head subset of the wrong vocabulary is
refused before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_eval import eval_config
from helpers_quiz import write_quiz
from helpers_tiny_lm import TINY_SHAPE, build_tiny_lm

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.runner import _config_vocab, run_eval
from calibrated_lm.models import head_subset as hs
from calibrated_lm.models import loading

_cfg = eval_config


def _no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a, **kw):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(loading, "load_weights", refuse)


def _without_timing(summary: dict) -> dict:
    proto = {k: v for k, v in summary["protocol"].items() if k != "timing"}
    return {**{k: v for k, v in summary.items() if not k.startswith("_")}, "protocol": proto}


def test_a_rerun_with_nothing_to_score_reads_no_weights_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = write_quiz(tmp_path / "quiz.jsonl", 8)
    out = tmp_path / "run"
    first = run_eval(_cfg(model, task, out, limit=6))
    samples, run_file = (out / "samples.jsonl").read_bytes(), (out / "run.json").read_bytes()
    assert first["protocol"]["model_class"] == "LlamaForCausalLM"

    _no_weights(monkeypatch)
    again = run_eval(_cfg(model, task, out, limit=6))
    assert again["protocol"]["timing"]["questions_scored_this_run"] == 0
    assert _without_timing(again) == _without_timing(first)
    assert (out / "samples.jsonl").read_bytes() == samples
    assert (out / "run.json").read_bytes() == run_file
    # Re-summarising the stored scores another way is such a rerun too.
    by_tokens = run_eval(_cfg(model, task, out, limit=6, normalization="tokens"))
    assert by_tokens["protocol"]["normalization"] == "tokens"
    # Two questions more: now the weights are needed, and only those two are scored.
    with pytest.raises(AssertionError, match="the weights were read"):
        run_eval(_cfg(model, task, out))
    monkeypatch.undo()
    grown = run_eval(_cfg(model, task, out))
    assert grown["protocol"]["timing"]["questions_scored_this_run"] == 2
    assert json.loads((out / "run.json").read_text()) == json.loads(run_file)


def _gemma2(folder: Path, vocab: int) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, **TINY_SHAPE, head_dim=8)).save_pretrained(
        folder
    )
    return folder


def _gemma3(folder: Path, vocab: int) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab, **TINY_SHAPE, head_dim=8)).save_pretrained(
        folder
    )
    return folder


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_the_opened_model_describes_the_loaded_one(tmp_path: Path, arch: str, dtype: str) -> None:
    folder = build_tiny_lm(tmp_path / "m")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    if arch == "gemma2":
        _gemma2(folder, vocab)
    elif arch == "gemma3":
        _gemma3(folder, vocab)
    opened = loading.open_model(folder, dtype=dtype, device="cpu")
    model = loading.load_weights(opened)
    param = next(model.parameters())
    assert opened.model_class == type(model).__name__
    assert opened.dtype_name == str(param.dtype).replace("torch.", "")
    assert opened.device == str(param.device)
    assert _config_vocab(opened.config) == model.get_output_embeddings().weight.shape[0]
    assert opened.tokenizer is not None and not model.training


def test_a_subset_of_another_vocabulary_is_refused_before_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_lm(tmp_path / "model")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    task = write_quiz(tmp_path / "quiz.jsonl", 4)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    hs.save(hs.HeadSubset(np.arange(3), vocab + 7), wrong)
    _no_weights(monkeypatch)
    with pytest.raises(UserError, match=f"vocabulary of {vocab + 7} tokens, but LlamaForCausal"):
        run_eval(_cfg(model, task, tmp_path / "v", head_subset=str(wrong)))


def _unreadable_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(opened):
        raise UserError(f"could not load model {opened.name}: damaged weights")

    monkeypatch.setattr(loading, "load_weights", fail)


@pytest.mark.parametrize("change", ["overwrite", "edited question"])
def test_weights_that_cannot_be_read_leave_the_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The weights are read only once a run knows it must score, but always before a journal
    is rewritten (a stale record dropped) or an --overwrite deletes the earlier results."""
    model = build_tiny_lm(tmp_path / "model")
    task = write_quiz(tmp_path / "quiz.jsonl", 6)
    out = tmp_path / "run"
    run_eval(_cfg(model, task, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    kw: dict = {}
    if change == "overwrite":
        kw["overwrite"] = True
    else:
        rows = [json.loads(x) for x in task.read_text().splitlines()]
        rows[2]["context"] += " (edited)"
        task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _unreadable_weights(monkeypatch)
    with pytest.raises(UserError, match="damaged weights"):
        run_eval(_cfg(model, task, out, **kw))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    after = run_eval(_cfg(model, task, out, **kw))
    scored = 6 if change == "overwrite" else 1
    assert after["protocol"]["timing"]["questions_scored_this_run"] == scored


def test_naming_the_device_starts_nothing() -> None:
    import torch

    assert loading._device_name("cpu") == "cpu"
    assert loading._device_name("cuda:1") == "cuda:1"
    if not torch.cuda.is_initialized():
        assert loading._device_name("cuda") == "cuda:0"
        assert not torch.cuda.is_initialized()


def test_the_effective_config_is_what_the_loaded_model_keeps() -> None:
    """Llama 4's causal LM is built on its text config, so a rerun without weights reads its
    context length and model type there; Gemma 3's multimodal class keeps the whole config;
    a text model's config is its own."""
    from transformers import Gemma3Config, Llama4Config, LlamaConfig

    llama4 = Llama4Config()
    assert loading.effective_config(llama4) is llama4.get_text_config()
    gemma3 = Gemma3Config()
    assert loading.effective_config(gemma3) is gemma3
    plain = LlamaConfig(**TINY_SHAPE)
    assert loading.effective_config(plain) is plain


def test_a_first_start_that_scored_nothing_does_not_pin_the_folder(tmp_path: Path) -> None:
    """Weights that cannot be read on the first start leave a run.json but no score; once
    the weights are there, the rerun into the same folder scores instead of refusing a
    model whose files "changed since they were scored"."""
    model = build_tiny_lm(tmp_path / "model")
    task = write_quiz(tmp_path / "quiz.jsonl", 4)
    out = tmp_path / "run"
    weights = model / "model.safetensors"
    kept = weights.read_bytes()
    weights.unlink()
    with pytest.raises(UserError):
        run_eval(_cfg(model, task, out))
    assert not any(p.stat().st_size for p in out.glob("samples*.jsonl"))
    weights.write_bytes(kept)
    summary = run_eval(_cfg(model, task, out))
    assert summary["protocol"]["timing"]["questions_scored_this_run"] == 4
    # With scores in the folder, a changed model is refused again.
    weights.write_bytes(kept + b"\0")
    with pytest.raises(UserError, match="changed"):
        run_eval(_cfg(model, task, out))


def test_eval_refuses_a_training_run_folder(tmp_path: Path) -> None:
    """eval into train's --output (metrics.jsonl, checkpoints/), even with --overwrite: its
    start-over would delete eval files only, and the folder is not eval's."""
    model = build_tiny_lm(tmp_path / "model")
    task = write_quiz(tmp_path / "quiz.jsonl", 4)
    out = tmp_path / "train_run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    for overwrite in (False, True):
        with pytest.raises(UserError, match="holds a calibrated-lm train run"):
            run_eval(_cfg(model, task, out, overwrite=overwrite))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]
