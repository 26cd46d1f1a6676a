"""SFT step memory and speed: patch_model's fused loss vs transformers' default loss.

One training step = forward + backward + AdamW step on ``B`` sequences of ``L`` random
tokens (every position a target), fp32 master weights, bf16 autocast on CUDA, SDPA attention.
For each method ("default": transformers' own loss on full logits; "patched": ``patch_model``
with label smoothing 0.1, i.e. ``linear_cross_entropy``), in one process:

1. the largest ``B`` whose step fits in GPU memory (doubling, then bisection; ``B <= --max-batch``),
   reported as tokens per step ``B * L`` with that step's peak memory;
2. at a fixed batch (``--fixed-batch`` sequences, both methods): peak memory
   (``torch.cuda.max_memory_allocated`` over a step, parameters, gradients and AdamW state
   included) and tokens/s (median step time of ``--steps`` timed steps after 2 warm-up steps).

Writes a Markdown table (``--out``) and the raw numbers as JSON (``--json``).

    python benchmarks/bench_train.py --model gemma-3-270m --seq-len 1024 --fixed-batch 8 \\
        --out benchmarks/results/train_h100.md --json $OUT/train_h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

# The search leaves the caching allocator fragmented after each OOM probe; expandable segments
# let a later step reuse that memory (the committed H100 run used this setting).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Stepper:
    """One model + AdamW; ``step(B)`` runs one training step on B random sequences."""

    def __init__(
        self,
        model: Any,
        method: str,
        seq_len: int,
        device: torch.device,
        eps: float,
        impl: str,
    ):
        from calibrated_lm import patch_model, unpatch_model

        unpatch_model(model)
        if method.startswith("patched"):
            # "patched:K" sets patch_model's min_block_rows to K; "patched" keeps its default.
            extra = {"min_block_rows": int(method.split(":")[1])} if ":" in method else {}
            patch_model(model, label_smoothing=eps, impl=impl, **extra)
        self.model, self.method, self.seq_len, self.device = model, method, seq_len, device
        self.vocab = model.get_output_embeddings().weight.shape[0]
        model.train()
        model.config.use_cache = False
        # lr 0: parameters stay put, so every probe runs the same model.
        self.optim = torch.optim.AdamW(model.parameters(), lr=0.0)
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def step(self, batch: int) -> float:
        """Run one step; return its wall time in seconds (raises OutOfMemoryError)."""
        ids = torch.randint(0, self.vocab, (batch, self.seq_len), generator=self.gen)
        ids = ids.to(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        ):
            out = self.model(input_ids=ids, labels=ids)
        out.loss.backward()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        del out
        _sync(self.device)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.optim.zero_grad(set_to_none=True)
        del self.optim
        _free(self.device)


def _peak_step(stepper: Stepper, batch: int) -> tuple[float, int]:
    dev = stepper.device
    _free(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = stepper.step(batch)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    return seconds, peak


def fits(stepper: Stepper, batch: int) -> tuple[bool, int]:
    try:
        _, peak = _peak_step(stepper, batch)
        return True, peak
    except torch.OutOfMemoryError:
        pass
    # Outside the except block, so the traceback's frames (and their tensors) are gone.
    stepper.optim.zero_grad(set_to_none=True)
    _free(stepper.device)
    return False, 0


def largest_batch(stepper: Stepper, max_batch: int, log) -> tuple[int, int]:
    """Largest B <= max_batch whose step fits (doubling, then bisection); (B, its peak)."""
    lo, lo_peak, hi = 0, 0, None
    b = 1
    while b <= max_batch:
        ok, peak = fits(stepper, b)
        log(f"  {stepper.method}: B={b} {'fits' if ok else 'OOM'}")
        if not ok:
            hi = b
            break
        lo, lo_peak = b, peak
        b *= 2
    if hi is None:
        hi = max_batch + 1
        if lo < max_batch:
            ok, peak = fits(stepper, max_batch)
            log(f"  {stepper.method}: B={max_batch} {'fits' if ok else 'OOM'}")
            if ok:
                return max_batch, peak
            hi = max_batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, peak = fits(stepper, mid)
        log(f"  {stepper.method}: B={mid} {'fits' if ok else 'OOM'}")
        if ok:
            lo, lo_peak = mid, peak
        else:
            hi = mid
    return lo, lo_peak


def timed(stepper: Stepper, batch: int, steps: int) -> dict[str, float]:
    _, peak = _peak_step(stepper, batch)
    stepper.step(batch)  # second warm-up
    times = [stepper.step(batch) for _ in range(steps)]
    med = statistics.median(times)
    return {"peak_bytes": peak, "step_s": med, "tokens_per_s": batch * stepper.seq_len / med}


def measure(model: Any, method: str, impl: str, device: torch.device, args) -> dict[str, Any]:
    """Fixed-batch timing and largest-batch search for one method."""
    stepper = Stepper(model, method, args.seq_len, device, args.eps, impl)
    row: dict[str, Any] = {"impl": impl}
    fixed_fits, _ = fits(stepper, args.fixed_batch)
    row["fixed"] = timed(stepper, args.fixed_batch, args.steps) if fixed_fits else None
    print(f"{method} fixed batch: {row['fixed']}")
    b, peak = largest_batch(stepper, args.max_batch, print)
    row["max_batch"], row["max_tokens"], row["max_peak_bytes"] = b, b * args.seq_len, peak
    row["max_bound_hit"] = b == args.max_batch
    if b:
        try:
            row["at_max"] = timed(stepper, b, max(2, args.steps // 2))
        except torch.OutOfMemoryError:
            row["at_max"] = None  # fitted once, but not again after the search's fragmentation
        _free(device)
    print(f"{method}: largest batch {b} x {args.seq_len} = {b * args.seq_len} tokens")
    stepper.close()
    return row


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from calibrated_lm.models.loading import load_model, resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--fixed-batch", type=int, default=8, help="sequences per step for timing")
    ap.add_argument("--max-batch", type=int, default=256, help="search bound (sequences)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--eps", type=float, default=0.1, help="label smoothing of the patched run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", default="default,patched")
    ap.add_argument("--impl", default="auto", help="linear_cross_entropy impl of the patched run")

    ap.add_argument("--out", type=Path, default=None, help="Markdown table")
    ap.add_argument("--json", type=Path, default=None, help="raw results")
    args = ap.parse_args(argv)

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    t_load = time.perf_counter()
    resolved = resolve_model(args.model)
    if str(resolved).endswith(".gguf"):
        # Straight from the GGUF (dequantised to fp32): the benchmark needs no tokenizer and
        # no converted cache folder.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(resolved.parent), gguf_file=resolved.name, dtype=torch.float32
        ).to(device)
    else:
        model, _ = load_model(args.model, dtype="float32", device=str(device))
    model.requires_grad_(True)
    load_s = time.perf_counter() - t_load
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    total_mem = (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    )
    print(f"{args.model}: {n_params / 1e6:.0f}M params, V={vocab}, on {gpu} (load {load_s:.0f}s)")
    results: dict[str, Any] = {
        "model": args.model,
        "params": n_params,
        "vocab": vocab,
        "device": gpu,
        "gpu_total_bytes": total_mem,
        "seq_len": args.seq_len,
        "fixed_batch": args.fixed_batch,
        "eps": args.eps,
        "torch": torch.__version__,
        "methods": {},
    }
    methods = args.methods.split(",")
    for method in tqdm(methods, desc="methods"):
        impl = args.impl
        while True:
            try:
                row = measure(model, method, impl, device, args)
                break
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a kernel failure must not cost the whole device run
                print(f"{method} (impl {impl}) failed: {type(exc).__name__}: {exc}")
                _free(device)
                if not method.startswith("patched") or impl == "torch":
                    row = {"error": f"{type(exc).__name__}: {exc}"}
                    break
                impl = "torch"
        name = method if method == "default" or impl == "auto" else f"{method} (impl {impl})"
        results["methods"][name] = row
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    table = render(results)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def render(r: dict[str, Any]) -> str:
    """Markdown table of one run's results."""
    lines = [
        f"# SFT step memory/speed: fused loss vs transformers' default ({r['device']})",
        "",
        f"Model `{r['model']}` ({r['params'] / 1e6:.0f}M parameters, V = {r['vocab']:,}), "
        f"sequences of {r['seq_len']} random tokens, all positions targets, fp32 weights + AdamW, "
        f"bf16 autocast, torch {r['torch']}; GPU memory {_gib(r['gpu_total_bytes'])} GiB. "
        f"`patched` = `patch_model(model, label_smoothing={r['eps']})`; `default` = transformers' "
        "own loss on materialised logits (no smoothing); `patched:K` = the same with "
        "`min_block_rows=K` (tokens per logit block of the loss's gradient pass; `patched` uses "
        "patch_model's default). Produced by `benchmarks/bench_train.py`.",
        "",
        "| method | largest tokens/step that fit | peak GiB there | tokens/s there "
        f"| peak GiB at {r['fixed_batch']}x{r['seq_len']} | tokens/s at {r['fixed_batch']}x{r['seq_len']} |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in r["methods"].items():
        if "error" in m:
            lines.append(f"| {name} | failed: {m['error'][:120]} | | | | |")
            continue
        fixed = m.get("fixed") or {}
        at_max = m.get("at_max") or {}
        bound = " (search bound)" if m.get("max_bound_hit") else ""
        lines.append(
            f"| {name} | {m['max_tokens']:,}{bound} | {_gib(m['max_peak_bytes'])} | "
            f"{at_max.get('tokens_per_s', float('nan')):,.0f} | "
            f"{_gib(fixed['peak_bytes']) if fixed else 'OOM'} | "
            f"{fixed.get('tokens_per_s', float('nan')):,.0f} |"
        )
    ms = {k: v for k, v in r["methods"].items() if "error" not in v}
    patched = next((k for k in ms if k.startswith("patched")), None)
    if "default" in ms and patched and ms["default"]["max_tokens"]:
        ratio = ms[patched]["max_tokens"] / ms["default"]["max_tokens"]
        fd, fp = ms["default"].get("fixed"), ms[patched].get("fixed")
        speed = fp["tokens_per_s"] / fd["tokens_per_s"] if fd and fp else float("nan")
        lines += [
            "",
            f"Tokens per step that fit: {ratio:.1f}x (goal: at least 4x); tokens/s at the fixed "
            f"batch: {speed:.2f}x the default's (goal: at least 1x).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
