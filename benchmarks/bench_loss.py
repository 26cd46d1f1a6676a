"""Benchmark linear cross-entropy implementations on one GPU, all methods in one run.

Problem (issue 3): N tokens (10% ignored), bf16 hidden (N, D) and weight (V, D), eps = 0.1.
Methods: PyTorch eager (logits upcast to fp32, as transformers does), torch.compile of the
same, Liger's fused linear CE, Cut Cross-Entropy (eps = 0: it has no smoothing; its own
default gradient filtering), TRL's chunked log-prob kernel (eps = 0: the NLL path of
``trl.SFTTrainer``, with the entropy and top-1 outputs that trainer asks for; only where TRL
is installed), and ours (calibrated_lm.linear_cross_entropy, several memory
fractions, the Triton weight-gradient update and the vocabulary-outer order). For each: median forward (no grad) and forward+backward time (CUDA events), peak
extra memory (peak allocated minus allocated before the call; for forward+backward the
returned gradients are included), and relative errors of the loss, hidden gradient and weight
gradient against an fp32 reference computed in row chunks with plain PyTorch (TF32 off).

Usage: python benchmarks/bench_loss.py --out benchmarks/results/loss_h100
Writes <out>.json (every number) and <out>.md (the table); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

IGN = -100
EPS = 0.1
MIB = 1 << 20
FRACTION = "CALIBRATED_LM_LCE_MEMORY_FRACTION"
GRAD_W = "CALIBRATED_LM_LCE_GRAD_W"
ORDER = "CALIBRATED_LM_LCE_ORDER"

SHAPES = {
    # name: (N, D, V, softcap)
    "gemma2-2b": (8192, 2304, 256000, None),
    "gemma2-2b softcap30": (8192, 2304, 256000, 30.0),
    "gemma2-2b N16384": (16384, 2304, 256000, None),
    "gemma2-2b N32768": (32768, 2304, 256000, None),
    "gemma2-2b N65536": (65536, 2304, 256000, None),
    "llama3-8b": (8192, 4096, 128256, None),
    "mistral-7b": (8192, 4096, 32000, None),
    # The head of issue 13's TRL step (bench_trl_step.py: 8 x 1024 tokens): is the loss where
    # that step loses its time against TRL's NLL path?
    "gemma3-270m": (8192, 640, 262144, None),
}


def make_inputs(n, d, v, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    w = (torch.randn(v, d, device="cuda", generator=g) * (2.0 / math.sqrt(d))).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < 0.1] = IGN
    return h, w, y


def reference(h, w, y, eps, softcap, rows=1024):
    """fp32 loss (mean), hidden and weight gradients, chunked over rows; plain PyTorch."""
    w32 = w.float().requires_grad_()
    n_valid = (y != IGN).sum().clamp(min=1)
    gh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    gw = torch.zeros_like(w32)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for r0 in range(0, h.shape[0], rows):
        hc = h[r0 : r0 + rows].float().requires_grad_()
        z = hc @ w32.T
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        loss = F.cross_entropy(
            z, y[r0 : r0 + rows], ignore_index=IGN, label_smoothing=eps, reduction="sum"
        )
        loss = loss / n_valid
        a, b = torch.autograd.grad(loss, [hc, w32])
        gh[r0 : r0 + rows] = a
        gw += b
        total += loss.detach().double()
        del z, loss, a, b
    return total.float(), gh, gw


def rel(a, b, rows=1 << 14):
    """||a - b|| / ||b|| with a on the GPU and b on the host, in row chunks (no big copies)."""
    a, b = a.reshape(a.shape[0] if a.dim() else 1, -1), b.reshape(b.shape[0] if b.dim() else 1, -1)
    num = torch.zeros((), dtype=torch.float64, device=a.device)
    den = torch.zeros((), dtype=torch.float64, device=a.device)
    for r0 in range(0, a.shape[0], rows):
        bb = b[r0 : r0 + rows].to(a.device).double()
        num += (a[r0 : r0 + rows].double() - bb).square().sum()
        den += bb.square().sum()
    return (num / den).sqrt().item()


# ---- methods: each returns fn(h, w, y) -> scalar loss ------------------------------------


def torch_loss(softcap, eps):
    def fn(h, w, y):
        z = (h @ w.T).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z, y, ignore_index=IGN, label_smoothing=eps)

    return fn


def liger_loss(softcap, eps):
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    mod = LigerFusedLinearCrossEntropyLoss(ignore_index=IGN, label_smoothing=eps, softcap=softcap)
    return lambda h, w, y: mod(w, h, y)


def cce_loss(softcap, eps):
    from cut_cross_entropy import linear_cross_entropy as cce

    assert eps == 0.0
    return lambda h, w, y: cce(h, w, y, ignore_index=IGN, softcap=softcap)


def trl_nll_loss(softcap, eps):
    """TRL's ``ChunkedLogProbFunction`` as ``trl.SFTTrainer``'s fused head calls it: valid
    rows only, log-probs plus entropy and top-1 (its logged metrics), mean NLL."""
    from trl.kernels import ChunkedLogProbFunction

    assert eps == 0.0

    def fn(h, w, y):
        keep = y != IGN
        out = ChunkedLogProbFunction.apply(
            h[keep], w, None, y[keep], 1.0, 32768, softcap, 1.0, ("log_probs", "entropy", "is_top1")
        )
        return -out[0].mean()

    return fn


def ours_loss(softcap, eps, env=None):
    from calibrated_lm import linear_cross_entropy

    def fn(h, w, y):
        saved = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})
        try:
            return linear_cross_entropy(
                h, w, y, label_smoothing=eps, softcap=softcap, ignore_index=IGN, impl="triton"
            )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return fn


def methods(softcap):
    compiled = torch.compile(torch_loss(softcap, EPS))
    return [
        ("PyTorch eager", EPS, lambda: torch_loss(softcap, EPS)),
        ("torch.compile", EPS, lambda: compiled),
        ("Liger fused linear CE", EPS, lambda: liger_loss(softcap, EPS)),
        ("Cut Cross-Entropy (eps=0)", 0.0, lambda: cce_loss(softcap, 0.0)),
        ("TRL chunked NLL (eps=0)", 0.0, lambda: trl_nll_loss(softcap, 0.0)),
        ("ours", EPS, lambda: ours_loss(softcap, EPS)),
        ("ours, memory fraction 0.1", EPS, lambda: ours_loss(softcap, EPS, {FRACTION: "0.1"})),
        ("ours, memory fraction 0.3", EPS, lambda: ours_loss(softcap, EPS, {FRACTION: "0.3"})),
        # Session 20's two alternatives to the weight gradient's per-block cuBLAS update.
        ("ours, Triton weight update", EPS, lambda: ours_loss(softcap, EPS, {GRAD_W: "triton"})),
        ("ours, vocabulary-outer", EPS, lambda: ours_loss(softcap, EPS, {ORDER: "vocab"})),
    ]


# ---- measuring ------------------------------------------------------------------------------


def timed(run: Callable[[], object], budget_s: float = 1.5, max_reps: int = 15):
    """Median time (ms) of run() over repetitions after two warm-ups, CUDA events."""
    for _ in range(2):
        out = run()
        del out
    torch.cuda.synchronize()
    times = []
    t_total = 0.0
    while len(times) < max_reps and (len(times) < 3 or t_total < budget_s * 1000):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = run()
        b.record()
        torch.cuda.synchronize()
        del out
        times.append(a.elapsed_time(b))
        t_total += times[-1]
    return statistics.median(times), len(times)


def peak_extra(run: Callable[[], object]):
    """(peak allocated - allocated before) in MiB, and run()'s output."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB, out


