"""The Triton path of linear_cross_entropy against the float64 oracle.

On the CPU these run only under ``TRITON_INTERPRET=1`` (as ``make test`` sets), at small
float32 shapes; with CUDA they also check bf16/fp16 and larger, block-straddling shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from calibrated_lm import linear_cross_entropy
from calibrated_lm.loss import chunking, reference_linear_cross_entropy

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1 for the Triton path"
)
DEVICE = "cuda" if CUDA else "cpu"
IGN = -100


def make_problem(n, d, v, dtype=torch.float32, seed=0, bias=False, ignore_frac=0.2, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * scale / d**0.5).to(DEVICE, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = IGN
    b = torch.randn(v, generator=g).to(DEVICE, dtype).requires_grad_() if bias else None
    return h, w, y.to(DEVICE), b


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def grads(loss, upstream, params):
    params = [p for p in params if p is not None]
    return torch.autograd.grad(loss if upstream is None else (loss * upstream).sum(), params)


@pytest.fixture
def small_blocks(monkeypatch):
    """Several row blocks and vocabulary tiles even at tiny shapes."""
    monkeypatch.setattr(chunking, "_CPU_BLOCK", 16 * 300 * 4)
    monkeypatch.setattr(chunking, "_GPU_MIN_BLOCK", 16 * 300 * 4)
    monkeypatch.setattr(chunking, "DEFAULT_MEMORY_FRACTION", 0.0)
    monkeypatch.setattr(chunking, "_CPU_FORWARD_TILE", 40 * 128 * 4)
    monkeypatch.setattr(chunking, "_GPU_FORWARD_TILE", 40 * 128 * 4)


CASES = [
    dict(label_smoothing=0.0),
    dict(label_smoothing=0.1, softcap=2.5),
    dict(label_smoothing=1.0, z_loss=1e-2, bias=True),
    dict(label_smoothing=0.3, softcap=4.0, z_loss=1e-3, bias=True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("order", ["token", "vocab"])
def test_triton_matches_float64_oracle_fp32(case, reduction, order, small_blocks, monkeypatch):
    monkeypatch.setenv("CALIBRATED_LM_LCE_ORDER", order)
    case = dict(case)
    # V = 300: not a multiple of any block size; 40 rows -> 3 row blocks, 3 vocab tiles.
    h, w, y, b = make_problem(40, 24, 300, bias=case.pop("bias", False), seed=len(case))
    kw = dict(bias=b, reduction=reduction, return_stats=True, **case)
    loss, st = linear_cross_entropy(h, w, y, impl="triton", **kw)
    ref, rst = reference_linear_cross_entropy(h, w, y, **kw)
    up = torch.randn(loss.shape, device=DEVICE) if reduction == "none" else None
    assert rel(loss, ref) < 1e-4
    for got, want in zip(grads(loss, up, [h, w, b]), grads(ref, up, [h, w, b])):
        assert rel(got, want) < 1e-4
    for name in ("lse", "entropy", "confidence"):
        assert rel(getattr(st, name), getattr(rst, name)) < 1e-4, name
    assert torch.equal(st.correct, rst.correct)


def test_triton_no_grad_sum_and_shift(small_blocks):
    g = torch.Generator().manual_seed(11)
    h = torch.randn(2, 21, 24, generator=g).to(DEVICE)
    w = torch.randn(300, 24, generator=g).to(DEVICE)
    y = torch.randint(0, 300, (2, 21), generator=g).to(DEVICE)
    kw = dict(label_smoothing=0.1, softcap=6.0, reduction="sum", return_stats=True)
    with torch.no_grad():
        loss, st = linear_cross_entropy(h, w, y, shift=True, impl="triton", **kw)
    ref, rst = reference_linear_cross_entropy(h[:, :-1], w, y[:, 1:], **kw)
    assert rel(loss, ref) < 1e-4 and st.entropy.shape == (2, 20)
    assert rel(st.confidence, rst.confidence) < 1e-4


def test_triton_fused_forward_strided_inputs_with_bias():
    g = torch.Generator().manual_seed(13)
    h = torch.randn(24, 45, generator=g).to(DEVICE).T  # (45, 24), column-major
    w = torch.randn(24, 2 * 333, generator=g).to(DEVICE).T[::2]  # (333, 24), strided
    b = torch.randn(333, generator=g).to(DEVICE)
    y = torch.randint(0, 333, (45,), generator=g).to(DEVICE)
    y[::7] = IGN
    kw = dict(bias=b, label_smoothing=0.2, z_loss=1e-3, reduction="none", return_stats=True)
    with torch.no_grad():
        loss, st = linear_cross_entropy(h, w, y, impl="triton", **kw)
    ref, rst = reference_linear_cross_entropy(h, w, y, **kw)
    assert rel(loss, ref) < 1e-4 and rel(st.entropy, rst.entropy) < 1e-4
    assert rel(st.lse, rst.lse) < 1e-4 and torch.equal(st.correct, rst.correct)


def test_triton_fused_forward_without_stats():
    h, w, y, b = make_problem(50, 24, 300, bias=True, seed=21)
    kw = dict(bias=b, label_smoothing=0.1, softcap=3.0, reduction="none")
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, impl="triton", **kw)
    assert rel(loss, reference_linear_cross_entropy(h, w, y, **kw)) < 1e-4


def test_triton_all_ignored_is_zero():
    h, w, y, _ = make_problem(8, 16, 70)
    y[:] = IGN
    loss = linear_cross_entropy(h, w, y, label_smoothing=0.1, impl="triton")
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, [h, w]))


@pytest.mark.skipif(not CUDA, reason="bf16/fp16 tl.dot is only meaningful on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("update", ["cublas", "triton", "vocab-outer"])
def test_low_precision_no_worse_than_twice_pytorch(dtype, blocks, update, monkeypatch):
    # update: the weight-gradient update of the token-outer order (CALIBRATED_LM_LCE_GRAD_W),
    # or the vocabulary-outer order (CALIBRATED_LM_LCE_ORDER=vocab), which has none.
    if update == "vocab-outer":
        monkeypatch.setenv("CALIBRATED_LM_LCE_ORDER", "vocab")
    else:
        monkeypatch.setenv("CALIBRATED_LM_LCE_GRAD_W", update)
    if blocks == "many":
        monkeypatch.setattr(chunking, "_GPU_MIN_BLOCK", 256 * 50257 * 2)
        monkeypatch.setattr(chunking, "DEFAULT_MEMORY_FRACTION", 0.0)
    h, w, y, _ = make_problem(2048, 256, 50257, dtype=dtype, seed=3, ignore_frac=0.1)
    eps = 0.1
    ref = reference_linear_cross_entropy(h, w, y, label_smoothing=eps, dtype=torch.float64)
    ref_g = grads(ref, None, [h, w])
    pt = F.cross_entropy((h @ w.T).float(), y, label_smoothing=eps, ignore_index=IGN)
    pt_g = grads(pt, None, [h, w])
    loss = linear_cross_entropy(h, w, y, label_smoothing=eps, impl="triton")
    ours_g = grads(loss, None, [h, w])
    assert rel(loss, ref) <= 2 * rel(pt, ref) + 1e-6
    for name, a, t, r in zip(("hidden", "weight"), ours_g, pt_g, ref_g):
        assert rel(a, r) <= 2 * rel(t, r), (name, rel(a, r), rel(t, r))


@pytest.mark.skipif(not CUDA, reason="GPU only")
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_bf16_forward_no_worse_than_twice_pytorch(softcap):
    h, w, y, _ = make_problem(1024, 256, 50257, dtype=torch.bfloat16, seed=8, scale=8.0)
    kw = dict(label_smoothing=0.1, softcap=softcap, reduction="none")
    ref = reference_linear_cross_entropy(h, w, y, **kw)
    with torch.no_grad():
        ours = linear_cross_entropy(h, w, y, impl="triton", **kw)
        z = (h @ w.T).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        pt = F.cross_entropy(z, y, label_smoothing=0.1, ignore_index=IGN, reduction="none")
    assert rel(ours, ref) <= 2 * rel(pt, ref), (rel(ours, ref), rel(pt, ref))


@pytest.mark.skipif(not CUDA, reason="GPU only")
def test_gpu_fp32_large_vocab_softcap():
    h, w, y, b = make_problem(1000, 128, 32064, bias=True, seed=5)
    kw = dict(bias=b, label_smoothing=0.1, softcap=30.0, z_loss=1e-4)
    loss = linear_cross_entropy(h, w, y, impl="triton", **kw)
    ref = reference_linear_cross_entropy(h, w, y, **kw)
    assert rel(loss, ref) < 1e-4
    for a, r in zip(grads(loss, None, [h, w, b]), grads(ref, None, [h, w, b])):
        assert rel(a, r) < 1e-4


_GROWTH_CHECK = """
import torch
from calibrated_lm import linear_cross_entropy
g = torch.Generator().manual_seed(3)
h = torch.randn(512, 128, generator=g).cuda().bfloat16().requires_grad_()
w = (torch.randn(8192, 128, generator=g) / 4).cuda().bfloat16().requires_grad_()
y = torch.randint(0, 8192, (512,), generator=g).cuda()
def step():
    linear_cross_entropy(h, w, y, impl="triton", label_smoothing=0.1).backward()
    h.grad = w.grad = None
