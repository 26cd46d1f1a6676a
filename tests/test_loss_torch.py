"""Exactness and API tests of linear_cross_entropy's PyTorch path against a float64 oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calibrated_lm import linear_cross_entropy
from calibrated_lm.loss import chunking, reference_linear_cross_entropy

IGN = -100


def make_problem(n=37, d=24, v=203, dtype=torch.float32, seed=0, bias=False, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5 * 3).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = IGN
    b = (torch.randn(v, generator=g)).to(dtype).requires_grad_() if bias else None
    return h, w, y, b


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def grads(loss, upstream, params):
    params = [p for p in params if p is not None]
    out = loss if upstream is None else (loss * upstream).sum()
    return torch.autograd.grad(out, params)


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many row blocks and vocabulary tiles so that every merge path runs."""
    monkeypatch.setattr(chunking, "_CPU_BLOCK", 16 * 203 * 4)
    monkeypatch.setattr(chunking, "_CPU_FORWARD_TILE", 8 * 128 * 4)


CASES = [
    dict(label_smoothing=0.0),
    dict(label_smoothing=0.1),
    dict(label_smoothing=1.0),
    dict(label_smoothing=0.1, softcap=2.5),
    dict(label_smoothing=0.1, z_loss=1e-3, bias=True),
    dict(label_smoothing=0.3, softcap=4.0, z_loss=1e-2, bias=True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("order", ["token", "vocab"])
def test_matches_float64_oracle_fp32(case, reduction, order, small_blocks, monkeypatch):
    # order: CALIBRATED_LM_LCE_ORDER, token blocks outer (default) or vocabulary tiles outer.
    monkeypatch.setenv("CALIBRATED_LM_LCE_ORDER", order)
    case = dict(case)
    h, w, y, b = make_problem(bias=case.pop("bias", False), seed=len(reduction))
    kw = dict(bias=b, reduction=reduction, **case)
    loss = linear_cross_entropy(h, w, y, impl="torch", **kw)
    ref = reference_linear_cross_entropy(h, w, y, **kw)
    up = torch.randn(loss.shape) if reduction == "none" else None
    assert rel(loss, ref) < 1e-5
    for got, want in zip(grads(loss, up, [h, w, b]), grads(ref, up, [h, w, b])):
        assert rel(got, want) < 1e-5


def test_oracle_is_pytorch_cross_entropy():
    h, w, y, _ = make_problem()
    for eps in (0.0, 0.1, 1.0):
        got = linear_cross_entropy(h, w, y, label_smoothing=eps, impl="torch")
        want = F.cross_entropy(h @ w.T, y, label_smoothing=eps, ignore_index=IGN)
        assert rel(got, want) < 1e-5


def test_shift_and_stats(small_blocks):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 11, 24, generator=g, requires_grad=True)
    w = torch.randn(203, 24, generator=g, requires_grad=True)
    y = torch.randint(0, 203, (3, 11), generator=g)
    y[1, 4] = IGN
    kw = dict(label_smoothing=0.1, softcap=5.0, reduction="none", return_stats=True)
    loss, stats = linear_cross_entropy(h, w, y, shift=True, impl="torch", **kw)
    # Explicit shift with copies is the oracle.
    want, wstats = reference_linear_cross_entropy(h[:, :-1], w, y[:, 1:], **kw)
    assert loss.shape == (3, 10) and stats.lse.shape == (3, 10)
    assert rel(loss, want) < 1e-5
    for name in ("lse", "entropy", "confidence"):
        assert rel(getattr(stats, name), getattr(wstats, name)) < 1e-5, name
    assert torch.equal(stats.correct, wstats.correct)
    assert not stats.correct[1, 3]  # ignored target (y[1, 4]) is never "correct"
    up = torch.randn(3, 10)
    gh, gw = torch.autograd.grad((loss * up).sum(), [h, w])
    wh, ww = torch.autograd.grad((want * up).sum(), [h, w])
    assert rel(gh, wh) < 1e-5 and rel(gw, ww) < 1e-5
    assert gh[:, -1].abs().max() == 0  # the last position predicts nothing


def test_stats_definitions():
    h, w, y, _ = make_problem(ignore_frac=0.0)
    # Make some predictions right so that `correct` is exercised both ways.
    y[:10] = (h[:10] @ w.T).argmax(-1)
    _, st = linear_cross_entropy(h, w, y, return_stats=True, impl="torch")
    z = (h @ w.T).double()
    p = z.softmax(-1)
    assert rel(st.lse, z.logsumexp(-1)) < 1e-6
    assert rel(st.entropy, -(p * p.log()).sum(-1)) < 1e-5
    assert rel(st.confidence, p.max(-1).values) < 1e-6
    assert torch.equal(st.correct, z.argmax(-1) == y) and st.correct[:10].all()


def test_all_ignored_mean_is_zero_with_zero_grads():
    h, w, y, b = make_problem(bias=True)
    y[:] = IGN
    loss = linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, impl="torch")
    assert loss.item() == 0.0 and not torch.isnan(loss)
    for g in torch.autograd.grad(loss, [h, w, b]):
        assert torch.count_nonzero(g) == 0


