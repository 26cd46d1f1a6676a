"""compile_decoder: same loss and gradients as eager, same parameter names, clear refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calibrated_lm.models.compile import compile_decoder, decoder_layers
from calibrated_lm.models.patching import patch_model


def _tiny(kind: str) -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        return LlamaForCausalLM(cfg)
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, head_dim=8,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    return Gemma3ForCausalLM(cfg)


def _loss_and_grads(model: nn.Module, widths: list[int]) -> tuple[list[float], dict]:
    g = torch.Generator().manual_seed(1)
    losses = []
    for w in widths:  # several widths: the recompile with dynamic sizes is exercised
        ids = torch.randint(0, 96, (3, w), generator=g)
        mask = torch.ones_like(ids)
        mask[0, w // 2 :] = 0  # a padded row
        labels = ids.masked_fill(mask == 0, -100)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_compiled_decoder_trains_like_eager(kind):
    eager = _tiny(kind)
    compiled = _tiny(kind)
    compiled.load_state_dict(eager.state_dict())
    for m in (eager, compiled):
        patch_model(m, label_smoothing=0.1)
    names = list(compiled.state_dict())
    assert compile_decoder(compiled, backend="aot_eager") == 2
    assert compile_decoder(compiled, backend="aot_eager") == 2  # idempotent
    assert list(compiled.state_dict()) == names  # checkpoints and save_pretrained unchanged
    la, ga = _loss_and_grads(eager, [8, 12, 16])
    lb, gb = _loss_and_grads(compiled, [8, 12, 16])
    assert lb == pytest.approx(la, rel=1e-5)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6, msg=k)


def test_inductor_compiles_and_matches_eager_on_cpu():
    eager, compiled = _tiny("llama"), _tiny("llama")
    compiled.load_state_dict(eager.state_dict())
    compile_decoder(compiled)  # inductor: generated C++ on the CPU
    la, ga = _loss_and_grads(eager, [8])
    lb, gb = _loss_and_grads(compiled, [8])
    assert lb == pytest.approx(la, rel=1e-5)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_model_without_decoder_layers_is_refused_by_name():
    with pytest.raises(ValueError, match="cannot compile Sequential: no decoder layer list"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))
