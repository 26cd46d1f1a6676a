"""patch_model(head_subset=S): the fused loss over the kept rows equals the restricted softmax
of the full logits (forward and gradients), targets outside S are left out and counted, a tied
head is untied, and unlabelled logits are -inf outside S."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calibrated_lm import patch_model, unpatch_model  # noqa: E402
from calibrated_lm.models import head_subset as hs  # noqa: E402
from calibrated_lm.models.patching import fused_lm_loss, patch_config  # noqa: E402
from calibrated_lm.models.restricted_head import RestrictedHead, is_tied  # noqa: E402

VOCAB = 61
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
)
# 23 of the 61 tokens; the random labels below fall outside it about 60% of the time.
SUBSET = hs.HeadSubset(np.array([0, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47,
                                 50, 53, 55, 56, 58, 59, 60]), VOCAB)  # fmt: skip


def tiny(arch: str, *, tied: bool, seed: int = 0):
    name, extra = {
        "llama": ("LlamaConfig", {}),
        "gemma3_text": ("Gemma3TextConfig", {"final_logit_softcapping": 0.5}),
    }[arch]
    config = getattr(transformers, name)(**COMMON, **extra, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # sharper than random init, so softcap and smoothing matter
        model.get_output_embeddings().weight.mul_(20.0)
    assert is_tied(model) == tied
    return model


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def restricted_reference(logits, labels, eps, temperature=1.0):
    """Full logits (already capped) masked to -inf outside S, log_softmax, smoothing eps / V'
    on each kept token; mean over the targets inside S (those outside are left out)."""
    kept = torch.as_tensor(SUBSET.kept)
    index_map = torch.as_tensor(SUBSET.index_map())
    z = logits[:, :-1].float() / temperature
    z = z.masked_fill(index_map < 0, float("-inf"))
    logp = torch.log_softmax(z, dim=-1)
    y = labels[:, 1:]
    scored = (y != -100) & (index_map[y.clamp(min=0)] >= 0)
    lp = logp[scored]  # (n, V)
    nll = -lp.gather(1, y[scored][:, None]).squeeze(1)
    smooth = -lp[:, kept].mean(dim=1)  # the V' kept tokens only: no 0 * -inf terms
    per = (1 - eps) * nll + eps * smooth
    return temperature * per.mean(), int(((y != -100) & ~(index_map[y.clamp(min=0)] >= 0)).sum())


def _untied_copy(model):
    """A reference copy whose head is its own parameter (as the patch leaves it)."""
    ref = copy.deepcopy(model)
    head = ref.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    return ref


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize(("tied", "untie"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize(
    ("arch", "softcap"), [("llama", None), ("llama", 3.0), ("gemma3_text", None)]
)
def test_subset_loss_and_gradients_equal_the_masked_full_softmax(arch, softcap, tied, untie, eps):
    model = tiny(arch, tied=tied)
    ref = copy.deepcopy(model)
    ids, labels = batch()
    patch_model(model, label_smoothing=eps, softcap=softcap, head_subset=SUBSET, untie_head=untie)
    # A tied head stays tied unless asked; untied, it is its own copy and the input
    # embedding is the original's, all V rows.
    assert is_tied(model) == (tied and not untie)
    assert model.config.tie_word_embeddings == (tied and not untie)
    if untie:
        ref = _untied_copy(ref)
    torch.testing.assert_close(
        model.get_input_embeddings().weight, ref.get_input_embeddings().weight
    )
    out = model(input_ids=ids, labels=labels, calibrated_lm_stats=True)
    if softcap is None:
        logits = ref(input_ids=ids).logits  # Gemma 3's own final softcap included
    else:
        raw = ref.lm_head(ref.model(input_ids=ids).last_hidden_state)
        logits = softcap * torch.tanh(raw / softcap)
    expected, n_outside = restricted_reference(logits, labels, eps)
    assert n_outside > 0 and out.loss_stats.n_outside == n_outside
    assert out.loss_stats.n_tokens == int((labels[:, 1:] != -100).sum()) - n_outside
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    head_grad = model.get_output_embeddings().weight.grad
    outside = torch.as_tensor(SUBSET.index_map()) < 0
    if is_tied(model):
        # The shared rows of tokens outside S get the input embedding's gradient only: none
        # for tokens that are not in the batch either.
        outside &= ~torch.isin(torch.arange(outside.numel()), ids.flatten())
    assert head_grad[outside].abs().max() == 0 and head_grad[~outside].abs().max() > 0


def test_untie_head_needs_a_subset():
    with pytest.raises(ValueError, match="untie_head=True needs a head_subset"):
        patch_model(tiny("llama", tied=True), untie_head=True)


def test_temperature_and_sum_reduction_with_a_subset():
    model = tiny("gemma3_text", tied=True)
    ref = _untied_copy(model)
    ids, labels = batch(seed=3)
    patch_model(model, label_smoothing=0.1, temperature=2.0, head_subset=SUBSET)
    with torch.no_grad():
        logits = ref(input_ids=ids).logits
        loss = model(input_ids=ids, labels=labels).loss
        summed = model(input_ids=ids, labels=labels, calibrated_lm_reduction="sum").loss
        stats = model(input_ids=ids, labels=labels, calibrated_lm_stats=True).loss_stats
    expected, _ = restricted_reference(logits, labels, 0.1, temperature=2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(summed, expected * stats.n_tokens, rtol=1e-5, atol=1e-5)


def test_unlabelled_logits_are_minus_inf_outside_the_subset_and_generate_stays_inside():
    model = tiny("llama", tied=True).eval()
    ref = _untied_copy(model)
    ids, _ = batch()
    patch_model(model, head_subset=SUBSET)
    outside = torch.as_tensor(SUBSET.index_map()) < 0
    with torch.no_grad():
        full = ref(input_ids=ids).logits
        out = model(input_ids=ids).logits
        as_tuple = model(input_ids=ids, return_dict=False)[0]
        kept_last = model(input_ids=ids, logits_to_keep=1).logits
    assert torch.isneginf(out[..., outside]).all()
    torch.testing.assert_close(out[..., ~outside], full[..., ~outside], rtol=0, atol=0)
    torch.testing.assert_close(as_tuple, out, rtol=0, atol=0)
    assert kept_last.shape[1] == 1 and torch.isneginf(kept_last[..., outside]).all()
    # log_softmax over the masked logits is the restricted softmax (finite inside S)
    logp = torch.log_softmax(out.float(), -1)
    torch.testing.assert_close(
        logp[..., ~outside], torch.log_softmax(full[..., ~outside].float(), -1)
    )
    gen = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not outside[gen[0, 4:]].any()
    unpatch_model(model)  # back to the full softmax; the tie was never broken
    assert is_tied(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, full, rtol=0, atol=0)


def test_a_subset_of_another_vocabulary_and_out_of_range_targets_are_refused():
    model = tiny("llama", tied=False)
    with pytest.raises(ValueError, match="vocabulary of 62 tokens but this model's output head"):
        patch_model(model, head_subset=hs.HeadSubset(np.array([1, 2]), 62))
    assert patch_config(model) is None  # refused before anything changed
    patch_model(model, head_subset=SUBSET)
    ids, labels = batch()
    labels[1, 5] = VOCAB
    with pytest.raises(ValueError, match="target token id 61 lies outside the vocabulary"):
        model(input_ids=ids, labels=labels)


def test_remap_with_ignore_index_none_and_shift():
    head = RestrictedHead(SUBSET)
    targets = torch.tensor([[-5, 0, 1, 60], [2, 4, 3, 59]])
    mapped, ignore, n_outside = head.remap(targets, None, shift=True)
    # first column unscored (shift); 1 and 4 are outside S
    assert ignore == -100 and int(n_outside) == 2
    assert mapped[:, 1:].tolist() == [[0, -100, 22], [-100, 2, 21]]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        head.remap(torch.tensor([[0, -100]]), None, shift=True)


def test_fused_lm_loss_with_ignore_index_none_leaves_out_the_outside_targets():
    model = tiny("llama", tied=False).eval()
    ref = _untied_copy(model)
    patch_model(model, label_smoothing=0.0, head_subset=SUBSET)
    ids, _ = batch()
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        loss, stats = fused_lm_loss(
            hidden, model.lm_head, patch_config(model), labels=ids, ignore_index=None,
            return_stats=True,
        )  # fmt: skip
        expected, n_outside = restricted_reference(ref(input_ids=ids).logits, ids, 0.0)
    assert stats.n_outside == n_outside and stats.n_tokens == ids[:, 1:].numel() - n_outside
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernel)")
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_on_the_gpu_the_subset_loss_and_gradients_match_the_cpu(eps):
    # Claim 3 trains on this path: the kept rows (index_select) through the Triton kernel.
    cpu = tiny("gemma3_text", tied=True)
    gpu = copy.deepcopy(cpu).cuda()
    ids, labels = batch(seed=5)
    for m in (cpu, gpu):
        patch_model(m, label_smoothing=eps, head_subset=SUBSET, untie_head=True)
    out_c = cpu(input_ids=ids, labels=labels, calibrated_lm_stats=True)
    out_g = gpu(input_ids=ids.cuda(), labels=labels.cuda(), calibrated_lm_stats=True)
    assert out_g.loss_stats.n_outside == out_c.loss_stats.n_outside > 0
    torch.testing.assert_close(out_g.loss.cpu(), out_c.loss, rtol=1e-4, atol=1e-5)
    out_c.loss.backward()
    out_g.loss.backward()
    grads = dict(cpu.named_parameters())
    for name, p in gpu.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)
