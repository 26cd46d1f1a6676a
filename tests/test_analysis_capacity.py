"""The capacity tool on heads whose answers are known in closed form, and on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from calibrated_lm.analysis.capacity import ARGMAX_TOL, analyze_head, analyze_model
from calibrated_lm.analysis.head import OutputHead, extract_head
from calibrated_lm.analysis.theory import ls_target_gap
from calibrated_lm.errors import UserError


def _polygon(vocab: int, radius: float = 1.0) -> torch.Tensor:
    ang = 2 * math.pi * torch.arange(vocab, dtype=torch.float64) / vocab
    return (radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)).float()


def test_regular_polygon_matches_closed_form():
    # D = 2, rows on a circle of radius s, gain g: by symmetry the optimum for token y is
    # u = sqrt(2) * w_y / |w_y|, so P_y = softmax(sqrt(2) g s cos(theta_j))_y exactly, and the best
    # uniform margin is sqrt(2) g s (1 - cos(2 pi / V)) (distance to the neighbours' chord).
    vocab, s, g = 12, 3.0, 1.5
    w = _polygon(vocab, s)
    report = analyze_head(w, torch.full((2,), g), samples=vocab, progress=False)
    rho = math.sqrt(2)
    theta = 2 * math.pi * np.arange(vocab) / vocab
    z = rho * g * s * np.cos(theta)
    expected = z[0] - np.logaddexp.reduce(z)
    assert np.allclose(report.log_ceiling, expected, atol=1e-4)
    assert np.all(report.log_ceiling_upper >= report.log_ceiling - 1e-6)
    assert np.allclose(report.log_ceiling_upper, expected, atol=1e-3)
    gamma = rho * g * s * (1 - math.cos(2 * math.pi / vocab))
    assert np.all(report.gap_lower <= gamma + 1e-4)
    assert np.all(report.gap_upper >= gamma - 1e-4)
    assert np.allclose(report.gap_lower, gamma, rtol=1e-3)
    assert report.frac_can_be_argmax == 1.0
    # closed-form per-token bound holds and is attained only where all margins align
    assert np.all(report.log_ceiling_closed >= report.log_ceiling - 1e-6)


def test_token_inside_convex_hull_is_reported_unreachable():
    rng = np.random.default_rng(0)
    w = torch.tensor(rng.normal(size=(40, 5)), dtype=torch.float32)
    w[0] = 0.5 * (w[1] + w[2])  # strictly between two other rows
    w[3] = 0.2 * w[4] + 0.3 * w[5] + 0.5 * w[6]
    report = analyze_head(w, None, token_ids=[0, 3, 4, 7], progress=False)
    assert report.gap_upper[0] < ARGMAX_TOL and report.gap_upper[1] < ARGMAX_TOL
    assert report.gap_lower[0] <= 1e-6 and report.gap_lower[1] <= 1e-6
    # its ceiling stays below the ceiling of the rows it averages (never a confident argmax)
    assert math.exp(report.log_ceiling[0]) < 0.5
    summary = report.summary()
    assert summary["frac_cannot_be_argmax"] >= 0.5
    assert summary["reach_ls"]["0.1"]["frac_gap_impossible"] >= 0.5


def test_small_radius_cannot_reach_ls_but_large_radius_can():
    rng = np.random.default_rng(1)
    w = torch.tensor(rng.normal(size=(300, 16)), dtype=torch.float32)
    w = w / w.norm(dim=1, keepdim=True)
    small = analyze_head(w, torch.full((16,), 0.05), samples=16, progress=False)
    big = analyze_head(w, torch.full((16,), 50.0), samples=16, progress=False)
    g = ls_target_gap(0.1, 300)
    # closed form: with ||h|| <= 0.2 every margin is at most 0.4 < G, so nothing reaches LS
    assert small.reach(0.1)["frac_ceiling_impossible"] == 1.0
    assert small.reach(0.1)["frac_gap_impossible"] == 1.0
    assert np.all(small.gap_upper < g)
    # ceilings near the closed-form range bound: p <= e^R / (e^R + V - 1)
    assert small.summary()["ceiling"]["max"] <= small.summary()["closed_form"]["max_prob_bound"]
    assert big.reach(0.1)["frac_ceiling"] > 0.9


def test_tiny_llama_head_probe_and_bound_against_real_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.rand(24) * 3 - 1)
    head = extract_head(model)
    assert not head.centred and head.norm_bias is None
    assert torch.allclose(head.gain, model.model.norm.weight, atol=1e-4)
    ids = torch.randint(0, 97, (4, 16))
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits.float(), -1).reshape(-1, 97)
    conf, top = p.max(-1)
    tokens = torch.unique(top)[:12]
    report = analyze_model(model, token_ids=tokens.tolist(), iters=60, progress=False)
    # no real forward pass may exceed the certified ceiling of its argmax token
    ceiling = dict(zip(tokens.tolist(), np.exp(report.log_ceiling_upper)))
    for c, t in zip(conf.tolist(), top.tolist()):
        if t in ceiling:
            assert c <= ceiling[t] + 1e-5


def test_gemma_norm_gain_is_one_plus_weight():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.randn(16))
    head = extract_head(model)
    assert torch.allclose(head.gain, 1 + model.model.norm.weight, atol=1e-4)


def test_layernorm_head_is_centred_with_bias():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.copy_(torch.rand(16) + 0.5)
        model.transformer.ln_f.bias.copy_(torch.randn(16))
    head = extract_head(model)
    assert head.centred
    assert torch.allclose(head.gain, model.transformer.ln_f.weight, atol=1e-4)
    assert torch.allclose(head.norm_bias, model.transformer.ln_f.bias, atol=1e-4)
    a, c = head.effective()
    assert torch.allclose(a.sum(1), torch.zeros(50), atol=1e-4)  # mean-free directions only
    assert c is not None and c.shape == (50,)


def test_model_without_head_or_norm_is_a_user_error():
    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(UserError, match="no linear output head"):
        extract_head(NoHead())

    class NoNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 10, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(UserError, match="final normalisation layer"):
        extract_head(NoNorm())


def test_output_head_dataclass_radius():
    head = OutputHead(weight=torch.zeros(10, 9), gain=torch.ones(9))
    assert head.radius == 3.0 and head.vocab == 10 and head.dim == 9


def test_capacity_command_end_to_end(tmp_path, capsys):
    from helpers_tiny_lm import build_tiny_lm

    from calibrated_lm.cli import main

    folder = build_tiny_lm(tmp_path / "tiny")
    out = tmp_path / "cap"
    rc = main(["capacity", "--model", str(folder), "--samples", "8", "--output", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vocab"] > 256 and summary["dim"] == 32 and summary["samples"] == 8
    assert set(summary["reach_ls"]) == {"0.05", "0.1", "0.2"}
    assert summary["timing"]["load_s"] >= 0 and summary["timing"]["analysis_s"] > 0
    tokens = json.loads((out / "tokens.json").read_text())
    assert len(tokens["token_ids"]) == len(tokens["gap_lower"]) == 8
    assert (out / "capacity.png").stat().st_size > 1000 and (out / "capacity.svg").exists()
    text = capsys.readouterr().out
    assert "V/D" in text and "LS gap" in text and "note: --samples" not in text
    assert main(["capacity", "--model", str(folder), "--eps", "1.5"]) == 2
    assert main(["capacity", "--model", str(tmp_path / "missing")]) == 2
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["capacity", "--model", str(folder), "--output", str(afile)]) == 2
    assert "--output " + str(afile) + " is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "x"
    # Another model's results in the folder are not replaced; the same model's are redone.
    other = build_tiny_lm(tmp_path / "other", seed=1)
    before = (out / "summary.json").read_bytes()
    assert main(["capacity", "--model", str(other), "--samples", "8", "--output", str(out)]) == 2
    assert "holds the capacity results of model" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
    assert main(["capacity", "--model", str(folder), "--samples", "8", "--output", str(out)]) == 0
    big = ["capacity", "--model", str(folder), "--samples", "100000", "--output", str(out)]
    assert main(big) == 0
    assert "is more than the vocabulary's" in capsys.readouterr().out
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev/run.json").write_text("{}")
    args = ["capacity", "--model", str(folder), "--samples", "8", "--output", str(tmp_path / "ev")]
    assert main(args) == 2 and "holds a calibrated-lm eval run" in capsys.readouterr().err
