"""train --token-cache: tokenized data read back instead of tokenized again, keyed so that a
change of file, tokenizer, length or tokenizing code never serves stale examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_train import logged, small_cfg, write_setup

from calibrated_lm.training import data as data_module
from calibrated_lm.training import token_cache
from calibrated_lm.training.data import load_dataset
from calibrated_lm.training.loop import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_setup(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="module")
def tok(setup):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(setup[1])


def _same(a, b) -> None:
    assert [(e.input_ids, e.labels) for e in a.examples] == [
        (e.input_ids, e.labels) for e in b.examples
    ]
    assert (a.n_records, dict(a.dropped), a.template) == (b.n_records, dict(b.dropped), b.template)


def test_a_second_load_reads_the_entry_back_without_tokenizing(setup, tok, tmp_path, monkeypatch):
    data = setup[2]
    fresh = load_dataset(data, tok, max_seq_len=40)  # short: some records are cut, some dropped
    first = load_dataset(data, tok, max_seq_len=40, cache_dir=tmp_path)
    _same(first, fresh)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_tokenizing(*_a, **_k):
        raise AssertionError("tokenized although the entry was there")

    monkeypatch.setattr(data_module, "tokenize_records", no_tokenizing)
    _same(load_dataset(data, tok, max_seq_len=40, cache_dir=tmp_path), fresh)


def test_the_key_changes_with_file_length_tokenizer_and_code(setup, tok, tmp_path, monkeypatch):
    data = setup[2]
    key = token_cache.cache_key(data, tok, 64)
    assert key == token_cache.cache_key(data, tok, 64)
    assert token_cache.cache_key(data, tok, 32) != key
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text() + json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    assert token_cache.cache_key(other, tok, 64) != key
    templated = tok.__class__.from_pretrained(setup[1])
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert token_cache.cache_key(data, templated, 64) != key
    code = tmp_path / "data.py"
    code.write_text(Path(data_module.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(data_module, "__file__", str(code))
    assert token_cache.cache_key(data, tok, 64) != key


@pytest.mark.parametrize("damage", ["not a zip", "cut short", "empty"])
def test_a_damaged_entry_is_tokenized_again_and_replaced(setup, tok, tmp_path, damage):
    data = setup[2]
    key = token_cache.cache_key(data, tok, 64)
    entry = tmp_path / f"{key}.npz"
    fresh = load_dataset(data, tok, max_seq_len=64, cache_dir=tmp_path)
    whole = entry.read_bytes()
    entry.write_bytes(
        {"not a zip": b"not an npz", "cut short": whole[: len(whole) // 2], "empty": b""}[damage]
    )
    assert token_cache.load(tmp_path, key) is None
    again = load_dataset(data, tok, max_seq_len=64, cache_dir=tmp_path)
    _same(again, fresh)
    _same(token_cache.load(tmp_path, key), again)


def test_an_entry_that_cannot_be_written_only_warns(setup, tok, tmp_path, monkeypatch):
    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(token_cache, "save", full_disk)
    with pytest.warns(UserWarning, match="could not keep the tokenized data"):
        data = load_dataset(setup[2], tok, max_seq_len=64, cache_dir=tmp_path)
    _same(data, load_dataset(setup[2], tok, max_seq_len=64))


def test_a_reader_that_may_not_write_leaves_no_entry(setup, tok, tmp_path):
    load_dataset(setup[2], tok, max_seq_len=64, cache_dir=tmp_path, cache_write=False)
    assert not list(tmp_path.glob("*.npz"))


def test_the_key_changes_with_the_tokenizing_libraries(setup, tok, monkeypatch):
    key = token_cache.cache_key(setup[2], tok, 64)
    versions = token_cache._library_versions()
    assert versions["transformers"] and versions["tokenizers"]
    monkeypatch.setattr(token_cache, "_library_versions", lambda: {**versions, "jinja2": "0"})
    assert token_cache.cache_key(setup[2], tok, 64) != key


def test_a_tokenizer_without_a_fast_backend_is_not_cached(setup, tmp_path):
    class Slow:
        chat_template = None

    assert token_cache.cache_key(setup[2], Slow(), 64) is None


def test_train_with_a_token_cache_trains_the_same_steps(setup):
    root = setup[0]
    cache = root / "cache"
    plain = train(small_cfg(*setup, "plain", max_steps=3))
    cached = train(small_cfg(*setup, "cached", max_steps=3, token_cache=str(cache)))
    assert len(list(cache.glob("*.npz"))) == 1
    again = train(small_cfg(*setup, "again", max_steps=3, token_cache=str(cache)))
    losses = [[r["loss"] for r in logged(root / n)] for n in ("plain", "cached", "again")]
    assert losses[0] == losses[1] == losses[2]
    assert plain["steps"] == cached["steps"] == again["steps"] == 3
