"""CalibratedSFTTrainer (trl 1.16) trains on the fused label-smoothed loss, with TRL's metrics.

The reference everywhere is computed without TRL and without the patch: the unpatched tiny
model, one unpadded sequence at a time, ``F.cross_entropy(label_smoothing=eps)`` on its full
logits, over the tokens that this file decides should be scored (from the text itself, by
character spans: the whole text, the completion, or the assistant turns).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch.nn.functional as F  # noqa: E402
from helpers_tiny_lm import build_tiny_lm  # noqa: E402

from calibrated_lm import patch_model  # noqa: E402
from calibrated_lm.errors import UserError  # noqa: E402
from calibrated_lm.integrations import _common  # noqa: E402
from calibrated_lm.integrations.trl import CalibratedSFTTrainer  # noqa: E402
from calibrated_lm.models.patching import patch_config  # noqa: E402

EOS = "<|endoftext|>"
EPS = 0.1
LR = 0.5
# Assistant turns (content and end token) inside generation markers, for assistant_only_loss.
TEMPLATE = (
    "{% for m in messages %}" + EOS + "{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}" + EOS + ""
    "{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + EOS + "assistant\n{% endif %}"
)
QUESTIONS = ["Which gas do plants take in?", "Is the sun a star?", "Mars or Venus?", "Why?"]
ANSWERS = ["carbon dioxide", "the sun is a star", "Mars B. Venus", "Calibration means"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny Llama, trained a few steps on the test sentences and saved.

    From random weights the predictions are near uniform: smoothing would barely change the
    loss and no token would be guessed right. Ten AdamW steps give peaked predictions that are
    right about half of the time, so the loss, the accuracy and the entropy all mean something.
    """
    path = build_tiny_lm(tmp_path_factory.mktemp("tiny"), seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = [f"Question: {q} Answer: {a}" for q, a in zip(QUESTIONS, ANSWERS)]
    batch = tok(texts, padding=True, return_tensors="pt") if tok.pad_token else None
    if batch is None:
        tok.pad_token = EOS
        batch = tok(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)  # without the pad token set above
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


def load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).float()


def tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


# --- the three dataset formats, each with the character spans that must be scored ---------


def rendered(messages, generation_prompt=False):
    """The TEMPLATE rendered by hand, with the character spans of the assistant turns."""
    text, spans = "", []
    for m in messages:
        text += EOS + m["role"] + "\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"]) + len(EOS)))
            text += m["content"] + EOS
        else:
            text += m["content"] + "\n"
    if generation_prompt:
        text += EOS + "assistant\n"
    return text, spans


def example_rows(kind):
    """(dataset rows, [(full text, scored character spans)]) for one dataset format."""
    rows, expected = [], []
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        if kind == "text":
            text = f"Question: {q} Answer: {a}" + " again" * i
            rows.append({"text": text})
            full = text + EOS  # TRL appends EOS to plain text
            expected.append((full, [(0, len(full))]))
        elif kind == "prompt_completion":
            prompt, completion = f"Question: {q} Answer:", f" {a}" + " again" * i
            rows.append({"prompt": prompt, "completion": completion})
            full = prompt + completion + EOS
            expected.append((full, [(len(prompt), len(full))]))
        elif kind == "conversational_prompt_completion":
            prompt = [{"role": "user", "content": q}]
            completion = [{"role": "assistant", "content": a + " again" * i}]
            rows.append({"prompt": prompt, "completion": completion})
            prefix, _ = rendered(prompt, generation_prompt=True)
            full, _ = rendered(prompt + completion)
            expected.append((full, [(len(prefix), len(full))]))
        elif kind == "messages":
            messages = [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
                {"role": "user", "content": "And again?"},
                {"role": "assistant", "content": a + " again" * i},
            ]
            rows.append({"messages": messages})
            expected.append(rendered(messages))
        else:
            raise AssertionError(kind)
    return datasets.Dataset.from_list(rows), expected


