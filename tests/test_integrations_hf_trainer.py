"""transformers.Trainer on a patched model: label_smoothing_factor goes through the fused loss
(CalibratedTrainer) or is refused (stock Trainer); gradient accumulation stays exact.

The reference is computed without Trainer and without the patch: the unpatched model's full
logits and ``F.cross_entropy(label_smoothing=eps)`` over the same masked tokens. HF's own
``LabelSmoother`` (stock Trainer, unpatched model) must agree with it too.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn.functional as F  # noqa: E402

from calibrated_lm import patch_model  # noqa: E402
from calibrated_lm.errors import UserError  # noqa: E402
from calibrated_lm.integrations import _common  # noqa: E402
from calibrated_lm.integrations.hf_trainer import CalibratedTrainer  # noqa: E402
from calibrated_lm.models.patching import patch_config  # noqa: E402

VOCAB = 61
EPS = 0.1
LR = 0.5
LENGTH = 12
# Masked prompt lengths per row: the two micro-batches of 2 hold different token counts, so a
# mean of per-micro-batch means would differ from the token mean of the whole batch.
PROMPTS = (1, 7, 2, 4)


def tiny(seed: int = 3):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # far from uniform predictions, so that smoothing matters
        model.lm_head.weight.mul_(20.0)
    return model


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, VOCAB, (len(PROMPTS), LENGTH), generator=g)
        self.labels = self.ids.clone()
        for row, prompt in enumerate(PROMPTS):
            self.labels[row, :prompt] = -100

    def __len__(self):
        return len(PROMPTS)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def reference(model, data, eps):
    """Token-mean smoothed CE of the whole data set (one batch) and its gradients."""
    logits = model(input_ids=data.ids).logits[:, :-1].float()
    loss = F.cross_entropy(
        logits.reshape(-1, VOCAB), data.labels[:, 1:].reshape(-1), label_smoothing=eps
    )
    params = dict(model.named_parameters())
    return loss.detach(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def arguments(tmp_path, name, **overrides):
    settings = dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=1e9,  # no clipping
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


class Recording(CalibratedTrainer):
    """Keeps the loss, whether logits were built, and num_items_in_batch of each micro-batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        seen = (loss.detach(), outputs.logits, num_items_in_batch)
        self.seen = [*getattr(self, "seen", []), seen]
        return (loss, outputs) if return_outputs else loss


def train(trainer_class, model, args, data=None):
    trainer = trainer_class(model=model, args=args, train_dataset=data or Rows())
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    ("patch_eps", "factor"),
    [(None, EPS), (EPS, EPS), (EPS, 0.0)],
    ids=["factor-patches", "factor-equals-patch", "patch-only"],
)
def test_label_smoothing_factor_trains_on_the_fused_loss(tmp_path, patch_eps, factor):
    data = Rows()
    ref_loss, ref_grads = reference(tiny(), data, EPS)
    model = tiny()
    if patch_eps is not None:
        patch_model(model, label_smoothing=patch_eps)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = train(
        Recording, model, arguments(tmp_path, "mine", label_smoothing_factor=factor), data
    )
    assert patch_config(model).label_smoothing == EPS and trainer.label_smoother is None
    [(loss, logits, num_items)] = trainer.seen
    assert logits is None  # the fused loss: no (B, L, V) logits
    assert int(num_items) == int((data.labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            p.detach(), before[name] - LR * ref_grads[name], rtol=1e-5, atol=1e-6, msg=name
        )
    # HF's own LabelSmoother on the full logits of the unpatched model agrees.
    hf = tiny()
    hf_trainer = train(
        transformers.Trainer, hf, arguments(tmp_path, "hf", label_smoothing_factor=EPS), data
    )
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(hf_trainer.state.log_history[0]["loss"], rel=1e-5)
    for (name, pa), pb in zip(hf.named_parameters(), model.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big = patch_model(tiny(), label_smoothing=EPS)
    acc = patch_model(tiny(), label_smoothing=EPS)
    big_trainer = train(Recording, big, arguments(tmp_path, "big"))
    acc_trainer = train(
        Recording,
        acc,
        arguments(tmp_path, "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2),
    )
    total = int((Rows().labels[:, 1:] != -100).sum())
    assert [int(n) for _, _, n in acc_trainer.seen] == [total, total]
    # The micro-batch losses are sums over the whole batch's token count: they add up.
    summed = sum(loss for loss, _, _ in acc_trainer.seen)
    torch.testing.assert_close(summed, big_trainer.seen[0][0], rtol=1e-5, atol=1e-6)
    big_loss = big_trainer.state.log_history[0]["loss"]
    assert acc_trainer.state.log_history[0]["loss"] == pytest.approx(big_loss, rel=1e-5)
    for (name, pa), pb in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=name)


def test_stock_trainer_refuses_to_bypass_the_patch(tmp_path):
    """label_smoothing_factor or compute_loss_func would take the labels away from the model."""
    model = patch_model(tiny(), label_smoothing=EPS)
    stock = transformers.Trainer(
        model=model,
        args=arguments(tmp_path, "ls", label_smoothing_factor=EPS),
        train_dataset=Rows(),
    )
    with pytest.raises(UserError, match="leave label_smoothing_factor at 0") as err:
        stock.train()
    assert "CalibratedTrainer" in str(err.value)
    stock = transformers.Trainer(
        model=model,
        args=arguments(tmp_path, "func"),
        train_dataset=Rows(),
        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
    )
    with pytest.raises(UserError, match="compute_loss_func"):
        stock.train()


@pytest.mark.parametrize(
    ("patch_eps", "overrides", "kwargs", "message"),
    [
        (0.1, {"label_smoothing_factor": 0.2}, {}, r"label_smoothing_factor=0.2\) conflicts"),
        (0.0, {"label_smoothing_factor": 0.2}, {}, r"patch_model\(label_smoothing=0.0\)"),
        (None, {}, {}, "this one is not patched"),
        (0.1, {}, {"compute_loss_func": lambda *a, **k: 0.0}, "compute_loss_func"),
        (0.1, {}, {"model_init": lambda: None}, "model_init"),
    ],
)
def test_conflicting_settings_are_refused(tmp_path, patch_eps, overrides, kwargs, message):
    model = tiny()
    if patch_eps is not None:
        patch_model(model, label_smoothing=patch_eps)
    with pytest.raises(UserError, match=message):
        CalibratedTrainer(
            model=model,
            args=arguments(tmp_path, "bad", **overrides),
            train_dataset=Rows(),
            **kwargs,
        )


@pytest.mark.parametrize("version", ["6.0.0", "5.10.0", "4.56.2"])
def test_untested_transformers_is_refused(monkeypatch, version):
    monkeypatch.delenv(_common.ALLOW_UNTESTED_ENV, raising=False)
    real = _common.installed_version
    monkeypatch.setattr(
        _common, "installed_version", lambda d: version if d == "transformers" else real(d)
    )
    low, high = _common.TESTED_VERSIONS["transformers"]
    with pytest.raises(UserError, match=f"tested with transformers>={low},<{high}, but "):
        CalibratedTrainer(model=None)
