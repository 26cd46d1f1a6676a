"""Scoring-time logit transforms (``eval --logit-softcap C --logit-temperature T``): the scores
are log_softmax(C tanh(z / C) / T) over the scored columns (after a head subset), T equals a
head divided by T, the values are pinned in run.json (a rerun with another refused), shown in
the summary and the report, and bad values are refused before anything is loaded."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_cli import run_cli
from helpers_quiz import answer_token_ids, gas_items, write_quiz
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.logit_transform import LogitTransform
from calibrated_lm.evaluation.runner import EvalConfig, run_eval
from calibrated_lm.evaluation.scoring import Encoder, score_items
from calibrated_lm.models import head_subset as hs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("transform")
    model_dir = build_tiny_lm(root / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert not model.config.tie_word_embeddings  # scaling the head leaves the inputs alone
    v = len(tok)
    answers = answer_token_ids(tok)
    subset = hs.select_vocabulary((np.arange(v) % 2).astype(float), v // 2, answers)
    task = write_quiz(root / "quiz.jsonl", 6)
    enc = Encoder(tokenizer=tok, add_bos=False, prefix_id=tok.eos_token_id)
    return dict(model_dir=model_dir, model=model, tok=tok, enc=enc, subset=subset, task=task)


def _score(model, enc, **kw) -> list[list[float]]:
    return score_items(model, enc, gas_items(), batch_size=4, max_len=512, **kw)


@pytest.mark.parametrize("with_subset", [False, True])
def test_temperature_equals_a_head_divided_by_t(setup, with_subset):
    model, enc = setup["model"], setup["enc"]
    subset = setup["subset"] if with_subset else None
    t = 0.37
    got = _score(model, enc, transform=LogitTransform(temperature=t), head_subset=subset)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.lm_head.weight.div_(t)
    want = _score(scaled, enc, head_subset=subset)
    plain = _score(model, enc, head_subset=subset)
    for a, b, p in zip(got, want, plain):
        assert a == pytest.approx(b, abs=1e-5)
        assert a != pytest.approx(p, abs=1e-3)  # the temperature does change the scores


def test_softcap_then_temperature_equal_the_manual_formula(setup):
    model, enc = setup["model"], setup["enc"]
    c, t = 0.05, 0.5  # a cap below the tiny model's logit range, so tanh bends them
    z_max = 0.0
    for transform in (LogitTransform(softcap=c), LogitTransform(softcap=c, temperature=t)):
        got = _score(model, enc, transform=transform)
        temp = transform.temperature or 1.0
        for item, scores in zip(gas_items(), got):
            for (ctx, cont), s in zip(enc.encode_pairs(item.requests), scores):
                with torch.no_grad():
                    z = model(torch.tensor([ctx + cont])).logits[0].double()
                z_max = max(z_max, float(z.abs().max()))
                logp = torch.log_softmax(c * torch.tanh(z / c) / temp, -1)
                oracle = float(sum(logp[len(ctx) - 1 + j, tok] for j, tok in enumerate(cont)))
                assert s == pytest.approx(oracle, abs=2e-5)
    assert z_max > 2 * c  # the cap was active


def test_masked_logits_stay_masked():
    z = torch.tensor([[-math.inf, 0.0, 3.0, -5.0]])
    out = LogitTransform(softcap=2.0, temperature=0.5).apply(z)
    assert out[0, 0] == -math.inf
    assert torch.allclose(out[0, 1:], 2.0 * torch.tanh(z[0, 1:] / 2.0) / 0.5)


def _cfg(s, out: Path, **kw) -> EvalConfig:
    base = dict(model=str(s["model_dir"]), tasks=[str(s["task"])], output=out, bootstrap=20,
                progress=False, device="cpu", batch_size=4)  # fmt: skip
    base.update(kw)
    return EvalConfig(**base)


def test_eval_records_the_transform_and_refuses_a_rerun_with_another(setup, tmp_path, monkeypatch):
    s = setup
    out = tmp_path / "run"
    code, err = run_cli(
        ["eval", "--model", str(s["model_dir"]), "--tasks", str(s["task"]), "--output",
         str(out), "--bootstrap", "20", "--device", "cpu", "--no-progress",
         "--logit-softcap", "32", "--logit-temperature", "0.5"]
    )  # fmt: skip
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert (run["logit_softcap"], run["logit_temperature"]) == (32.0, 0.5)
    proto = json.loads((out / "summary.json").read_text())["protocol"]
    assert (proto["logit_softcap"], proto["logit_temperature"]) == (32.0, 0.5)
    assert "z -> 32 tanh(z / 32), then z -> z / 0.5" in proto["scoring"]
    header = (out / "report.md").read_text().split("| task")[0]
    assert "Scored with logits transformed before the log-softmax: z -> 32 tanh" in header
    # The same values resume; another value, or none, is refused before the model loads.
    run_eval(_cfg(s, out, logit_softcap=32, logit_temperature=0.5))
    import calibrated_lm.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "open_model", no_load)
    with pytest.raises(UserError, match=r"logit_temperature: 0\.5 -> 2\b"):
        run_eval(_cfg(s, out, logit_softcap=32, logit_temperature=2.0))
    with pytest.raises(UserError, match=r"logit_softcap: 32 -> none; logit_temperature: 0\.5"):
        run_eval(_cfg(s, out))
    monkeypatch.undo()
    # A folder scored without a transform refuses one.
    plain = tmp_path / "plain"
    run_eval(_cfg(s, plain))
    assert "logit_temperature" not in json.loads((plain / "run.json").read_text())
    with pytest.raises(UserError, match=r"logit_temperature: none -> 0\.5"):
        run_eval(_cfg(s, plain, logit_temperature=0.5))


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, True, "2"])
@pytest.mark.parametrize("field", ["logit_temperature", "logit_softcap"])
def test_bad_values_are_refused_before_anything_is_read(setup, tmp_path, field, value):
    out = tmp_path / "bad"
    flag = "--" + field.replace("_", "-")
    with pytest.raises(UserError, match=f"{flag} must be a finite number above 0"):
        run_eval(_cfg(setup, out, **{field: value}))
    assert not out.exists()


@pytest.mark.parametrize("text", ["0", "-2", "nan", "inf"])
def test_the_cli_refuses_bad_values_with_exit_2(setup, tmp_path, text):
    out = tmp_path / "bad"
    code, err = run_cli(
        ["eval", "--model", str(setup["model_dir"]), "--tasks", str(setup["task"]),
         "--output", str(out), "--device", "cpu", "--logit-temperature", text]
    )  # fmt: skip
    assert code == 2 and "--logit-temperature must be a finite number above 0" in err
    assert not out.exists()