def bench_shape(name, n, d, v, softcap, log):
    h, w, y = make_inputs(n, d, v)
    # fp32 references, kept on the host so that they do not shrink the GPU memory under test.
    refs = {}
    for eps in (EPS, 0.0):
        refs[eps] = tuple(t.cpu().pin_memory() for t in reference(h, w, y, eps, softcap))
        torch.cuda.empty_cache()
    rows = []
    grad_mib = (n * d + v * d) * 2 / MIB
    for label, eps, factory in methods(softcap):
        row = {"shape": name, "N": n, "D": d, "V": v, "softcap": softcap, "method": label}
        row["eps"] = eps
        row["grad_outputs_mib"] = grad_mib
        try:
            fn = factory()
            hq = h.detach().requires_grad_()
            wq = w.detach().requires_grad_()

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(h, w, y)

            def fwd_bwd(fn=fn, hq=hq, wq=wq):
                loss = fn(hq, wq, y)
                return (loss.detach(),) + torch.autograd.grad(loss, [hq, wq])

            for phase, run in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                try:
                    run()  # compile / autotune outside the memory and time measurements
                    mem, out = peak_extra(run)
                    row[f"{phase}_mib"] = mem
                    loss_ref, gh_ref, gw_ref = refs[eps]
                    if phase == "fwd":
                        row["fwd_loss_rel_err"] = rel(out, loss_ref)
                    else:
                        row["loss_rel_err"] = rel(out[0], loss_ref)
                        row["hidden_grad_rel_err"] = rel(out[1], gh_ref)
                        row["weight_grad_rel_err"] = rel(out[2], gw_ref)
                    del out
                    row[f"{phase}_ms"], row[f"{phase}_reps"] = timed(run)
                except torch.cuda.OutOfMemoryError:
                    row[f"{phase}_error"] = "OOM"
                    torch.cuda.empty_cache()
        except Exception as exc:  # a peer failing to import/run must not stop the benchmark
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc(file=log)
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), file=log, flush=True)
    del refs
    torch.cuda.empty_cache()
    return rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def cell(r, key, spec):
    if f"{key.rsplit('_', 1)[0]}_error" in r:
        return r[f"{key.rsplit('_', 1)[0]}_error"]
    return fmt(r.get(key), spec)