def scored_tokens(tok, text, spans):
    """Token ids of ``text`` and, per token, whether it lies inside one of ``spans``."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], inside


def reference(folder, sequences, eps):
    """Token-mean smoothed CE over the scored targets, its gradients and TRL's metrics."""
    model = load(folder)
    params = dict(model.named_parameters())
    total, n = 0.0, 0
    entropy = correct = confidence = 0.0
    for ids, scored in sequences:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        target = torch.tensor(ids[1:])
        mask = torch.tensor(scored[1:])
        per = F.cross_entropy(logits, target, label_smoothing=eps, reduction="none")
        total = total + per[mask].sum()
        n += int(mask.sum())
        with torch.no_grad():
            logp = logits[mask].log_softmax(-1)
            entropy += float(-(logp.exp() * logp).sum(-1).sum())
            correct += float((logp.argmax(-1) == target[mask]).sum())
            confidence += float(logp.exp().max(-1).values.sum())
    loss = total / n
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    metrics = {
        "entropy": entropy / n,
        "mean_token_accuracy": correct / n,
        "mean_token_confidence": confidence / n,
        "num_tokens": float(sum(len(ids) for ids, _ in sequences)),
    }
    return loss.detach(), grads, metrics, n


class Recording(CalibratedSFTTrainer):
    """Keeps each training micro-batch, the loss it returned and num_items_in_batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            batch = {k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}
            loss = out[0] if return_outputs else out
            self.seen = [*getattr(self, "seen", []), (batch, loss.detach(), num_items_in_batch)]
        return out


def sft_config(tmp_path, name, **overrides):
    settings = dict(
        output_dir=str(tmp_path / name),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=LR,
        optim="sgd",  # the step is then exactly -lr * gradient
        lr_scheduler_type="constant",
        max_grad_norm=1e9,  # no clipping, but grad_norm is still logged
        bf16=False,  # SFTConfig's default bf16 autocast would round differently from the reference
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return trl.SFTConfig(**settings)


FORMATS = {
    "text": {},
    "prompt_completion": {},  # completion_only_loss defaults to True for this format
    "conversational_prompt_completion": {"completion_only_loss": True},
    "messages": {"assistant_only_loss": True},
}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_loss_gradient_metrics_and_masks_match_the_reference(folder, tmp_path, kind):
    tok = tokenizer(folder)
    data, expected = example_rows(kind)
    sequences = [scored_tokens(tok, text, spans) for text, spans in expected]
    ref_loss, ref_grads, ref_metrics, n = reference(folder, sequences, EPS)
    plain_loss = reference(folder, sequences, 0.0)[0]
    assert abs(float(ref_loss - plain_loss)) > 0.05  # the test can tell smoothing apart

    model = patch_model(load(folder), label_smoothing=EPS)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = Recording(
        model=model,
        args=sft_config(tmp_path, kind, **FORMATS[kind]),
        train_dataset=data,
        processing_class=tok,
    )
    trainer.train()

    # (c) TRL tokenized as we did and scored exactly the tokens inside the spans.
    [(batch, loss, num_items)] = trainer.seen
    rows = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = mask.bool()
        rows.append((ids[real].tolist(), (labels[real] != -100).tolist()))
    assert sorted(rows) == sorted(sequences)
    assert int(num_items) == n
    if kind != "text":
        assert any(not all(scored) for _, scored in sequences)  # some tokens really are masked

    # (a) the loss it optimizes is the smoothed loss; one SGD step moved by -lr * its gradient.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            p.detach(), before[name] - LR * ref_grads[name], rtol=1e-5, atol=1e-6, msg=name
        )

    # (b) TRL's metrics, and ours, from the kernel's statistics of the same pass.
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(float(ref_loss), rel=1e-5)
    grad_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values()))
    assert logged["grad_norm"] == pytest.approx(float(grad_norm), rel=1e-4)
    assert 0.0 < ref_metrics["mean_token_accuracy"] < 1.0
    for key, value in ref_metrics.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_gradient_accumulation_equals_one_big_batch(folder, tmp_path):
    tok = tokenizer(folder)
    data, _ = example_rows("conversational_prompt_completion")
    models = {}
    for name, bs, accumulate in (("big", 4, 1), ("accumulated", 2, 2)):
        model = patch_model(load(folder), label_smoothing=EPS)
        trainer = Recording(
            model=model,
            args=sft_config(
                tmp_path,
                name,
                per_device_train_batch_size=bs,
                gradient_accumulation_steps=accumulate,
                completion_only_loss=True,
            ),
            train_dataset=data,
            processing_class=tok,
        )
        trainer.train()
        models[name] = (model, trainer)
    (big, big_trainer), (acc, acc_trainer) = models["big"], models["accumulated"]
    # Each micro-batch is divided by the token count of the whole accumulated batch.
    counts = {int(n) for _, _, n in acc_trainer.seen}
    scored = sum(int((b["labels"][:, 1:] != -100).sum()) for b, _, _ in acc_trainer.seen)
    assert len(acc_trainer.seen) == 2 and counts == {scored}
    big_loss = big_trainer.state.log_history[0]["loss"]
    assert acc_trainer.state.log_history[0]["loss"] == pytest.approx(big_loss, rel=1e-5)
    for (name, pa), pb in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=name)


def test_eval_and_bf16_autocast_keep_the_fused_loss_and_metrics(folder, tmp_path):
    """Evaluation goes through the same loss; under bf16 autocast accelerate rebuilds the output
    (type(out)(dict(out))) and the statistics must survive that."""
    tok = tokenizer(folder)
    data, expected = example_rows("text")
    sequences = [scored_tokens(tok, text, spans) for text, spans in expected]
    ref_loss, _, ref_metrics, _ = reference(folder, sequences, EPS)
    model = patch_model(load(folder), label_smoothing=EPS)
    args = sft_config(tmp_path, "eval", per_device_eval_batch_size=4)
    trainer = CalibratedSFTTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tok
    )
    result = trainer.evaluate()
    assert result["eval_loss"] == pytest.approx(float(ref_loss), rel=1e-5)
    assert result["eval_entropy"] == pytest.approx(ref_metrics["entropy"], rel=1e-5)
    assert result["eval_mean_token_accuracy"] == pytest.approx(ref_metrics["mean_token_accuracy"])

    model = patch_model(load(folder), label_smoothing=EPS)
    trainer = CalibratedSFTTrainer(
        model=model,
        args=sft_config(tmp_path, "bf16", bf16=True),
        train_dataset=data,
        processing_class=tok,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(float(ref_loss), rel=2e-2)  # bf16 rounding
    assert logged["entropy"] == pytest.approx(ref_metrics["entropy"], rel=2e-2)
    assert logged["num_tokens"] == ref_metrics["num_tokens"]


def test_peft_lora_model_trains_on_the_smoothed_loss(folder, tmp_path):
    peft = pytest.importorskip("peft")
    tok = tokenizer(folder)
    data, expected = example_rows("messages")
    sequences = [scored_tokens(tok, text, spans) for text, spans in expected]
    ref_loss = reference(folder, sequences, EPS)[0]
    model = patch_model(load(folder), label_smoothing=EPS)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = Recording(
        model=model,
        args=sft_config(tmp_path, "peft", assistant_only_loss=True),
        train_dataset=data,
        processing_class=tok,
        peft_config=lora,
    )
    trainer.train()
    # LoRA's B starts at zero: the first step's loss is the base model's.
    [(_, loss, _)] = trainer.seen
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_unpatched_model_is_patched_with_label_smoothing_factor(folder, tmp_path):
    tok = tokenizer(folder)
    data, expected = example_rows("text")
    sequences = [scored_tokens(tok, text, spans) for text, spans in expected]
    ref_loss = reference(folder, sequences, 0.2)[0]
    model = load(folder)
    with _no_label_smoothing_warning():
        trainer = Recording(
            model=model,
            args=sft_config(tmp_path, "factor", label_smoothing_factor=0.2),
            train_dataset=data,
            processing_class=tok,
        )
    assert patch_config(model).label_smoothing == 0.2
    trainer.train()
    [(_, loss, _)] = trainer.seen
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def _no_label_smoothing_warning():
    """TRL's 'label_smoothing_factor needs full logits' warning does not apply here."""
    import contextlib
    import warnings

    @contextlib.contextmanager
    def check():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        assert not [w for w in caught if "label_smoothing_factor" in str(w.message)]

    return check()


