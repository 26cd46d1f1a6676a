"""Micro-batch widths of the SFT experiment's data order, drawn and grouped by length.

Why: the first Gemma-3 SFT run had a NaN gradient at step 20. PyTorch 2.11's cuDNN attention
backward returns NaN for a key length of 64 mod 128 when some query row has no visible key
(pytorch/pytorch#196678). Right padding beyond a short sequence's end + ``window`` gives such
rows in Gemma-3's sliding-window layers. This script lists, for each optimizer step, the
micro-batches that meet both conditions, and how much padding the trainer's length grouping
saves. CPU only; it needs the experiment's prepared ``train.json`` and the converted tokenizer.

    python experiments/sft_step_widths.py --work runs/sft_calibration_budget [--model gemma-3-270m]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/sft_calibration_budget"))
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1, help="the run's seed (data order)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--window", type=int, default=512, help="sliding window of the model")
    args = ap.parse_args(argv)

    from calibrated_lm.models.loading import load_model
    from calibrated_lm.training.batching import StepPlan
    from calibrated_lm.training.data import load_dataset

    _, tok = load_model(args.model, dtype="float32", device="cpu")
    data = load_dataset(args.work / "data" / "train.json", tok, max_seq_len=args.max_seq_len)
    lengths = [len(ex.input_ids) for ex in data.examples]
    n = len(lengths)
    drawn = StepPlan(n, args.batch_size, args.grad_accum, args.seed)
    grouped = StepPlan(n, args.batch_size, args.grad_accum, args.seed, lengths=lengths)
    steps = args.epochs * drawn.steps_per_epoch
    real = {"drawn": 0, "grouped": 0}
    padded = dict(real)
    print(f"{n} examples, {steps} steps; micro-batches of width = 64 mod 128 (L: shortest):")
    for name, plan in (("drawn", drawn), ("grouped", grouped)):
        for step in range(steps):
            hits = []
            for b in plan.step_batches(step):
                ls = [lengths[i] for i in b]
                width = max(ls)
                real[name] += sum(ls)
                padded[name] += width * len(ls)
                if width % 128 == 64:
                    empty = width - min(ls) > args.window  # padding rows with no visible key
                    hits.append(f"width {width}, L {min(ls)}, rows without keys: {empty}")
            if hits:
                print(f"  {name} step {step + 1}: " + "; ".join(hits))
    for name in ("drawn", "grouped"):
        print(
            f"{name}: {real[name]:,} real of {padded[name]:,} positions "
            f"({real[name] / padded[name]:.1%})"
        )
    print(f"positions processed, drawn / grouped: {padded['drawn'] / padded['grouped']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
