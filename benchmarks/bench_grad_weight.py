"""The weight-gradient update of the fused loss: cuBLAS against the Triton kernel (issue 15).

Question: at the Gemma-2 head (V 256,000, D 2,304) the loss's backward pays ~11 ms of its
61 ms for ``grad_W += G.T @ h_blk``, one read-modify-write of the (V, D) weight gradient per
token block (benchmarks/NOTES.md, "Where the targets stand"). cuBLAS's addmm took 1.41 ms per
464-row block where its product alone is ~0.77 ms. Does a kernel that reads the old tile while
its products run (``loss/kernels/grad_weight.py``) close that gap?

Part 1, the update alone, per (R, V, D) block shape: cuBLAS ``mm`` (beta 0) and ``addmm``
(beta 1) against the Triton kernel with beta 0 and 1; median of ``triton.testing.do_bench``,
the rate in TFLOP/s and TB/s (bf16: 4 bytes per element of C with beta 1, 2 without), and each
result's relative error against an fp32 product (TF32 off).
Part 2, the whole loss forward+backward (``linear_cross_entropy``, eps 0.1, 10% of targets
ignored) in each of ``LOSS_VARIANTS``: the default, the side stream off, the Triton update
(``CALIBRATED_LM_LCE_GRAD_W=triton``) with and without it, and the vocabulary-outer order
(``CALIBRATED_LM_LCE_ORDER=vocab``), all in this one process: median time, peak extra memory
(the returned gradients included), and the loss's and gradients' relative errors against
bench_loss.py's fp32 reference.

Usage (on a GPU): python benchmarks/bench_grad_weight.py --out DIR
Writes DIR/grad_weight.md and DIR/grad_weight.json after each part; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (R rows of the token block, V, D): Gemma-2-2B's head at the default memory fraction (464
# rows) and at larger blocks; gemma-3-270m's at the default fraction's 128 rows (bench_loss's
# row, session 13), 512 and patch_model's 1,024-row floor.
UPDATE_SHAPES = [
    (464, 256000, 2304),
    (1024, 256000, 2304),
    (2048, 256000, 2304),
    (128, 262144, 640),
    (512, 262144, 640),
    (1024, 262144, 640),
]
# (name, N, D, V) for part 2.
LOSS_SHAPES = [
    ("gemma2-2b", 8192, 2304, 256000),
    ("gemma3-270m", 8192, 640, 262144),
    ("gemma2-2b N65536", 65536, 2304, 256000),
]
# Part 2's settings of ours (engine.py's switches; unset ones take their defaults): the
# default, the side stream off, the Triton update with and without it, the other loop order.
ENV_VARS = ("CALIBRATED_LM_LCE_GRAD_W", "CALIBRATED_LM_LCE_STREAMS", "CALIBRATED_LM_LCE_ORDER")
LOSS_VARIANTS = {
    "token_cublas": {},
    "token_cublas_onestream": {"CALIBRATED_LM_LCE_STREAMS": "0"},
    "token_triton": {"CALIBRATED_LM_LCE_GRAD_W": "triton"},
    "token_triton_onestream": {
        "CALIBRATED_LM_LCE_GRAD_W": "triton",
        "CALIBRATED_LM_LCE_STREAMS": "0",
    },
    "vocab_outer": {"CALIBRATED_LM_LCE_ORDER": "vocab"},
}
# --crossover: where the vocabulary-outer order stops paying (session 20 measured it at 128
# token-order rows, 0.52x the default, and at 464, 1.15x): Gemma 3's vocabulary at N 8,192
# with D from 640 to 2,304, so the default's rows are 128, 208, 304, 416 and 464.
CROSSOVER_SHAPES = [(f"V262144 D{d}", 8192, d, 262144) for d in (640, 1024, 1536, 2048, 2304)]
CROSSOVER_VARIANTS = ("token_cublas", "vocab_outer")
# --smoke: tiny shapes on the CPU under TRITON_INTERPRET=1, to check the script before device
# time is spent on it (its times mean nothing).
SMOKE_UPDATE = [(37, 300, 40)]
SMOKE_LOSS = [("tiny", 64, 24, 300)]
DEV = "cuda"


def timed(fn, warmup: int, rep: int) -> float:
    """Median ms of fn: do_bench on a GPU, a few wall-clock runs in the smoke test."""
    if DEV == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    import time

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def update_row(rows: int, vocab: int, dim: int) -> dict:
    """Times and errors of the four update variants at one block shape."""
    from calibrated_lm.loss.triton_backend import TritonBackend

    gen = torch.Generator(device=DEV).manual_seed(0)
    # Gradient-sized values (softmax probabilities are ~1/V), so repeated accumulation during
    # timing stays far from bf16 overflow.
    block = (torch.randn(rows, vocab, device=DEV, generator=gen) / vocab).bfloat16()
    h = torch.randn(rows, dim, device=DEV, generator=gen).bfloat16()
    c0 = (torch.randn(vocab, dim, device=DEV, generator=gen) * 1e-4).bfloat16()
    backend = TritonBackend()
    want1 = c0.float() + block.float().T @ h.float()
    want0 = block.float().T @ h.float()
    out: dict = {"rows": rows, "vocab": vocab, "dim": dim}

    def run(name: str, fn, want: torch.Tensor, beta: bool) -> None:
        c = c0.clone()
        fn(c)
        sync()
        err = rel(c, want)
        c = c0.clone()
        ms = timed(lambda: fn(c), warmup=25, rep=200)
        flops = 2.0 * rows * vocab * dim
        bytes_ = (4 if beta else 2) * vocab * dim + 2 * rows * (vocab + dim)
        out[name] = {
            "ms": ms,
            "tflops": flops / ms / 1e9,
            "tbps": bytes_ / ms / 1e9,
            "rel_err": err,
        }
        print(f"  {name}: {ms:.3f} ms, rel. err {err:.2e}", file=sys.stderr)

    run("cublas_mm", lambda c: torch.mm(block.T, h, out=c), want0, False)
    run("cublas_addmm", lambda c: c.addmm_(block.T, h), want1, True)
    run("triton_beta0", lambda c: backend.grad_weight_(c, block, h, False), want0, False)
    run("triton_beta1", lambda c: backend.grad_weight_(c, block, h, True), want1, True)
    return out


def loss_row(
    name: str, n: int, dim: int, vocab: int, variants: tuple[str, ...] = tuple(LOSS_VARIANTS)
) -> dict:
    """The whole loss forward+backward with each update and stream setting."""
    from bench_loss import IGN, reference

    from calibrated_lm import linear_cross_entropy

    gen = torch.Generator(device=DEV).manual_seed(0)
    h = torch.randn(n, dim, device=DEV, generator=gen).bfloat16()
    w = (torch.randn(vocab, dim, device=DEV, generator=gen) * (2.0 / dim**0.5)).bfloat16()
    y = torch.randint(0, vocab, (n,), device=DEV, generator=gen)
    y[torch.rand(n, device=DEV, generator=gen) < 0.1] = IGN
    ref_loss, ref_gh, ref_gw = reference(h, w, y, 0.1, None)
    from calibrated_lm.loss import chunking

    out: dict = {"shape": name, "n": n, "dim": dim, "vocab": vocab}
    # The default order's rows per block at this shape (bf16, weight gradient needed).
    out["token_rows"] = chunking.grad_block_rows(n, vocab, dim, 2, DEV == "cuda", True)
    for key in variants:
        env = LOSS_VARIANTS[key]
        for var in ENV_VARS:
            os.environ.pop(var, None)
        os.environ.update(env)
        hh = h.detach().clone().requires_grad_()
        ww = w.detach().clone().requires_grad_()

        def step(hh=hh, ww=ww) -> tuple[torch.Tensor, ...]:
            loss = linear_cross_entropy(hh, ww, y, label_smoothing=0.1, impl="triton")
            return (loss, *torch.autograd.grad(loss, [hh, ww]))

        loss, gh, gw = step()  # compiles and autotunes outside the timing
        errs = {"loss": rel(loss, ref_loss), "grad_h": rel(gh, ref_gh)}
        errs["grad_w"] = rel(gw, ref_gw)
        del loss, gh, gw
        sync()
        peak = 0
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            kept = step()
            peak = torch.cuda.max_memory_allocated() - base
            del kept
        ms = timed(step, warmup=200, rep=1500)  # do_bench: milliseconds of runs
        out[key] = {"ms": ms, "peak_extra_mib": peak / 2**20, **errs}
        print(f"  {name} {key}: {ms:.2f} ms, peak +{peak / 2**20:.0f} MiB", file=sys.stderr)
    for var in ENV_VARS:
        os.environ.pop(var, None)
    return out


def write(out_dir: Path, result: dict) -> None:
    (out_dir / "grad_weight.json").write_text(json.dumps(result, indent=1))
    gpu = result["gpu"]
    lines = [
        f"# The weight-gradient update: cuBLAS vs the Triton kernel ({gpu})",
        "",
        f"torch {result['torch']}, Triton {result['triton']}; medians of do_bench; written by",
        "`benchmarks/bench_grad_weight.py`.",
    ]
    if result["update"]:
        lines += [
            "",
            "## The update alone, bf16 (ms; TFLOP/s; relative error against fp32)",
            "",
            "| R x V x D | cuBLAS mm | Triton, beta 0 | cuBLAS addmm | Triton, beta 1 | "
            "Triton / addmm |",
            "|---|---|---|---|---|---|",
        ]
    for r in result["update"]:

        def cell(k: str, r: dict = r) -> str:
            m = r[k]
            return f"{m['ms']:.3f} ({m['tflops']:.0f}; {m['rel_err']:.1e})"

        ratio = r["triton_beta1"]["ms"] / r["cublas_addmm"]["ms"]
        lines.append(
            f"| {r['rows']} x {r['vocab']:,} x {r['dim']} | {cell('cublas_mm')} | "
            f"{cell('triton_beta0')} | {cell('cublas_addmm')} | {cell('triton_beta1')} | "
            f"{ratio:.2f} |"
        )
    if result["loss"]:
        lines += [
            "",
            "## The whole loss, forward+backward, bf16, eps 0.1",
            "",
            "| head | setting | ms | vs the default | peak extra MiB | loss err | grad_h err "
            "| grad_W err |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["loss"]:
            base = r["token_cublas"]["ms"]
            for key in [k for k in LOSS_VARIANTS if k in r]:
                m = r[key]
                lines.append(
                    f"| {r['shape']} ({r.get('token_rows', '?')} rows) | {key} | "
                    f"{m['ms']:.2f} | {m['ms'] / base:.3f} | {m['peak_extra_mib']:.0f} | {m['loss']:.1e} | {m['grad_h']:.1e} | "
                    f"{m['grad_w']:.1e} |"
                )
    (out_dir / "grad_weight.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the .md and .json")
    ap.add_argument("--skip-loss", action="store_true", help="part 1 only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    ap.add_argument(
        "--crossover",
        action="store_true",
        help="only the default and the vocabulary-outer order, at D 640..2304 (V 262,144)",
    )
    args = ap.parse_args()
    global DEV
    update_shapes, loss_shapes = UPDATE_SHAPES, LOSS_SHAPES
    variants = tuple(LOSS_VARIANTS)
    if args.crossover:
        update_shapes, loss_shapes, variants = [], CROSSOVER_SHAPES, CROSSOVER_VARIANTS
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        DEV, update_shapes, loss_shapes = "cpu", SMOKE_UPDATE, SMOKE_LOSS
    elif not torch.cuda.is_available():
        print("bench_grad_weight: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are true fp32
    result: dict = {
        "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "CPU smoke test",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "update": [],
        "loss": [],
    }
    for i, shape in enumerate(update_shapes, 1):
        print(f"[update {i}/{len(update_shapes)}] R, V, D = {shape}", file=sys.stderr)
        result["update"].append(update_row(*shape))
        if DEV == "cuda":
            torch.cuda.empty_cache()
        write(args.out, result)
    if not args.skip_loss:
        for i, shape in enumerate(loss_shapes, 1):
            print(f"[loss {i}/{len(loss_shapes)}] {shape[0]}", file=sys.stderr)
            result["loss"].append(loss_row(*shape, variants=variants))
            if DEV == "cuda":
                torch.cuda.empty_cache()
            write(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
