"""experiments/sft_calibration.py's held-out pass: batched forwards give each example the
statistics of its own forward, on a tiny random model (CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers_tiny_lm import TINY_SHAPE, build_tiny_lm

EXP = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXP))

import sft_calibration as sc  # noqa: E402


def _tiny_gemma3(folder: Path, like: Path) -> Path:
    """A 2-layer Gemma 3 text model with a 4-token sliding window (shorter than the examples,
    so right padding meets the sliding-window mask), with ``like``'s tokenizer."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(like)
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        **TINY_SHAPE,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=None,
    )
    Gemma3ForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_and_heldout(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("heldout")
    model = build_tiny_lm(root / "lm")
    if request.param == "gemma3":
        model = _tiny_gemma3(root / "gemma3", model)
    words = "calibration means that confidence matches accuracy on average".split()
    records = [
        # Lengths differ, so batches are padded and sorting reorders them.
        {
            "instruction": " ".join(words[: 2 + i % 5]),
            "input": "",
            "output": " ".join(words[i % 4 :]),
        }
        for i in range(11)
    ]
    held = root / "heldout.json"
    held.write_text(json.dumps(records))
    return model, held


def test_batched_heldout_rows_match_one_forward_per_example(tiny_and_heldout):
    model, held = tiny_and_heldout
    one = sc.heldout_stats(str(model), held, 64, "cpu", per_example=True, batch=1)
    four = sc.heldout_stats(str(model), held, 64, "cpu", per_example=True, batch=4)
    assert one["examples"] == four["examples"] == 11
    assert one["per_example"]["n"] == four["per_example"]["n"]
    assert min(one["per_example"]["n"]) > 0
    for key in ("nll", "confidence", "accuracy", "entropy"):
        assert four["per_example"][key] == pytest.approx(
            one["per_example"][key], rel=1e-4, abs=1e-5
        )
    for key in ("nll", "accuracy", "mean_confidence", "entropy", "tokens"):
        assert four[key] == pytest.approx(one[key], rel=1e-5)
    # Rows are in file order: row k is what record k alone gives.
    records = json.loads(held.read_text())
    for k in (0, 4, 10):
        alone = held.with_name(f"alone{k}.json")
        alone.write_text(json.dumps([records[k]]))
        single = sc.heldout_stats(str(model), alone, 64, "cpu", per_example=True)
        assert four["per_example"]["nll"][k] == pytest.approx(
            single["nll"] * single["tokens"], rel=1e-4
        )
        assert four["per_example"]["n"][k] == single["tokens"]
    # The pooled pass (batches of 8, sorted) agrees.
    pooled = sc.heldout_stats(str(model), held, 64, "cpu")
    assert pooled["nll"] == pytest.approx(one["nll"], rel=1e-5)
    assert "per_example" not in pooled


def test_heldout_batch_below_one_is_refused(tiny_and_heldout):
    model, held = tiny_and_heldout
    with pytest.raises(ValueError, match="batch must be >= 1"):
        sc.heldout_stats(str(model), held, 64, "cpu", per_example=True, batch=0)


def test_only_claim3_batches_its_heldout_pass():
    # The control's and claim 2's held-out pairs were computed one forward per example.
    assert sc.PROFILES["control"].heldout_batch == 1
    assert sc.PROFILES["claim2"].heldout_batch == 1
    assert sc.PROFILES["claim3"].heldout_batch > 1
