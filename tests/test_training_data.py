"""SFT data: layouts, templates, assistant-only labels, drops and bad-input messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.errors import UserError
from calibrated_lm.training.data import (
    IGNORE_INDEX,
    load_dataset,
    read_records,
    to_messages,
    tokenize_records,
)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tok")
    plain = AutoTokenizer.from_pretrained(build_tiny_lm(root / "plain"))
    chat = AutoTokenizer.from_pretrained(build_tiny_lm(root / "chat", chat_template=True))
    assert not plain.chat_template and chat.chat_template
    return plain, chat


def test_layouts_normalise_to_the_same_conversation():
    want = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert to_messages({"instruction": "Hi", "input": "", "output": "Hello"}) == want
    assert to_messages({"prompt": "Hi", "completion": "Hello"}) == want
    assert to_messages({"messages": want}) == want
    sharegpt = {
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    }
    assert to_messages(sharegpt) == want
    lima = {"instruction": "Q2", "input": "ctx", "output": "A2", "history": [["Q1", "A1"]]}
    assert [m["content"] for m in to_messages(lima)] == ["Q1", "A1", "Q2\n\nctx", "A2"]


def _assistant_text(tokenizer, ex):
    """Decode the labelled tokens, run by run."""
    runs, cur = [], []
    for tok, y in zip(ex.input_ids, ex.labels):
        if y != IGNORE_INDEX:
            assert y == tok
            cur.append(tok)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def test_plain_template_labels_only_assistant_turns_multi_turn(tokenizers):
    plain, _ = tokenizers
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Which gas do plants take in?"},
            {"role": "assistant", "content": "carbon dioxide"},
            {"role": "user", "content": "And the capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]
    }
    data = tokenize_records([(1, rec)], plain, max_seq_len=512)
    ex = data.examples[0]
    assert data.template == "plain"
    eos = plain.eos_token
    assert _assistant_text(plain, ex) == [f"carbon dioxide{eos}", f"Paris{eos}"]
    text = plain.decode(ex.input_ids)
    assert "<|system|>\nBe brief.\n<|user|>\nWhich gas" in text
    assert "<|assistant|>\ncarbon dioxide" in text


def test_chat_template_labels_only_assistant_turns(tokenizers):
    _, chat = tokenizers
    rec = {
        "instruction": "Q2",
        "output": "Paris is the capital",
        "history": [["Q1", "carbon dioxide"]],
    }
    data = tokenize_records([(1, rec)], chat, max_seq_len=512)
    ex = data.examples[0]
    assert data.template == "chat"
    # The template renders "<eos>assistant\n{content}\n"; the span after the generation prompt.
    assert [r.strip() for r in _assistant_text(chat, ex)] == [
        "carbon dioxide",
        "Paris is the capital",
    ]
    full = chat.apply_chat_template(to_messages(rec), tokenize=False)
    assert chat.decode(ex.input_ids) == full


def test_truncation_drops_examples_without_targets_and_counts_them(tokenizers):
    plain, _ = tokenizers
    long_prompt = {"prompt": "Calibration " * 200, "completion": "yes"}
    short = {"prompt": "Hi", "completion": "Paris"}
    only_user = {"messages": [{"role": "user", "content": "Hi"}]}
    data = tokenize_records([(1, long_prompt), (2, short), (3, only_user)], plain, max_seq_len=32)
    assert len(data.examples) == 1
    assert all(len(ex.input_ids) <= 32 for ex in data.examples)
    assert data.dropped == {"no assistant token after truncation": 1, "no assistant turn": 1}


def test_malformed_jsonl_names_the_line(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    with pytest.raises(UserError, match=r"d.jsonl: malformed JSON record at line 3"):
        read_records(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(UserError, match="line 2 is a list, not a JSON object"):
        read_records(path)


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path: Path):
    """Some editors start UTF-8 files with a BOM; json.loads refused the first line."""
    for name, text in (
        ("d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'),
        ("d.json", json.dumps([{"prompt": "a", "completion": "b"}])),
    ):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [r["prompt"] for _, r in read_records(path)][0] == "a"


def test_json_array_and_pretty_object_files_read(tmp_path: Path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"prompt": "a", "completion": "b"}] * 3, indent=2))
    assert len(read_records(arr)) == 3
    obj = tmp_path / "o.json"
    obj.write_text(json.dumps({"prompt": "a", "completion": "b"}, indent=2))
    assert len(read_records(obj)) == 1


def test_unknown_layout_lists_accepted_ones(tmp_path: Path, tokenizers):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"question": "a", "answer": "b"}\n')
    with pytest.raises(
        UserError, match=r"record at line 2: unknown record layout .*'answer', 'question'"
    ):
        load_dataset(path, tokenizers[0], max_seq_len=64)
    with pytest.raises(UserError, match="Alpaca .*chat .*ShareGPT .*prompt/completion"):
        load_dataset(path, tokenizers[0], max_seq_len=64)


def test_empty_dataset_after_filtering_is_an_error(tmp_path: Path, tokenizers):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "long " * 100, "completion": "b"}) + "\n")
    with pytest.raises(UserError, match="no training example left .*1 no assistant token"):
        load_dataset(path, tokenizers[0], max_seq_len=8)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        load_dataset(empty, tokenizers[0], max_seq_len=8)


def test_a_data_folder_is_named_as_one(tmp_path) -> None:
    with pytest.raises(UserError, match="is a folder; give the JSON or JSONL file in it"):
        read_records(tmp_path)
