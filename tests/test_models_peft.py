"""patch_model and PEFT in both orders: LoRA on attention and MLP, the head frozen or trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.models import patch_config, patch_model, unpatch_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _lora(model, head: bool):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"] if head else None
    )
    torch.manual_seed(0)
    lora = peft.get_peft_model(model, cfg)
    for n, p in lora.named_parameters():  # nonzero B, so the adapters change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return lora


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_both_orders_give_transformers_loss_and_adapter_gradients(tmp_path, order, head):
    folder = build_tiny_lm(tmp_path / "m")
    ids, labels = _batch()
    ref = _lora(_model(folder), head)
    want = ref(input_ids=ids, labels=labels).loss
    want.backward()
    if order == "patch_then_peft":
        model = _lora(patch_model(_model(folder), label_smoothing=0.0), head)
    else:
        model = patch_model(_lora(_model(folder), head), label_smoothing=0.0)
    assert patch_config(model) is not None
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None  # the fused path ran: no logits were materialised
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    got = dict(model.named_parameters())
    trained = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trained) and (head == any("lm_head" in n for n in trained))
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n].grad, p.grad, rtol=1e-4, atol=1e-6)
        else:
            assert got[n].grad is None  # frozen base weights stay frozen
    # Smoothing changes the loss; unpatching restores transformers' own.
    smoothed = patch_model(model, label_smoothing=0.1)(input_ids=ids, labels=labels).loss
    assert float(smoothed.detach()) > float(want.detach()) + 1e-4
    unpatch_model(model)
    assert patch_config(model) is None
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want)
