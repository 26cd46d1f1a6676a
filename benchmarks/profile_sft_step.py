"""Where an SFT step of issue 12's runs spends its time (gemma-3-270m shape, random weights).

The claim-2 runs train gemma-3-270m (D = 640, V = 262,144) with micro-batches of 32 padded
sequences, bf16 autocast over fp32 weights, SDPA without cuDNN (models/attention.py), the fused
label-smoothed loss and AdamW; they ran at ~46k input tokens/s on an H200. This script times
the parts of that step, in one process, on random tokens and random weights of the same
config (``benchmarks/configs/gemma-3-270m.json``: timing does not depend on the weights):

* ``step``: 4 micro-batches forward+backward (padded rows, lengths uniform in [W/2, W]), clip,
  AdamW: the training loop's step;
* ``decoder``: the same forwards+backwards without the head (loss = sum of the last hidden
  state x a fixed random tensor), with the padding mask, and with no mask (all rows full:
  the flash kernel becomes eligible);
* ``loss``: ``linear_cross_entropy`` alone (eps 0.1, sum) forward+backward on the step's
  target tokens;
* ``adamw``: clip + ``optimizer.step`` alone;

plus the profiler's top CUDA kernels of one step. Medians over ``--steps`` after warm-up.

    python benchmarks/profile_sft_step.py [--width 512] [--batch 32] [--micro 4] \\
        [--steps 5] [--out profile.md] [--tiny] [--compile]

The profiler table is of the eager step; ``--compile`` then times the step and the decoder
with the decoder layers compiled (``calibrated_lm.models.compile``), in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(tiny: bool, dev: torch.device):
    from random_models import random_model

    model = random_model("gemma-3-270m", tiny=tiny, device=dev)
    return model, model.config


def batches(cfg, n: int, batch: int, width: int, dev: torch.device, full: bool = False):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(4, cfg.vocab_size, (batch, width), generator=g)
        lengths = (
            torch.full((batch,), width)
            if full
            else torch.randint(width // 2, width + 1, (batch,), generator=g)
        )
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        out.append(
            {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="then compile the decoder layers (models/compile.py) and time step and decoder again",
    )
    args = ap.parse_args()

    from calibrated_lm.loss import linear_cross_entropy
    from calibrated_lm.models.attention import training_attention
    from calibrated_lm.models.patching import patch_model

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = build(args.tiny, dev)
    patch_model(model, label_smoothing=0.1)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    mbs = batches(cfg, args.micro, args.batch, args.width, dev)
    full = batches(cfg, args.micro, args.batch, args.width, dev, full=True)
    n_inputs = sum(int(b["attention_mask"].sum()) for b in mbs)
    n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in mbs)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step() -> None:
        for b in mbs:
            with torch.autocast(**amp), training_attention(dev):
                out = model(**b, calibrated_lm_reduction="sum", calibrated_lm_stats=True)
            (out.loss / n_targets).backward()
            float(out.loss.detach())  # the loop's per-micro-batch host reads
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)

    probe = torch.randn(args.batch, args.width, cfg.hidden_size, device=dev)

    def decoder(which) -> None:
        for b in which:
            with torch.autocast(**amp), training_attention(dev):
                h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            (h.last_hidden_state.float() * probe).sum().backward()
        optim.zero_grad(set_to_none=True)

    w = model.get_output_embeddings().weight
    hs = [
        torch.randn(int(b["attention_mask"].sum()), cfg.hidden_size, device=dev).to(
            torch.bfloat16 if dev.type == "cuda" else torch.float32
        )
        for b in mbs
    ]
    ts = [torch.randint(0, cfg.vocab_size, (h.shape[0],), device=dev) for h in hs]

    # The patched forward hands the kernel bf16 hidden states and the weight in their dtype.
    wc = w.detach().to(hs[0].dtype).requires_grad_()

    def loss_only() -> None:
        for h, t in zip(hs, ts):
            hh = h.detach().requires_grad_()
            lo = linear_cross_entropy(hh, wc, t, label_smoothing=0.1, reduction="sum")
            lo.backward()
        wc.grad = None
        optim.zero_grad(set_to_none=True)

    def loss_and_grad() -> tuple[float, torch.Tensor]:
        """The step's mean loss and its flattened gradient, without the optimizer update."""
        optim.zero_grad(set_to_none=True)
        total = 0.0
        for b in mbs:
            with torch.autocast(**amp), training_attention(dev):
                out = model(**b, calibrated_lm_reduction="sum", calibrated_lm_stats=True)
            (out.loss / n_targets).backward()
            total += float(out.loss.detach()) / n_targets
        grad = torch.cat(
            [p.grad.flatten().float() for p in model.parameters() if p.grad is not None]
        )
        optim.zero_grad(set_to_none=True)
        return total, grad

    def adamw() -> None:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)

    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "width": args.width,
        "batch": args.batch,
        "micro": args.micro,
        "input_tokens": n_inputs,
        "padded_tokens": args.micro * args.batch * args.width,
    }
    for name, fn in (
        ("step", step),
        ("decoder (padding mask)", lambda: decoder(mbs)),
        ("decoder (full rows)", lambda: decoder(full)),
        ("loss", loss_only),
        ("adamw", adamw),
    ):
        try:
            res[name] = _timed(fn, dev, args.steps)
        except Exception as exc:  # report the others; say which part failed and why
            print(f"{name}: failed: {exc!r}", flush=True)
            res[name] = float("nan")
            continue
        print(f"{name}: {res[name] * 1e3:.1f} ms", flush=True)
    res["input_tokens_per_s"] = n_inputs / res["step"]

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(dev)
    if args.compile:
        from calibrated_lm.models.compile import compile_decoder

        # Same weights, same batches, eager then compiled: a switch of implementation is
        # acceptable mid-experiment only if the step it computes is the same up to bf16 noise.
        ref_loss, ref_grad = loss_and_grad()
        snapshot = [p.detach().clone() for p in model.parameters()]
        compile_decoder(model)
        t0 = time.perf_counter()
        step()  # the first calls compile: timed apart
        decoder(mbs)
        _sync(dev)
        res["compile_s"] = time.perf_counter() - t0
        print(f"compile (first step + decoder): {res['compile_s']:.1f} s", flush=True)
        for name, fn in (("step, compiled", step), ("decoder (padding mask), compiled",
                                                    lambda: decoder(mbs))):  # fmt: skip
            res[name] = _timed(fn, dev, args.steps)
            print(f"{name}: {res[name] * 1e3:.1f} ms", flush=True)
        res["compiled_input_tokens_per_s"] = n_inputs / res["step, compiled"]
        # The timed steps moved the weights: compare on the weights of the reference.
        with torch.no_grad():
            for p, v in zip(model.parameters(), snapshot):
                p.copy_(v)
        c_loss, c_grad = loss_and_grad()
        res["compiled_loss_rel_diff"] = abs(c_loss - ref_loss) / abs(ref_loss)
        res["compiled_grad_rel_l2"] = float((c_grad - ref_grad).norm() / ref_grad.norm())
        res["compiled_grad_cosine"] = float(
            torch.nn.functional.cosine_similarity(c_grad, ref_grad, dim=0)
        )
        print(
            "compiled vs eager, same weights and batches: loss rel diff "
            f"{res['compiled_loss_rel_diff']:.2e}, grad rel L2 {res['compiled_grad_rel_l2']:.2e}, "
            f"grad cosine {res['compiled_grad_cosine']:.6f}",
            flush=True,
        )
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
    lines = [
        f"# SFT step profile ({res['device']}, torch {res['torch']})",
        "",
        "Produced by `benchmarks/profile_sft_step.py` "
        f"(`--width {args.width} --batch {args.batch} --micro {args.micro} --steps {args.steps}"
        f"{' --tiny' if args.tiny else ''}{' --compile' if args.compile else ''}`); random "
        "weights of the gemma-3-270m config; the profiler table is of the eager step.",
        "",
        f"{args.micro} micro-batches of {args.batch} x {args.width} (lengths uniform in "
        f"[{args.width // 2}, {args.width}]): {n_inputs:,} input tokens of "
        f"{res['padded_tokens']:,} padded.",
        "",
        "| part | median ms | share of step |",
        "|---|---|---|",
    ]
    parts = ["step", "decoder (padding mask)", "decoder (full rows)", "loss", "adamw"]
    if args.compile:
        parts += ["step, compiled", "decoder (padding mask), compiled"]
    for name in parts:
        lines.append(f"| {name} | {res[name] * 1e3:.1f} | {res[name] / res['step']:.2f} |")
    lines += [
        "",
        f"Step throughput: {res['input_tokens_per_s']:,.0f} input tokens/s"
        + (
            f"; compiled decoder layers: {res['compiled_input_tokens_per_s']:,.0f} "
            f"({res['step'] / res['step, compiled']:.2f}x; compiling took "
            f"{res['compile_s']:.0f} s, not included)."
            if args.compile
            else "."
        ),
    ]
    if args.compile:
        lines += [
            "",
            "Compiled vs eager step on the same weights and batches: mean loss relative "
            f"difference {res['compiled_loss_rel_diff']:.2e}, gradient relative L2 difference "
            f"{res['compiled_grad_rel_l2']:.2e}, gradient cosine {res['compiled_grad_cosine']:.6f}.",
        ]
    lines += [
        "",
        "```",
        table,
        "```",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
