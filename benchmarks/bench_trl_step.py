"""One TRL SFT step on the gemma-3-270m shape: TRL's own paths vs the patched fused loss.

Issue 13, item 1's benchmark. Each variant trains a randomly initialised model of
``benchmarks/configs/gemma-3-270m.json`` (D = 640, V = 262,144, tied head; timing and memory
do not depend on the weights) for ``--warmup + --steps`` optimizer steps of ``--batch`` x
``--width`` tokens (default 8 x 1024, pre-tokenized random ids, every token a target), bf16
autocast over fp32 weights, AdamW, through ``trl.SFTTrainer``'s own training loop:

* ``trl_nll``: stock ``trl.SFTTrainer``, unpatched model: TRL's chunked fused NLL head (no
  smoothing): the speed and memory to match;
* ``trl_ls``: stock ``trl.SFTTrainer`` with ``label_smoothing_factor=0.1``: HF's
  ``LabelSmoother`` on the full (B, L, V) logits plus TRL's no-grad fused pass for its metrics:
  what label smoothing costs in TRL today;
* ``calibrated``: ``CalibratedSFTTrainer`` on ``patch_model(model, label_smoothing=0.1)``: our
  fused kernel (Triton on CUDA), TRL's metrics from its statistics.
* ``calibrated_rowsN``: the same with ``patch_model(..., min_block_rows=N)`` (the default is
  1024: a 1024 x V logit block, 512 MiB at V = 262,144; smaller blocks trade speed for
  memory).
* a ``_onestream`` suffix on either (``calibrated_rows512_onestream``): the same with the
  fused loss's side stream off (``CALIBRATED_LM_LCE_STREAMS=0``), so the weight-gradient
  product runs on the main stream and no second cuBLAS workspace (32 MiB on Hopper) is held.

Each variant runs in its own process (a clean CUDA allocator, so the peak is the variant's).
Reported: median step time over the timed steps (``on_step_begin`` to ``on_step_end``, CUDA
synchronised), tokens per second, peak allocated memory over the timed steps, and the first
logged loss (the smoothed variants agree with each other; ``trl_nll`` is plain NLL).

    python benchmarks/bench_trl_step.py [--width 1024] [--batch 8] [--steps 5] [--warmup 2] \\
        [--variants trl_nll,trl_ls,calibrated] [--out results/trl_step_h200.md] [--json ...]
    python benchmarks/bench_trl_step.py --tiny     # CPU smoke run of the script, not a measurement

``--profile DIR`` also writes, per variant, ``DIR/trl_step_profile_<variant>.txt``: the torch
profiler's operators and kernels of one extra step run after the timed ones (profiling slows
the step it records), sorted by device time: where one variant's step time goes, against
another's.

``--memory DIR`` (CUDA) records the allocator's history over one more extra step and writes
``DIR/trl_step_memory_<variant>.txt``: the peak above what was allocated before the step, and
the blocks alive at the peak with the lines that allocated them (``memory_peak.py``).

First run on an H200 in session 10 (benchmarks/results/session10/); ``--tiny`` checks the
script end to end on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("trl_nll", "trl_ls", "calibrated")  # and calibrated_rowsN


ONE_STREAM = "_onestream"


def _rows(variant: str) -> int | None:
    """N of ``calibrated_rowsN`` (None for any other name), with or without ``_onestream``."""
    tail = variant.removesuffix(ONE_STREAM).removeprefix("calibrated_rows")
    return int(tail) if variant.startswith("calibrated_rows") and tail.isdigit() else None


def _known(variant: str) -> bool:
    base = variant.removesuffix(ONE_STREAM)
    if variant.endswith(ONE_STREAM) and not base.startswith("calibrated"):
        return False  # TRL's own paths do not use our loss's streams
    return base in VARIANTS or _rows(base) is not None


EPS = 0.1


def build_model(tiny: bool, device: str):
    from random_models import random_model

    return random_model("gemma-3-270m", tiny=tiny, device=device)


def build_tokenizer():
    """A two-token tokenizer: the data is pre-tokenized, TRL only needs pad and EOS ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``variant`` in this process and return its timings."""
    import datasets
    import torch
    import trl
    from transformers import TrainerCallback

    from calibrated_lm import patch_model
    from calibrated_lm.integrations.trl import CalibratedSFTTrainer

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    model = build_model(args.tiny, device)
    steps = args.warmup + args.steps
    g = torch.Generator().manual_seed(1)
    # One extra step for the profiler, one for the memory history: each slows its own step.
    extra = (1 if args.profile else 0) + (1 if args.memory else 0)
    rows = (steps + extra) * args.batch
    ids = torch.randint(4, model.config.vocab_size, (rows, args.width), generator=g)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})

    times: list[float] = []
    peaks: list[int] = []
    profiled_step = steps  # one step after the timed ones: profiling slows the step it records
    memory_step = steps + (1 if args.profile else 0)

    class Profile(TrainerCallback):
        """torch.profiler around step ``profiled_step`` only; its table goes to a file."""

        def on_step_begin(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            # global_step counts finished steps: the step about to run has index global_step.
            if state.global_step != profiled_step:
                return
            acts = [torch.profiler.ProfilerActivity.CPU]
            acts += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

        def on_step_end(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            if getattr(self, "prof", None) is None:
                return
            if cuda:
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            text = self.prof.key_averages().table(
                sort_by=key, row_limit=30, max_name_column_width=70
            )
            out = Path(args.profile) / f"trl_step_profile_{variant}.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                f"{variant}: step {profiled_step + 1}, {args.batch} x {args.width} tokens\n{text}\n"
            )
            self.prof = None

    class Memory(TrainerCallback):
        """The allocator's history over the extra step: what is alive at its peak, to a file."""

        def on_step_begin(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            if state.global_step != memory_step:
                return
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            # Python frames only: C++ stacks are symbolised per event and only slow the dump.
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
            self.on = True

        def on_step_end(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            if not getattr(self, "on", False):
                return
            torch.cuda.synchronize()
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            self.on = False
            from memory_peak import replay, report, summed_by_site

            peak = replay(snap["device_traces"][torch.cuda.current_device()])
            sites = summed_by_site(peak.live)[:8]
            text = report(f"{variant}: step {memory_step + 1}", peak, self.baseline)
            text += "\n  by allocation site:\n" + "\n".join(
                f"  {b / 2**20:10,.1f} MiB  {site}" for b, site in sites
            )
            out = Path(args.memory) / f"trl_step_memory_{variant}.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")

    class Clock(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated())
            times.append(time.perf_counter() - self.t0)

    config = trl.SFTConfig(
        output_dir=str(Path(args.tmp) / variant),
        max_steps=steps + extra,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-5,
        bf16=cuda,
        use_cpu=not cuda,
        max_length=None,
        label_smoothing_factor=EPS if variant == "trl_ls" else 0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    common = dict(
        args=config,
        train_dataset=data,
        processing_class=build_tokenizer(),
        callbacks=[Clock()]
        + ([Profile()] if args.profile else [])
        + ([Memory()] if args.memory and cuda else []),
    )
    if variant.startswith("calibrated"):
        rows = _rows(variant)
        extra = {"min_block_rows": rows} if rows is not None else {}
        patched = patch_model(model, label_smoothing=EPS, **extra)
        trainer = CalibratedSFTTrainer(model=patched, **common)
    else:
        trainer = trl.SFTTrainer(model=model, **common)
    trainer.train()
    timed = times[args.warmup : steps]
    step_s = statistics.median(timed)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "variant": variant,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "tokens_per_step": args.batch * args.width,
        "median_step_s": round(step_s, 4),
        "tokens_per_s": round(args.batch * args.width / step_s, 1),
        "peak_allocated_gib": round(max(peaks[args.warmup : steps]) / 2**30, 3) if peaks else None,
        "first_loss": round(logs[0]["loss"], 5) if logs else None,
        "first_entropy": round(logs[0].get("entropy", float("nan")), 5) if logs else None,
        "versions": {
            "torch": torch.__version__,
            "trl": trl.__version__,
            "transformers": __import__("transformers").__version__,
        },
    }


def table(results: list[dict[str, Any]]) -> str:
    head = "| variant | step (s) | tokens/s | peak allocated (GiB) | first loss | first entropy |"
    rows = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(
            f"| {r['variant']} | {r['median_step_s']} | {r['tokens_per_s']} | "
            f"{r['peak_allocated_gib']} | {r['first_loss']} | {r['first_entropy']} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="small config on the CPU: a smoke run")
    ap.add_argument("--out", type=Path, default=None, help="markdown table")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", default=None, metavar="DIR", help="profiler tables, per variant")
    ap.add_argument(
        "--memory",
        default=None,
        metavar="DIR",
        help="CUDA: what is alive at the extra step's memory peak, per variant (memory_peak.py)",
    )
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one variant
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny and args.width == 1024:
        args.width = 64

    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args)), flush=True)
        return 0

    for variant in args.variants.split(","):  # all checked before any runs
        if not _known(variant):
            raise SystemExit(
                f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)} or "
                f"calibrated_rowsN, a calibrated one optionally with {ONE_STREAM}"
            )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--one", variant, "--tmp", tmp]
            cmd += ["--width", str(args.width), "--batch", str(args.batch)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--tiny"] if args.tiny else []
            cmd += ["--profile", args.profile] if args.profile else []
            cmd += ["--memory", args.memory] if args.memory else []
            env = dict(os.environ)
            if variant.endswith(ONE_STREAM):
                env["CALIBRATED_LM_LCE_STREAMS"] = "0"
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                # An out-of-memory trl_ls at large V is a result too: record it, go on.
                tail = (proc.stderr or proc.stdout)[-2000:]
                oom = "OutOfMemoryError" in tail or "out of memory" in tail
                print(f"{variant}: failed{' (out of memory)' if oom else ''}\n{tail}")
                results.append(
                    {
                        "variant": variant + (" (OOM)" if oom else " (failed)"),
                        "median_step_s": None,
                        "tokens_per_s": None,
                        "peak_allocated_gib": None,
                        "first_loss": None,
                        "first_entropy": None,
                    }
                )
                write(results, args)
                continue
            results.append(json.loads(lines[-1][len("RESULT ") :]))
            print(json.dumps(results[-1]), flush=True)
            write(results, args)  # after each variant: a time-out keeps the finished ones
    print(table(results))
    write(results, args)
    return 0


def write(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table(results) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
