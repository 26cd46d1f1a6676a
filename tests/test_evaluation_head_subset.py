"""Scoring with a head subset: the log-softmax over the kept tokens only (equal to the patched
model's -inf-masked logits), choice tokens outside it refused, and ``calibrated-lm eval``
picking the subset up from the model folder or ``--head-subset``, recording it, refusing a
rerun with another one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_cli import run_cli
from helpers_quiz import answer_token_ids, gas_items, write_quiz
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm import patch_model
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.runner import EvalConfig, run_eval
from calibrated_lm.evaluation.scoring import Encoder, score_items
from calibrated_lm.models import head_subset as hs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("evalsub")
    model_dir = build_tiny_lm(root / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    v = len(tok)
    answer_tokens = answer_token_ids(tok)
    # The answers' tokens, the EOS, then every third id: about a third of the vocabulary.
    subset = hs.select_vocabulary(
        (np.arange(v) % 3 == 0).astype(float),
        v // 3,
        required=answer_tokens + [tok.eos_token_id],
    )
    hs.save(subset, root, rule="test")
    task = write_quiz(root / "quiz.jsonl", 9)
    return root, model_dir, tok, subset, root / hs.FILE, task


def test_scores_are_the_restricted_log_softmax_and_equal_the_patched_models(setup):
    from transformers import AutoModelForCausalLM

    _, model_dir, tok, subset, _, _ = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = Encoder(tokenizer=tok, add_bos=False, prefix_id=tok.eos_token_id)
    items = gas_items()
    got = score_items(model, enc, items, batch_size=4, max_len=512, head_subset=subset)
    plain = score_items(model, enc, items, batch_size=4, max_len=512)
    kept = torch.as_tensor(subset.kept)
    for item, scores, unrestricted in zip(items, got, plain):
        for (c, k), s, u in zip(enc.encode_pairs(item.requests), scores, unrestricted):
            with torch.no_grad():
                z = model(torch.tensor([c + k])).logits[0].double()
            logp = torch.log_softmax(z[:, kept], -1)  # over the kept tokens only
            col = {int(t): j for j, t in enumerate(kept)}
            oracle = float(sum(logp[len(c) - 1 + j, col[t]] for j, t in enumerate(k)))
            assert s == pytest.approx(oracle, abs=2e-5)
            assert s > u  # less mass to share: every kept token is more likely
    # A generic scorer on the patched model (-inf outside the subset) gives the same scores.
    patch_model(model, head_subset=subset)
    masked = score_items(model, enc, items, batch_size=4, max_len=512)
    for a, b in zip(got, masked):
        assert a == pytest.approx(b, abs=2e-5)


def test_a_choice_token_outside_the_subset_is_refused(setup):
    from transformers import AutoModelForCausalLM

    _, model_dir, tok, subset, _, _ = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = Encoder(tokenizer=tok, add_bos=False, prefix_id=tok.eos_token_id)
    water = tok(" water").input_ids
    smaller = hs.HeadSubset(np.setdiff1d(subset.kept, water), subset.vocab_size)
    with pytest.raises(UserError, match=r"t question 0: choice 1 \('water'\) has token id"):
        score_items(model, enc, gas_items(), batch_size=4, max_len=512, head_subset=smaller)


def _cfg(setup, out: Path, **kw) -> EvalConfig:
    _, model_dir, _, _, _, task = setup
    base = dict(model=str(model_dir), tasks=[str(task)], output=out, bootstrap=20,
                progress=False, device="cpu", batch_size=4)  # fmt: skip
    base.update(kw)
    return EvalConfig(**base)


def test_eval_records_the_subset_and_refuses_a_rerun_without_it(setup, tmp_path):
    _, model_dir, _, subset, subset_file, task = setup
    out = tmp_path / "base"
    code, err = run_cli(
        ["eval", "--model", str(model_dir), "--tasks", str(task), "--output", str(out),
         "--bootstrap", "20", "--device", "cpu", "--no-progress", "--head-subset",
         str(subset_file)]
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((out / "summary.json").read_text())["protocol"]["head_subset"]
    sha = hs.open_file(subset_file).sha256
    assert record == {"path": str(subset_file.resolve()), "sha256": sha, "size": subset.size,
                      "vocab_size": subset.vocab_size}  # fmt: skip
    assert json.loads((out / "run.json").read_text())["head_subset"]["sha256"] == sha
    restricted = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(restricted) == 9 and all(np.isfinite(r["choice_logprobs"]).all() for r in restricted)
    with pytest.raises(UserError, match=rf"head_subset: {sha[:12]}\.\.\. -> none"):
        run_eval(_cfg(setup, out))
    # The same folder's scores without the subset differ (another softmax).
    run_eval(_cfg(setup, tmp_path / "full"))
    full = (tmp_path / "full" / "samples.jsonl").read_text().splitlines()
    assert json.loads(full[0])["choice_logprobs"] != restricted[0]["choice_logprobs"]


def test_the_model_folders_subset_is_used_and_a_different_one_refused(setup, tmp_path):
    import shutil

    root, model_dir, _, subset, subset_file, _ = setup
    trained = tmp_path / "trained"
    shutil.copytree(model_dir, trained)
    shutil.copy(subset_file, trained / hs.FILE)  # as `train --head-subset` leaves it
    summary = run_eval(_cfg(setup, tmp_path / "a", model=str(trained)))
    assert summary["protocol"]["head_subset"]["path"] == str((trained / hs.FILE).resolve())
    assert "head subset only" in summary["protocol"]["scoring"]
    via_flag = run_eval(_cfg(setup, tmp_path / "b", head_subset=str(subset_file)))
    a = (tmp_path / "a" / "samples.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["choice_logprobs"] for x in a] == [
        json.loads(x)["choice_logprobs"] for x in b
    ]
    assert (
        via_flag["protocol"]["head_subset"]["sha256"]
        == summary["protocol"]["head_subset"]["sha256"]
    )
    # The same content given again is fine; another subset is refused before loading.
    run_eval(_cfg(setup, tmp_path / "c", model=str(trained), head_subset=str(subset_file)))
    other = tmp_path / "other"
    other.mkdir()
    hs.save(hs.HeadSubset(np.arange(subset.vocab_size), subset.vocab_size), other)
    with pytest.raises(UserError, match="is not the head subset saved with the model"):
        run_eval(_cfg(setup, tmp_path / "d", model=str(trained), head_subset=str(other)))
    assert not (tmp_path / "d").exists()


def test_eval_refusals_write_nothing(setup, tmp_path):
    root, model_dir, tok, subset, _, _ = setup
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    hs.save(hs.HeadSubset(np.arange(3), subset.vocab_size + 7), wrong)
    with pytest.raises(UserError, match="vocabulary of .* tokens, but LlamaForCausalLM's output"):
        run_eval(_cfg(setup, tmp_path / "v", head_subset=str(wrong)))
    water = tok(" water").input_ids
    smaller = tmp_path / "smaller"
    smaller.mkdir()
    hs.save(hs.HeadSubset(np.setdiff1d(subset.kept, water), subset.vocab_size), smaller)
    with pytest.raises(UserError, match=r"quiz question q\d: choice 1 \('water'\)"):
        run_eval(_cfg(setup, tmp_path / "s", head_subset=str(smaller)))
    assert (
        not (tmp_path / "s" / "samples.jsonl").exists()
        or not (tmp_path / "s" / "samples.jsonl").read_text()
    )
    with pytest.raises(UserError, match="--head-subset .*cannot read the head subset"):
        run_eval(_cfg(setup, tmp_path / "m", head_subset=str(tmp_path / "none.json")))
    assert not (tmp_path / "m").exists()