def test_no_grad_forward_equals_grad_forward(small_blocks):
    h, w, y, b = make_problem(bias=True)
    kw = dict(bias=b, label_smoothing=0.2, softcap=3.0, return_stats=True, impl="torch")
    with torch.no_grad():
        l0, s0 = linear_cross_entropy(h, w, y, **kw)
    l1, s1 = linear_cross_entropy(h, w, y, **kw)
    assert rel(l0, l1) < 1e-6
    for a, c in zip(s0, s1):
        assert torch.allclose(a.float(), c.float(), atol=1e-5)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(24, 40, generator=g)
    h = base.T[:, ::1].requires_grad_()  # (40, 24) transposed view
    wbase = torch.randn(24, 203 * 2, generator=g)
    w = wbase.T[::2].requires_grad_()  # (203, 24), strided
    y = torch.randint(0, 203, (40, 2), generator=g)[:, 0]
    assert not h.is_contiguous() and not w.is_contiguous() and not y.is_contiguous()
    loss = linear_cross_entropy(h, w, y, label_smoothing=0.1, impl="torch")
    ref = reference_linear_cross_entropy(h, w, y, label_smoothing=0.1)
    assert rel(loss, ref) < 1e-5
    for a, c in zip(grads(loss, None, [h, w]), grads(ref, None, [h, w])):
        assert rel(a, c) < 1e-5


def test_grad_scaled_by_upstream_scalar():
    h, w, y, b = make_problem(bias=True)
    loss = linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, impl="torch")
    ref = reference_linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1)
    for a, c in zip(grads(loss * 0.37, None, [h, w, b]), grads(ref * 0.37, None, [h, w, b])):
        assert rel(a, c) < 1e-5


def test_only_some_inputs_need_grad():
    h, w, y, _ = make_problem()
    w.requires_grad_(False)
    loss = linear_cross_entropy(h, w, y, label_smoothing=0.1, impl="torch")
    (gh,) = torch.autograd.grad(loss, [h])
    (wh,) = torch.autograd.grad(reference_linear_cross_entropy(h, w, y, label_smoothing=0.1), [h])
    assert rel(gh, wh) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", ["token", "vocab"])