step()  # the first call makes the stream and its workspace
torch.cuda.synchronize()
before = torch.cuda.memory_allocated()
for _ in range(40):
    step()
torch.cuda.synchronize()
print(torch.cuda.memory_allocated() - before)
"""


@pytest.mark.skipif(not CUDA, reason="GPU only")
def test_gpu_repeated_calls_do_not_grow_memory():
    """Each call's side stream used to be a new one from torch's pool of 32, and each kept
    its own 32 MiB cuBLAS workspace: 40 calls grew the allocated memory by up to 1 GiB. In a
    fresh process, so that no earlier test has already given every pooled stream one."""
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-c", _GROWTH_CHECK], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) < 2**20, res.stdout


@pytest.mark.parametrize("beta", [False, True])
def test_grad_weight_kernel_matches_float64(beta):
    # Shapes that are multiples of no tile: R = 37 rows, V = 300, D = 40; the block is a view
    # into a longer buffer, as the engine's is.
    from calibrated_lm.loss.triton_backend import TritonBackend

    g = torch.Generator().manual_seed(5)
    buf = torch.randn(37 * 300 + 11, generator=g).to(DEVICE)
    block = buf[: 37 * 300].view(37, 300)
    h = torch.randn(37, 40, generator=g).to(DEVICE)
    c = torch.randn(300, 40, generator=g).to(DEVICE)
    want = block.double().T @ h.double() + (c.double() if beta else 0.0)
    TritonBackend().grad_weight_(c, block, h, beta)
    assert rel(c, want) < 1e-6


@pytest.mark.parametrize("case", CASES[1:3])
def test_triton_weight_update_kernel_in_the_loss(case, small_blocks, monkeypatch):
    # CALIBRATED_LM_LCE_GRAD_W=triton: the weight gradient from the Triton update over
    # several row blocks (the first writes, the later accumulate) matches the oracle.
    monkeypatch.setenv("CALIBRATED_LM_LCE_GRAD_W", "triton")
    case = dict(case)
    h, w, y, b = make_problem(40, 24, 300, bias=case.pop("bias", False), seed=7)
    kw = dict(bias=b, label_smoothing=case.pop("label_smoothing"), **case)
    loss = linear_cross_entropy(h, w, y, impl="triton", **kw)
    ref = reference_linear_cross_entropy(h, w, y, **kw)
    for got, want in zip(grads(loss, None, [h, w, b]), grads(ref, None, [h, w, b])):
        assert rel(got, want) < 1e-4


@pytest.mark.parametrize("update", ["vocab-outer", "triton"])
def test_switches_accept_column_major_inputs(update, monkeypatch):
    # Both switches hand the Triton update rows of the hidden states or of the weight: a
    # column-major hidden or weight (any strides are accepted) must work there too.
    monkeypatch.setenv(
        *(
            ("CALIBRATED_LM_LCE_ORDER", "vocab")
            if update == "vocab-outer"
            else ("CALIBRATED_LM_LCE_GRAD_W", "triton")
        )
    )
    g = torch.Generator().manual_seed(17)
    h = torch.randn(24, 40, generator=g).to(DEVICE).T.requires_grad_()  # (40, 24), column-major
    w = (torch.randn(24, 300, generator=g) * 0.3).to(DEVICE).T.requires_grad_()
    y = torch.randint(0, 300, (40,), generator=g).to(DEVICE)
    loss = linear_cross_entropy(h, w, y, label_smoothing=0.1, impl="triton")
    ref = reference_linear_cross_entropy(h, w, y, label_smoothing=0.1)
    for got, want in zip(grads(loss, None, [h, w]), grads(ref, None, [h, w])):
        assert rel(got, want) < 1e-4


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_vocab_order_is_as_exact_as_token_order_in_bf16_when_confident(softcap, monkeypatch):
    # Confident targets (large logits, target = argmax) in bf16: the vocabulary-outer order
    # must take its softmax statistics from the same rounded logits as its gradient. With
    # statistics from fp32 logits (session 20's first version, e5cbfb7's parent) this test
    # fails for both softcaps.
    g = torch.Generator().manual_seed(0)
    h = torch.randn(128, 64, generator=g).bfloat16().to(DEVICE)
    w = (torch.randn(1024, 64, generator=g) * 8.0 / 64**0.5).bfloat16().to(DEVICE)
    y = (h.float() @ w.float().T).argmax(1)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    want = grads(reference_linear_cross_entropy(h64, w64, y, softcap=softcap), None, [h64, w64])
    errs = {}
    for order in ("token", "vocab"):
        monkeypatch.setenv("CALIBRATED_LM_LCE_ORDER", order)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        got = grads(linear_cross_entropy(hh, ww, y, softcap=softcap, impl="triton"), None, [hh, ww])
        errs[order] = [rel(a, b) for a, b in zip(got, want)]
    for name, tok, voc in zip(("hidden", "weight"), errs["token"], errs["vocab"]):
        assert voc <= 1.25 * tok, (name, voc, tok)


@pytest.mark.parametrize("grad", [False, True])
def test_strided_bias_and_targets_read_as_their_values(grad):
    """The kernels index bias and targets by position: views with a stride of 2 (a slice)
    must give the loss of their contiguous copies, not of every other element, nor an
    assertion."""
    h, w, y, b = make_problem(12, 8, 20, bias=True)
    b2 = torch.randn(40, device=DEVICE)[::2].requires_grad_(grad)
    y2 = torch.stack([y, y.flip(0)], 1).reshape(-1)[::2]  # int64, stride 2
    assert not b2.is_contiguous() and not y2.is_contiguous() and y2.dtype == torch.int64
    with torch.set_grad_enabled(grad):
        got = linear_cross_entropy(h, w, y2, bias=b2, label_smoothing=0.1, impl="triton")
        want = reference_linear_cross_entropy(
            h.double(),
            w.double(),
            y2.contiguous(),
            bias=b2.detach().contiguous().double(),
            label_smoothing=0.1,
        )
    assert rel(got, want) < 1e-5
    if grad:
        gb = torch.autograd.grad(got, b2)[0]
        bd = b2.detach().double().requires_grad_()
        ref = reference_linear_cross_entropy(
            h.detach().double(),
            w.detach().double(),
            y2.contiguous(),
            bias=bd,
            label_smoothing=0.1,
        )
        assert rel(gb, torch.autograd.grad(ref, bd)[0]) < 1e-5
