"""patch_model: the fused loss equals the full-logits loss on every supported architecture."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn.functional as F  # noqa: E402

from calibrated_lm import patch_model, unpatch_model  # noqa: E402
from calibrated_lm.models.patching import patch_config  # noqa: E402

VOCAB = 61  # not a multiple of any block size
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
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 0.5}),
    "gemma3_text": ("Gemma3TextConfig", {"final_logit_softcapping": 0.5}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    # Not in the known list: exercises the generic path (Cohere scales its logits).
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),
    "olmo": ("OlmoConfig", {}),
}


def tiny(arch: str, seed: int = 0, **overrides):
    config_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    # Random init gives near-uniform logits; sharpen the head so softcap/smoothing matter.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def batch(seed: int = 1, b: int = 2, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, length), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    return ids, labels


def reference_loss(logits, labels, eps, temperature=1.0):
    """The oracle: shifted F.cross_entropy on full fp32 logits (PyTorch's smoothing convention)."""
    z = logits[:, :-1].float() / temperature
    y = labels[:, 1:]
    return temperature * F.cross_entropy(
        z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100, label_smoothing=eps
    )


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_loss_matches_full_logits(arch):
    model = tiny(arch).eval()
    ids, labels = batch()
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # includes the model's own softcap/scale
        patch_model(model, label_smoothing=0.1)
        out = model(input_ids=ids, labels=labels)
        plain = model(input_ids=ids)
    assert out.logits is None
    expected = reference_loss(logits, labels, 0.1)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    # Without labels the patched model is the original model.
    torch.testing.assert_close(plain.logits, logits, rtol=0, atol=0)
    assert patch_config(model).path == ("generic" if arch in ("cohere", "olmo") else "known")


def test_gemma_softcap_carries_over_and_user_softcap_replaces_it():
    model = tiny("gemma3_text").eval()
    ids, labels = batch()
    with torch.no_grad():
        logits_capped = model(input_ids=ids).logits
        raw = model.lm_head(model.model(input_ids=ids).last_hidden_state)
        patch_model(model, label_smoothing=0.0)
        capped = model(input_ids=ids, labels=labels).loss
        patch_model(model, label_smoothing=0.0, softcap=2.0)
        user = model(input_ids=ids, labels=labels).loss
    assert raw.abs().max() > 1.0  # the model's cap 0.5 really bites
    torch.testing.assert_close(capped, reference_loss(logits_capped, labels, 0.0))
    torch.testing.assert_close(user, reference_loss(2.0 * torch.tanh(raw / 2.0), labels, 0.0))


def test_temperature_divides_logits_and_scales_loss():
    for arch in ("llama", "gemma2"):
        model = tiny(arch).eval()
        ids, labels = batch()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            patch_model(model, label_smoothing=0.1, temperature=2.5)
            loss = model(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(loss, reference_loss(logits, labels, 0.1, temperature=2.5))


def test_z_loss_and_tied_embeddings_and_sum_reduction():
    model = tiny("llama", tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, labels = batch()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        patch_model(model, label_smoothing=0.2, z_loss=1e-3)
        loss = model(input_ids=ids, labels=labels).loss
        summed = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    z, y = logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
    valid = y != -100
    per = F.cross_entropy(z, y, ignore_index=-100, label_smoothing=0.2, reduction="none")
    per = per + 1e-3 * torch.logsumexp(z, -1) ** 2 * valid
    torch.testing.assert_close(loss, per.sum() / valid.sum())
    torch.testing.assert_close(summed, per.sum() / 7)


def test_tuple_output_positional_input_and_unpatch():
    model = tiny("qwen2").eval()
    ids, labels = batch()
    original = model.forward
    patch_model(model)
    with torch.no_grad():
        out = model(ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    unpatch_model(model)
    assert model.forward == original and patch_config(model) is None
    with torch.no_grad():
        out = model(ids, labels=labels)  # transformers' own loss again, from full logits
        expected = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
        )
    torch.testing.assert_close(out.loss, expected)


def test_unsupported_models_get_a_clear_error():
    with pytest.raises(ValueError, match="not a decoder-only"):
        patch_model(torch.nn.Linear(3, 3))
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=32, d_model=8, d_ff=16, num_layers=1, num_heads=1, d_kv=8)
    )
    with pytest.raises(ValueError, match="not a decoder-only"):
        patch_model(t5)
    bare = transformers.LlamaModel(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match="base decoder|output embedding"):
        patch_model(bare)
    with pytest.raises(ValueError, match="label_smoothing"):
        patch_model(tiny("llama"), label_smoothing=1.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(label_smoothing=None), "label_smoothing must be a real number"),
        (dict(softcap=float("inf")), "softcap must be finite"),
        (dict(temperature=float("inf")), "temperature must be finite"),
        (dict(temperature=0.0), "temperature must be None or > 0"),
        (dict(z_loss=float("nan")), "z_loss must be finite"),
        (dict(impl="bogus"), "impl must be one of"),
        (dict(min_block_rows=-3), "min_block_rows must be an integer >= 0"),
    ],
)
def test_bad_loss_settings_are_refused_when_patching(kwargs, message):
    """At patch time, in one sentence, not at the first labelled forward (or as NaN)."""
    model = tiny("llama")
    with pytest.raises(ValueError, match=f"^patch_model: {message}"):
        patch_model(model, **kwargs)