def test_low_precision_no_worse_than_twice_pytorch(dtype, order, monkeypatch):
    monkeypatch.setenv("CALIBRATED_LM_LCE_ORDER", order)
    h, w, y, _ = make_problem(n=64, d=32, v=301, dtype=dtype, seed=7)
    eps = 0.1
    ref = reference_linear_cross_entropy(h, w, y, label_smoothing=eps)
    ref_g = grads(ref, None, [h, w])
    # PyTorch's own low-precision computation: logits in dtype, upcast, cross_entropy.
    torch_loss = F.cross_entropy((h @ w.T).float(), y, label_smoothing=eps, ignore_index=IGN)
    torch_g = grads(torch_loss, None, [h, w])
    loss = linear_cross_entropy(h, w, y, label_smoothing=eps, impl="torch")
    ours_g = grads(loss, None, [h, w])
    assert loss.dtype == torch.float32
    assert rel(loss, ref) <= 2 * rel(torch_loss, ref) + 1e-6
    for a, t, r in zip(ours_g, torch_g, ref_g):
        assert a.dtype == dtype
        assert rel(a, r) <= 2 * rel(t, r) + 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(reduction="avg"), "reduction"),
        (dict(softcap=0.0), "softcap"),
        (dict(softcap=-3.0), "softcap"),
        (dict(impl="cuda"), "impl"),
        (dict(bias=torch.zeros(7)), "bias"),
        (dict(z_loss=-1.0), "z_loss"),
        (dict(min_block_rows=-1), "min_block_rows"),
        (dict(min_block_rows=2.5), "min_block_rows"),
        (dict(ignore_index=-100.0), "ignore_index must be an integer"),
        (dict(ignore_index="-100"), "ignore_index must be an integer"),
        (dict(ignore_index=True), "ignore_index must be an integer"),
        (dict(ignore_index=2**70), "ignore_index must fit in int64"),
        # Non-finite or non-numeric settings: a sentence, not NaN or a TypeError.
        (dict(softcap=float("inf")), "softcap must be finite"),
        (dict(label_smoothing=float("nan")), "label_smoothing must be finite"),
        (dict(z_loss=float("nan")), "z_loss must be finite"),
        (dict(label_smoothing=None), "label_smoothing must be a real number"),
        (dict(z_loss=None), "z_loss must be a real number"),
        (dict(label_smoothing="0.1"), "label_smoothing must be a real number"),
        (dict(label_smoothing=torch.tensor([0.1, 0.2])), "label_smoothing must be a real"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    h, w, y, _ = make_problem()
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(h, w, y, **kwargs)


def test_bad_shapes_and_targets_raise():
    h, w, y, _ = make_problem()
    with pytest.raises(ValueError, match="D"):
        linear_cross_entropy(h[:, :-1], w, y)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(h, w, y[:-1])
    with pytest.raises(ValueError, match="integer"):
        linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(h, w.double(), y)
    for bad in (203, -1):
        y2 = y.clone()
        y2[3] = bad
        with pytest.raises(ValueError, match=r"\[0, 203\)"):
            linear_cross_entropy(h, w, y2)


@pytest.mark.parametrize("shift", [False, True])
def test_ignore_index_none_ignores_no_target(shift):
    """None means "no ignored index" (it used to raise AttributeError): every target counts,
    and the same targets with the default -100 give the same loss."""
    h, w, y, _ = make_problem(ignore_frac=0.0)
    if shift:
        h, y = h.reshape(1, 37, 24), y.reshape(1, 37)
    for reduction in ("mean", "sum", "none"):
        got, stats = linear_cross_entropy(
            h, w, y, ignore_index=None, shift=shift, reduction=reduction, return_stats=True
        )
        want, want_stats = linear_cross_entropy(
            h, w, y, shift=shift, reduction=reduction, return_stats=True
        )
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(stats.correct, want_stats.correct, rtol=0, atol=0)
    z, t = (h[0, :-1] @ w.T, y[0, 1:]) if shift else (h @ w.T, y)
    loss = linear_cross_entropy(h, w, y, ignore_index=None, shift=shift)
    torch.testing.assert_close(loss, F.cross_entropy(z, t), rtol=1e-5, atol=1e-6)
    # -100 is then an ordinary, out-of-range target, not a skipped one.
    y2 = y.clone()
    y2[..., 5] = IGN
    with pytest.raises(ValueError, match=r"ignore_index=None: none is ignored.*e\.g\. -100"):
        linear_cross_entropy(h, w, y2, ignore_index=None, shift=shift)


def test_ignore_index_none_under_shift_checks_only_scored_targets():
    # With shift=True targets[..., 0] is never scored, so it may hold anything.
    h, w, y, _ = make_problem(n=12, ignore_frac=0.0)
    h, y = h.reshape(2, 6, 24), y.reshape(2, 6).clone()
    y[:, 0] = IGN
    loss = linear_cross_entropy(h, w, y, ignore_index=None, shift=True)
    torch.testing.assert_close(loss, linear_cross_entropy(h, w, y, shift=True))


def test_numpy_integer_ignore_index_is_accepted():
    np = pytest.importorskip("numpy")
    h, w, y, _ = make_problem()
    torch.testing.assert_close(
        linear_cross_entropy(h, w, y, ignore_index=np.int64(IGN)), linear_cross_entropy(h, w, y)
    )


def test_lazy_top_level_import():
    import calibrated_lm
    from calibrated_lm.loss import linear_cross_entropy as direct

    assert calibrated_lm.linear_cross_entropy is direct


def test_autocast_does_not_retype_the_computation():
    h, w, y, _ = make_problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, label_smoothing=0.1, impl="torch")
    ref = reference_linear_cross_entropy(h, w, y, label_smoothing=0.1)
    assert loss.dtype == torch.float32 and rel(loss, ref) < 1e-5
    for a, c in zip(grads(loss, None, [h, w]), grads(ref, None, [h, w])):
        assert a.dtype == torch.float32 and rel(a, c) < 1e-5