# --- the stock paths refuse; bad settings and versions get one sentence ---------------------


def test_stock_sft_trainer_on_a_patched_model_refuses_to_train_plain_ce(folder, tmp_path):
    tok = tokenizer(folder)
    data, _ = example_rows("text")
    for name, overrides in (("stock", {}), ("stock_ls", {"label_smoothing_factor": EPS})):
        model = patch_model(load(folder), label_smoothing=EPS)
        trainer = trl.SFTTrainer(
            model=model,
            args=sft_config(tmp_path, name, **overrides),
            train_dataset=data,
            processing_class=tok,
        )
        with pytest.raises(UserError, match="CalibratedSFTTrainer") as err:
            trainer.train()
        assert "plain cross-entropy" in str(err.value)
    # Patched after the trainer installed its fused head: TRL's fused_lm_head call is refused.
    trainer = trl.SFTTrainer(
        model=load(folder),
        args=sft_config(tmp_path, "late"),
        train_dataset=data,
        processing_class=tok,
    )
    patch_model(trainer.model, label_smoothing=EPS)
    with pytest.raises(UserError, match="fused_lm_head=True"):
        trainer.train()


@pytest.mark.parametrize(
    ("patch_eps", "overrides", "kwargs", "message"),
    [
        (0.1, {"label_smoothing_factor": 0.05}, {}, r"label_smoothing_factor=0.05\) conflicts"),
        (None, {}, {}, "this one is not patched"),
        (0.1, {"loss_type": "dft"}, {}, "loss_type='dft'"),
        (0.1, {}, {"compute_loss_func": lambda *a, **k: 0.0}, "compute_loss_func"),
    ],
)
def test_conflicting_settings_are_refused(folder, tmp_path, patch_eps, overrides, kwargs, message):
    model = load(folder)
    if patch_eps is not None:
        patch_model(model, label_smoothing=patch_eps)
    data, _ = example_rows("text")
    with pytest.raises(UserError, match=message):
        CalibratedSFTTrainer(
            model=model, args=sft_config(tmp_path, "bad", **overrides), train_dataset=data, **kwargs
        )


