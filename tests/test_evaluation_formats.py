"""Scoring what was trained: token counts in samples, per-token normalisation, a chat template
file, and the plain (Tulu) template saved with a fine-tuned tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.calibration import choice_probabilities, read_samples
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.runner import EvalConfig, run_eval
from calibrated_lm.training.data import PLAIN_CHAT_TEMPLATE, _plain_tokens, tokenize_records

WORDS = ["carbon dioxide", "water", "the sun", "Paris", "a bright star"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fmt")
    model = build_tiny_lm(root / "model")
    task = root / "quiz.jsonl"
    rows = [
        {"context": f"Q{i}: which?\nAnswer:", "choices": WORDS[: 2 + i % 3], "label": i % 2}
        for i in range(9)
    ]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, task


def _cfg(setup, out: Path, **kw) -> EvalConfig:
    model, task = setup
    base = dict(model=str(model), tasks=[str(task)], output=out, bootstrap=0, progress=False)
    base.update(device="cpu", chat_template="off", batch_size=4)
    base.update(kw)
    return EvalConfig(**base)


def test_samples_carry_token_counts_and_tokens_normalisation_divides_by_them(setup, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    run_eval(_cfg(setup, out))
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(setup[0])
    for r in recs:
        # The continuation is " " + choice after a context without trailing space.
        want = [len(tok(r["prompt"] + " " + c)["input_ids"]) - len(tok(r["prompt"])["input_ids"])
                for c in r["choices"]]  # fmt: skip
        assert r["choice_token_counts"] == want
    run_eval(_cfg(setup, tmp_path / "tok", normalization="tokens"))
    summary = json.loads((tmp_path / "tok" / "summary.json").read_text())
    probs, _ = choice_probabilities(
        [r["choice_logprobs"] for r in recs],
        choice_char_lengths=[r["choice_token_counts"] for r in recs],
        normalization="tokens",
    )
    acc = float(np.mean(np.nanargmax(probs, axis=1) == [r["label"] for r in recs]))
    assert summary["tasks"]["quiz"]["accuracy"] == pytest.approx(acc)
    # The metrics reader takes the same normalisation from the file.
    tasks = read_samples(out / "samples.jsonl", normalization="tokens")
    assert [list(x) for x in tasks["quiz"].choice_token_counts] == [
        r["choice_token_counts"] for r in recs
    ]


def test_tokens_normalisation_needs_token_counts(tmp_path: Path) -> None:
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"task": "t", "id": 1, "choice_logprobs": [-1, -2], "label": 0}))
    with pytest.raises(UserError, match="needs choice token counts"):
        read_samples(f, normalization="tokens")
    f.write_text(
        json.dumps(
            {
                "task": "t",
                "id": 1,
                "choice_logprobs": [-1, -2],
                "label": 0,
                "choice_token_counts": [1, 2, 3],
            }  # fmt: skip
        )
    )
    with pytest.raises(UserError, match=r"s.jsonl:1: 3 choice token counts for 2"):
        read_samples(f)


def test_chat_template_file_renders_every_prompt_and_is_pinned(setup, tmp_path: Path) -> None:
    tpl = tmp_path / "tulu.jinja"
    tpl.write_text(PLAIN_CHAT_TEMPLATE)
    out = tmp_path / "chat"
    summary = run_eval(_cfg(setup, out, chat_template=str(tpl)))
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("<|user|>\nQ") for r in recs)  # tiny tokenizer: no BOS
    assert all(r["prompt"].endswith("Answer:\n<|assistant|>\n") for r in recs)
    run = json.loads((out / "run.json").read_text())
    assert run["chat_template_used"] and len(run["chat_template_sha256"]) == 64
    assert summary["protocol"]["chat_template_used"]
    # Another template into the same folder would mix protocols: refused, scores kept (even
    # an edit that renders the same: the run is pinned to the template's content).
    tpl.write_text(PLAIN_CHAT_TEMPLATE + "{# v2 #}")
    with pytest.raises(UserError, match="different protocol"):
        run_eval(_cfg(setup, out, chat_template=str(tpl)))
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(recs)


@pytest.mark.parametrize("bad, msg", [("nope.jinja", "Jinja template file"), ("", "empty")])
def test_bad_chat_template_file_fails_before_loading(setup, tmp_path: Path, bad, msg) -> None:
    path = bad
    if bad == "":
        path = str(tmp_path / "empty.jinja")
        Path(path).write_text("  \n")
    with pytest.raises(UserError, match=msg):
        run_eval(_cfg(setup, tmp_path / "out", chat_template=path))
    assert not (tmp_path / "out").exists()


def test_plain_template_renders_the_trained_text_and_is_tokenized_as_trained(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_lm(tmp_path / "m"))
    assert not tok.chat_template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a gas."},
        {"role": "assistant", "content": "carbon dioxide"},
    ]
    ids, _ = _plain_tokens(tok, messages)
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    text = tok.apply_chat_template(messages, tokenize=False)
    want = (tok.bos_token or "") + (
        "<|system|>\nBe brief.\n<|user|>\nName a gas.\n<|assistant|>\ncarbon dioxide"
        + (tok.eos_token or "")
        + "\n"
    )
    assert text == want
    assert tok.decode(ids) == tok.decode(tok(text, add_special_tokens=False)["input_ids"])
    # A tokenizer saved by train (plain template set) is tokenized piece by piece, as trained.
    rec = [(1, {"instruction": "Name a gas.", "output": "carbon dioxide"})]
    with_tpl = tokenize_records(rec, tok, max_seq_len=64)
    tok.chat_template = None
    without = tokenize_records(rec, tok, max_seq_len=64)
    assert with_tpl.template == "plain"
    assert with_tpl.examples[0].input_ids == without.examples[0].input_ids
    assert with_tpl.examples[0].labels == without.examples[0].labels