def test_min_block_rows_floors_the_gradient_block():
    # gemma-3-270m's head in bf16 at 8192 tokens: the memory-fraction rule gives 128 rows.
    args = dict(n=8192, vocab=262144, dim=640, elem_bytes=2, on_gpu=True, weight_grad=True)
    assert chunking.grad_block_rows(**args) == 128
    assert chunking.grad_block_rows(**args, min_rows=1024) == 1024
    assert chunking.grad_block_rows(**args, min_rows=1000) == 1008  # multiples of 16
    assert chunking.grad_block_rows(**{**args, "n": 300}, min_rows=1024) == 300
    assert chunking.grad_block_rows(**{**args, "dim": 8192}, min_rows=1024) > 1024  # no cap


def test_min_block_rows_changes_blocks_not_results(small_blocks):
    """One block of all rows against many: same loss, statistics and gradients."""
    h, w, y, b = make_problem(n=61, bias=True)
    out = {}
    for rows in (0, 64):
        loss, stats = linear_cross_entropy(
            h, w, y, bias=b, label_smoothing=0.1, return_stats=True, min_block_rows=rows
        )
        out[rows] = (loss, stats.entropy, *grads(loss, None, (h, w, b)))
    assert chunking.grad_block_rows(61, 203, 24, 4, False, True) < 61  # several blocks at 0
    for a, c in zip(out[0], out[64]):
        assert rel(a, c) < 1e-6


def test_the_side_stream_is_made_once_per_device(monkeypatch):
    """A new CUDA stream per call kept one more cuBLAS workspace alive per call (engine.py):
    the second stream must be made once per device and then reused."""
    from calibrated_lm.loss import engine

    made: list[int] = []

    def fake_stream(index: int) -> object:
        made.append(index)
        return object()

    monkeypatch.setattr(engine.torch.cuda, "Stream", fake_stream)
    monkeypatch.setattr(engine, "_SIDE_STREAMS", {})
    first = engine._side_stream(torch.device("cuda", 0))
    assert engine._side_stream(torch.device("cuda", 0)) is first and made == [0]
    assert engine._side_stream(torch.device("cuda", 1)) is not first and made == [0, 1]
    assert engine._side_stream(torch.device("cpu")) is None
    monkeypatch.setenv("CALIBRATED_LM_LCE_STREAMS", "0")
    assert engine._side_stream(torch.device("cuda", 0)) is None