def test_generic_model_with_unknown_logit_transform_is_refused():
    class Doubling(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    config = transformers.LlamaConfig(**COMMON)
    config.model_type = "doubling"
    with pytest.raises(ValueError, match="post-processes its logits"):
        patch_model(Doubling(config))


def _train(model, steps, eps, patched, lr=1e-2):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if patched:
        patch_model(model, label_smoothing=eps)
    losses = []
    for step in range(steps):
        ids, labels = batch(seed=10 + step)
        if patched:
            loss = model(input_ids=ids, labels=labels).loss
        else:
            loss = reference_loss(model(input_ids=ids).logits, labels, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adamw_steps_with_and_without_patch_agree():
    base = tiny("llama", tie_word_embeddings=True)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    la = _train(a, 4, 0.1, patched=False)
    lb = _train(b, 4, 0.1, patched=True)
    assert la[-1] < la[0]  # it actually trains
    assert lb == pytest.approx(la, rel=1e-4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=name)


def test_hf_trainer_runs_patched_model_like_the_unpatched_one(tmp_path):
    """Under HF Trainer with grad accumulation, eps=0 must reproduce transformers' own loss."""
    from torch.utils.data import Dataset

    class Data(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids, labels = batch(seed=100 + i, b=1)
            return {"input_ids": ids[0], "labels": labels[0]}

    def run(patched):
        model = tiny("llama", seed=3)
        if patched:
            patch_model(model, label_smoothing=0.0)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"p{patched}"),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            data_seed=0,
            logging_steps=1,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Data())
        trainer.train()
        logs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return model, logs

    ref, ref_logs = run(False)
    mine, my_logs = run(True)
    assert len(my_logs) == 2
    assert my_logs == pytest.approx(ref_logs, rel=1e-4)
    for pa, pb in zip(ref.parameters(), mine.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5)


def test_trl_sft_trainer_with_fused_subclass_matches_plain(tmp_path):
    """The README's FusedSFTTrainer recipe (runs only where trl is installed)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from helpers_tiny_lm import build_tiny_lm

    class FusedSFTTrainer(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return transformers.Trainer.compute_loss(
                self, model, inputs, return_outputs, num_items_in_batch
            )

    folder = build_tiny_lm(tmp_path / "m", chat_template=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Which gas {i}?"}],
            "completion": [{"role": "assistant", "content": "carbon dioxide" * (1 + i % 3)}],
        }
        for i in range(8)
    ]
    data = datasets.Dataset.from_list(rows)

    def run(patched):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        # TRL 1.x computes its own loss through a fused head of its own; the subclass routes the
        # loss through Trainer.compute_loss, i.e. through the model's forward (ours when patched).
        cls = FusedSFTTrainer if patched is not None else trl.SFTTrainer
        if patched:
            patch_model(model, label_smoothing=0.0)
        args = trl.SFTConfig(
            output_dir=str(tmp_path / f"o{patched}"),
            max_steps=2,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=0.1,
            optim="sgd",  # AdamW's first step is sign-like: tiny gradient noise flips entries
            bf16=False,  # SFTConfig defaults to bf16 autocast, whose rounding differs by path
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        trainer = cls(model=model, args=args, train_dataset=data, processing_class=tok)
        trainer.train()
        return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    ref, ref_logs = run(False)  # subclass, transformers' own loss
    mine, my_logs = run(True)  # subclass, fused loss
    _, trl_logs = run(None)  # stock SFTTrainer, TRL's own loss
    assert my_logs == pytest.approx(ref_logs, rel=1e-5)
    assert my_logs == pytest.approx(trl_logs, rel=1e-3)
    for pa, pb in zip(ref.parameters(), mine.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_through_the_patch_keeps_gradients():
    a = tiny("gemma3_text")
    b = copy.deepcopy(a)
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = batch()
    for m in (a, b):
        patch_model(m, label_smoothing=0.1)
        m.train()
        m(input_ids=ids, labels=labels).loss.backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "device_type",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not (torch.cuda.is_available() and torch.distributed.is_nccl_available()),
                reason="needs a CUDA GPU and NCCL",
            ),
        ),
    ],
)
def test_separately_sharded_head_is_gathered(tmp_path, device_type):
    """fully_shard(lm_head) leaves a DTensor the head's hooks never gather: the patch must.

    The mesh is explicit: fully_shard's default mesh is the accelerator's whenever one is
    visible, which moved the sharded copy to cuda:0 while the plain one stayed on the CPU
    (``cuda:0 != cpu`` on GPU machines). Both copies and the batch live on ``device_type``.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh(device_type, (1,))
        a = tiny("llama").to(device)
        b = copy.deepcopy(a)
        fully_shard(b.lm_head, mesh=mesh)
        fully_shard(b, mesh=mesh)
        assert isinstance(b.lm_head.weight, DTensor)
        assert b.lm_head.weight.device == a.lm_head.weight.device == device
        ids, labels = (t.to(device) for t in batch())
        for m in (a, b):
            patch_model(m, label_smoothing=0.1)
            m(input_ids=ids, labels=labels).loss.backward()
        gathered = b.lm_head.weight.grad.full_tensor()
        assert gathered.device == a.lm_head.weight.grad.device == device
        # Same kernels on both copies; on a GPU cuBLAS may pick another algorithm for the
        # sharded copy's differently aligned parameters, hence a little slack there.
        tol = {} if device_type == "cpu" else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(gathered, a.lm_head.weight.grad, **tol)
    finally:
        dist.destroy_process_group()


def test_head_on_another_device_is_a_clear_error():
    from calibrated_lm.models.patching import fused_lm_loss

    model = tiny("llama")
    patch_model(model)
    head = torch.nn.Linear(16, VOCAB, bias=False, device="meta")
    with pytest.raises(
        ValueError, match="head's weight is on meta but the hidden states are on cpu"
    ):
        fused_lm_loss(torch.randn(1, 4, 16), head, patch_config(model), labels=batch()[1][:1, :4])


def test_ignore_index_none_scores_every_label():
    """transformers may pass ignore_index; None means no label is skipped (stats too)."""
    from calibrated_lm.models.patching import fused_lm_loss

    model = tiny("llama").eval()
    patch_model(model, label_smoothing=0.0)
    ids, _ = batch()
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model.lm_head(hidden)
        cfg = patch_config(model)
        loss, stats = fused_lm_loss(
            hidden, model.lm_head, cfg, labels=ids, ignore_index=None, return_stats=True
        )
    assert stats.n_tokens == ids[:, 1:].numel()
    torch.testing.assert_close(loss, reference_loss(logits, ids, 0.0))


@pytest.mark.parametrize(("kwargs", "expected"), [({}, 1024), ({"min_block_rows": 0}, 0)])
def test_patch_passes_its_block_floor_to_the_loss(monkeypatch, kwargs, expected):
    from calibrated_lm.loss import chunking

    seen = []
    real = chunking.grad_block_rows

    def spy(*args, **kw):
        seen.append(kw.get("min_rows"))
        return real(*args, **kw)

    monkeypatch.setattr(chunking, "grad_block_rows", spy)
    model = tiny("llama")
    patch_model(model, **kwargs)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert patch_config(model).min_block_rows == expected and seen == [expected]


def test_calls_that_would_bypass_the_fused_loss_are_refused():
    """fused_lm_head=True, a wrapper that runs the decoder itself (TRL's fused head), and
    num_items_in_batch without labels (HF Trainer's label smoother) each raise UserError."""
    import types

    from calibrated_lm.errors import UserError

    model = tiny("llama")
    patch_model(model, label_smoothing=0.1)
    ids, labels = batch()
    with pytest.raises(UserError, match="fused_lm_head=True.*CalibratedSFTTrainer"):
        model(input_ids=ids, labels=labels, fused_lm_head=True)
    with pytest.raises(UserError, match="leave label_smoothing_factor at 0"):
        model(input_ids=ids, num_items_in_batch=torch.tensor(5))
    model.model(input_ids=ids)  # a direct decoder call on a model whose forward is ours: fine
    patched = model.forward

    def calls_through(self, **kwargs):  # accelerate's autocast wrapper does this
        return patched(**kwargs)

    model.forward = types.MethodType(calls_through, model)
    assert model(input_ids=ids, labels=labels).logits is None
    model.forward = types.MethodType(lambda self, **kw: self.model(**kw), model)  # TRL's shape
    with pytest.raises(UserError, match="ran its decoder directly.*unpatch_model"):
        model(input_ids=ids)
    with pytest.raises(UserError, match="cannot be restored"):
        unpatch_model(model)
    model.forward = patched
    unpatch_model(model)
    model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(5))  # hook removed


def test_patch_declares_loss_kwargs_and_stats_survive_an_output_rebuild():
    """accelerate's mixed-precision wrapper rebuilds outputs as type(out)(dict(out))."""
    from calibrated_lm.models.patching import LossStats

    model = tiny("gemma3_text")
    assert "accepts_loss_kwargs" not in model.__dict__
    patch_model(model, label_smoothing=0.1)
    assert model.accepts_loss_kwargs is True
    ids, labels = batch()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, calibrated_lm_stats=True)
        plain = model(input_ids=ids, labels=labels, use_cache=False)
    rebuilt = type(out)(dict(out))
    assert isinstance(rebuilt.loss_stats, LossStats)
    assert rebuilt.loss_stats.n_tokens == int((labels[:, 1:] != -100).sum())
    assert "loss_stats" not in plain and len(plain.to_tuple()) == 1  # only the loss
    unpatch_model(model)
    assert "accepts_loss_kwargs" not in model.__dict__
