"""The backend strategies (training/backends.py): which one a run gets, and how each ends a
step. The loop's end-to-end behaviour under each is in test_training_loop.py (one device,
FSDP2 over gloo) and test_training_deepspeed.py (ZeRO-3 over gloo)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from calibrated_lm.errors import UserError
from calibrated_lm.training import backends as B
from calibrated_lm.training.distributed import DistInfo

ONE = DistInfo(0, 1, 0, torch.device("cpu"))
TWO = DistInfo(0, 2, 0, torch.device("cpu"))  # rank 0 of 2; nothing here is a collective


def _make(info: DistInfo, deepspeed: str | None = None) -> B.Backend:
    return B.make_backend(info, deepspeed=deepspeed, batch_size=2, grad_accum=3, max_grad_norm=1.0)


def test_the_backend_follows_the_processes_and_deepspeed(tmp_path):
    assert type(_make(ONE)) is B.SingleDevice
    assert type(_make(TWO)) is B.FSDP2
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 10}}))
    zero = _make(TWO, str(config))
    assert type(zero) is B.ZeRO3 and not zero.resume_reads_weights
    assert zero.config["train_batch_size"] == 12 and zero.config["gradient_clipping"] == 1.0
    with pytest.raises(UserError, match="--deepspeed shards over several processes"):
        _make(ONE, str(config))
    with pytest.raises(UserError, match="only ZeRO stage 3"):
        config.write_text('{"zero_optimization": {"stage": 2}}')
        _make(TWO, str(config))


def _single(max_grad_norm: float | None) -> tuple[B.Backend, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    backend = B.SingleDevice(ONE, max_grad_norm=max_grad_norm)
    backend.place(model)
    backend.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    return backend, model


def test_single_device_clips_steps_and_clears_the_gradients():
    backend, model = _single(max_grad_norm=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    backend.set_lr(0.5)
    assert backend.optim.param_groups[0]["lr"] == 0.5
    backend.backward(model(torch.ones(4, 3)).sum() * 100, boundary=True)
    outcome = backend.finish_step()
    assert outcome.finite and not outcome.skipped and outcome.grad_norm > 1e-3  # the unclipped norm
    moved = math.sqrt(
        sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before))
    )
    assert moved == pytest.approx(0.5 * 1e-3, rel=1e-4)  # SGD step of the clipped gradient
    assert all(p.grad is None for p in model.parameters())


def test_single_device_skips_a_non_finite_step_and_names_where():
    backend, model = _single(max_grad_norm=None)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(1, 3)).sum()
    loss.backward()
    model[1].weight.grad[0, 0] = float("nan")
    outcome = backend.finish_step()
    assert not outcome.finite and outcome.skipped
    # Clipping by a NaN norm (even at +inf) spreads the NaN to every gradient.
    assert outcome.nonfinite_params == [name for name, _ in model.named_parameters()]
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    assert backend._own_state_writer() is None


class _Engine:
    """What ZeRO3 calls of a DeepSpeed engine, recorded."""

    def __init__(self, norm):
        self.norm, self.calls = norm, []

    def set_gradient_accumulation_boundary(self, value):
        self.calls.append(("boundary", value))

    def backward(self, loss, scale_wrt_gas):
        self.calls.append(("backward", float(loss), scale_wrt_gas))

    def step(self):
        self.calls.append(("step",))

    def get_global_grad_norm(self):
        return self.norm


@pytest.mark.parametrize(
    "norm, finite, grad_norm",
    [(2.5, True, 2.5), (None, True, None), (float("nan"), False, None)],
    ids=["finite", "unmeasured", "nan"],
)
def test_zero3_steps_in_the_engine_and_only_reports_a_non_finite_norm(norm, finite, grad_norm):
    zero = B.ZeRO3(TWO, config={"gradient_clipping": 1.0})
    zero.engine = _Engine(norm)
    assert zero.forward is zero.engine
    zero.backward(torch.tensor(3.0), boundary=False)
    zero.backward(torch.tensor(4.0), boundary=True)
    assert zero.engine.calls == [
        ("boundary", False), ("backward", 3.0, False), ("step",),
        ("boundary", True), ("backward", 4.0, False), ("step",),
    ]  # fmt: skip
    outcome = zero.finish_step()
    assert outcome.finite is finite and not outcome.skipped and not outcome.nonfinite_params
    if grad_norm is not None:
        assert outcome.grad_norm == grad_norm
    elif norm is None:
        assert outcome.grad_norm is None
    assert zero.full_optim_state() is None and callable(zero._own_state_writer())