def test_same_factor_as_the_patch_is_accepted(folder, tmp_path):
    model = patch_model(load(folder), label_smoothing=EPS)
    data, _ = example_rows("text")
    trainer = CalibratedSFTTrainer(
        model=model,
        args=sft_config(tmp_path, "same", label_smoothing_factor=EPS),
        train_dataset=data,
    )
    assert trainer.label_smoother is None and patch_config(model).label_smoothing == EPS


@pytest.mark.parametrize(
    ("versions", "message"),
    [
        ({"trl": "1.17.0"}, r"tested with trl>=1\.16\.0,<1\.17, but trl 1\.17\.0 is installed"),
        ({"trl": "1.15.2"}, r"pip install 'trl>=1\.16\.0,<1\.17'"),
        ({"transformers": "6.0.0"}, r"transformers 6\.0\.0 is installed"),
        ({"trl": None}, r"needs trl"),
    ],
)
def test_untested_versions_are_refused(monkeypatch, versions, message):
    monkeypatch.delenv(_common.ALLOW_UNTESTED_ENV, raising=False)
    real = _common.installed_version
    monkeypatch.setattr(
        _common, "installed_version", lambda d: versions[d] if d in versions else real(d)
    )
    with pytest.raises(UserError, match=message):  # before anything else is looked at
        CalibratedSFTTrainer(model=None)
    if all(versions.values()):
        monkeypatch.setenv(_common.ALLOW_UNTESTED_ENV, "1")
        _common.check_tested_versions("x", "trl", "transformers")  # the escape hatch