def table(rows, meta):
    lines = [
        f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; "
        f"bf16 inputs, 10% ignored tokens, eps = {EPS} (Cut Cross-Entropy and TRL: eps = 0).",
        f"Ours: weight-gradient update {meta.get('grad_w_update', 'cublas')}, side stream "
        f"{'on' if meta.get('side_stream', True) else 'off'}.",
        "",
        "| shape | method | fwd ms | fwd+bwd ms | fwd extra MiB | fwd+bwd extra MiB "
        "| fwd+bwd extra / grads | fwd loss rel. err | loss rel. err | hidden-grad rel. err "
        "| weight-grad rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | error: {r['error'][:80]} ||||||||| |")
            continue
        ratio = r["fwd_bwd_mib"] / r["grad_outputs_mib"] if "fwd_bwd_mib" in r else None
        lines.append(
            f"| {r['shape']} | {r['method']} | {cell(r, 'fwd_ms', '.1f')} | "
            f"{cell(r, 'fwd_bwd_ms', '.1f')} | {cell(r, 'fwd_mib', ',.1f')} | "
            f"{cell(r, 'fwd_bwd_mib', ',.0f')} | {fmt(ratio, '.2f')} | "
            f"{fmt(r.get('fwd_loss_rel_err'), '.1e')} | "
            f"{fmt(r.get('loss_rel_err'), '.1e')} | {fmt(r.get('hidden_grad_rel_err'), '.4f')} | "
            f"{fmt(r.get('weight_grad_rel_err'), '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def breakdown(n, d, v, log):
    """Time each step of one block of our gradient pass and one forward-only tile."""
    from calibrated_lm.loss import chunking
    from calibrated_lm.loss.config import LossConfig
    from calibrated_lm.loss.engine import new_accumulators
    from calibrated_lm.loss.triton_backend import TritonBackend

    h, w, y = make_inputs(n, d, v)
    be, cfg = TritonBackend(), LossConfig(label_smoothing=EPS, ignore_index=IGN)
    rows = chunking.grad_block_rows(n, v, d, 2, True, True)
    blk = torch.empty(rows, v, dtype=h.dtype, device="cuda")
    acc, idx = new_accumulators(rows, h.device)
    lse = torch.randn(rows, device="cuda") + math.log(v)
    scale = torch.ones(rows, device="cuda")
    gw = torch.empty_like(w)
    gh = torch.empty(rows, d, dtype=h.dtype, device="cuda")
    hb, yb = h[:rows], y[:rows]
    steps = {
        "logits mm": lambda: torch.mm(hb, w.T, out=blk),
        "row_update": lambda: be.update(acc, idx, blk, 0, None, yb, cfg),
        "row_grad": lambda: be.grad_(blk, lse, yb, None, scale, cfg),
        "grad_h mm": lambda: torch.mm(blk, w, out=gh),
        "grad_w addmm": lambda: gw.addmm_(blk.T, hb),
    }
    steps["fused forward (no grad)"] = lambda: be.forward_stats(h, w, None, y, cfg)
    out = {"shape": [n, d, v], "block_rows": rows}
    for k, fn in steps.items():
        out[k + " ms"] = timed(fn, budget_s=0.3)[0]
    out["blocks"] = math.ceil(n / rows)
    from calibrated_lm.loss import triton_backend

    best = getattr(triton_backend._fused_forward_tuned, "best_config", None)
    out["fused forward config"] = str(best)
    print(json.dumps(out), file=log, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/loss_h100")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument(
        "--breakdown",
        nargs="*",
        default=None,
        metavar="SHAPE",
        help="also time each step of ours, at these shapes (none named: every shape run)",
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU.", file=sys.stderr)
        return 2
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        # ours' settings from the environment (engine.py): the weight-gradient update and the
        # side stream.
        "grad_w_update": os.environ.get("CALIBRATED_LM_LCE_GRAD_W", "cublas"),
        "side_stream": os.environ.get("CALIBRATED_LM_LCE_STREAMS", "1") != "0",
    }
    for pkg in ("liger_kernel", "cut_cross_entropy", "trl"):
        try:
            from importlib.metadata import version

            meta[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            meta[pkg] = None
    if args.breakdown is not None:
        unknown = sorted(set(args.breakdown) - set(SHAPES))
        if unknown:
            p.error(f"--breakdown: unknown shape(s) {', '.join(unknown)}")
        named = args.breakdown or args.shapes
        meta["breakdown"] = []
        for k in named:
            try:
                meta["breakdown"].append(breakdown(*SHAPES[k][:3], log=sys.stderr))
            except Exception as exc:  # the table after it matters more than the breakdown
                meta["breakdown"].append({"shape": k, "error": f"{type(exc).__name__}: {exc}"})
                traceback.print_exc(file=sys.stderr)
                torch.cuda.empty_cache()
    rows = []
    for name in tqdm(args.shapes, desc="shapes", file=sys.stderr):
        rows += bench_shape(name, *SHAPES[name], log=sys.stderr)
        # Write after each shape so that a time-out keeps what was measured.
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(table(rows, meta))
    print(table(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