def test_vocab_outer_order_runs_several_tiles(small_blocks):
    # The oracle test above must exercise more than one vocabulary tile in that order.
    h, _, _, _ = make_problem()
    cols = chunking.grad_block_cols(h.shape[0], 203, h.shape[1], 4, False, True)
    assert cols < 203


def test_unknown_loop_order_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CALIBRATED_LM_LCE_ORDER", "columns")
    h, w, y, _ = make_problem()
    with pytest.raises(ValueError, match="must be 'token', 'vocab' or 'auto', not 'columns'"):
        linear_cross_entropy(h, w, y, impl="torch")


def test_auto_order_takes_vocab_outer_only_for_small_gpu_blocks_with_a_weight_gradient():
    from calibrated_lm.loss.engine import AUTO_VOCAB_MAX_ROWS, choose_order

    small, large, n = AUTO_VOCAB_MAX_ROWS, AUTO_VOCAB_MAX_ROWS + 16, 8192
    assert choose_order("auto", small, n, on_gpu=True, weight_grad=True) == "vocab"
    assert choose_order("auto", large, n, on_gpu=True, weight_grad=True) == "token"
    assert choose_order("auto", small, n, on_gpu=True, weight_grad=False) == "token"
    assert choose_order("auto", small, n, on_gpu=False, weight_grad=True) == "token"
    # One block (rows = N): the weight gradient is written once in either order.
    assert choose_order("auto", 200, 200, on_gpu=True, weight_grad=True) == "token"
    # An explicit order is never overridden.
    assert choose_order("vocab", large, n, on_gpu=False, weight_grad=False) == "vocab"
    assert choose_order("token", small, n, on_gpu=True, weight_grad=True) == "token"


def test_the_loss_asks_choose_order_with_its_block_rows_device_and_weight_flag(monkeypatch):
    import calibrated_lm.loss.engine as engine

    seen = []
    real = engine.choose_order

    def spy(order, rows, n, on_gpu, weight_grad):
        seen.append((order, rows, n, on_gpu, weight_grad))
        return real(order, rows, n, on_gpu, weight_grad)

    monkeypatch.setattr(engine, "choose_order", spy)
    monkeypatch.setenv("CALIBRATED_LM_LCE_ORDER", "auto")
    h, w, y, _ = make_problem()
    hh = h.detach().clone().requires_grad_()
    linear_cross_entropy(hh, w.detach(), y, label_smoothing=0.1, impl="torch").backward()
    ((order, rows, n, on_gpu, weight_grad),) = seen
    assert (order, n, on_gpu, weight_grad) == ("auto", h.shape[0], False, False)
    # The token order's own rows for this shape (no weight gradient, no min_block_rows floor).
    from calibrated_lm.loss import chunking

    n_, d = h.shape
    assert rows == chunking.grad_block_rows(n_, w.shape[0], d, h.element_size(), False, False)


def test_a_minus_inf_logit_at_eps_0_gives_pytorchs_loss():
    """A bias of -inf masks a token: at eps 0 the loss ignores it, as F.cross_entropy does
    (the smoothing term's sum over logits, -inf there, is not formed); at eps > 0 the
    smoothed target gives the masked token mass, so the loss is +inf, as in PyTorch."""
    h, w, y, _ = make_problem(bias=False, ignore_frac=0.0)
    bias = torch.zeros(w.shape[0])
    bias[5] = float("-inf")
    y = torch.where(y == 5, torch.full_like(y, 6), y)
    want = F.cross_entropy((h.double() @ w.double().T + bias.double()), y)
    got = linear_cross_entropy(h, w, y, bias=bias, impl="torch")
    assert torch.isfinite(got) and abs(got.item() - want.item()) < 1e-5
    smoothed = linear_cross_entropy(h, w, y, bias=bias, label_smoothing=0.1, impl="torch")
    assert smoothed.item() == float("inf")
    assert F.cross_entropy(h @ w.T + bias, y, label_smoothing=0.1).item() == float("inf")
