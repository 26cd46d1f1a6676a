"""CPU timings of the calibration metrics at the sizes the issue names.

- 1,000,000 items: top-label ECE (equal-width and equal-mass bins), RMS-CE, smooth ECE.
- 14,042 items (all of MMLU), 4 choices: 1,000-draw bootstrap of every metric in a summary
  (``summarize(..., bootstrap=1000)``), and of the ECE alone.

Data are synthetic (seeded); timings are the median of repeated runs, wall clock. Run:

    python benchmarks/bench_metrics.py [--output benchmarks/results/metrics_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calibrated_lm.calibration import (
    bootstrap_ci,
    calibration_error,
    smooth_ece,
    summarize,
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (imports, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/metrics_cpu.md"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n = 1_000_000
    conf = rng.uniform(0.25, 1.0, n)
    correct = (rng.uniform(size=n) < conf - 0.1).astype(np.float64)

    n_mmlu = 14_042
    logits = rng.normal(size=(n_mmlu, 4)) * 2.0
    labels = rng.integers(0, 4, n_mmlu)
    logits[np.arange(n_mmlu), labels] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m_conf = p.max(axis=1)
    m_corr = (p.argmax(axis=1) == labels).astype(np.float64)

    rows = []

    def add(what: str, fn: Callable[[], object], repeats: int) -> None:
        median, times = timed(fn, repeats)
        rows.append((what, median, min(times), max(times), repeats))
        print(f"{what}: median {median:.3f} s (min {min(times):.3f}, max {max(times):.3f})")

    add("ECE, 1,000,000 items, 15 equal-width bins",
        lambda: calibration_error(conf, correct), args.repeats)  # fmt: skip
    add("ECE, 1,000,000 items, 15 equal-mass bins",
        lambda: calibration_error(conf, correct, binning="mass"), args.repeats)  # fmt: skip
    add("RMS-CE, 1,000,000 items, 15 equal-width bins",
        lambda: calibration_error(conf, correct, norm="l2"), args.repeats)  # fmt: skip
    add("smooth ECE, 1,000,000 items",
        lambda: smooth_ece(conf, correct), args.repeats)  # fmt: skip
    add("ECE bootstrap, 1,000 draws x 14,042 items (generic loop over draws)",
        lambda: bootstrap_ci(lambda r: calibration_error(m_conf[r], m_corr[r]), n_mmlu, draws=1000),
        max(1, args.repeats // 2))  # fmt: skip
    add("summarize(): all 13 metrics + 1,000-draw bootstrap of each, 14,042 items x 4 choices",
        lambda: summarize(logits, labels, bootstrap=1000), max(1, args.repeats // 2))  # fmt: skip
    add("same, equal-mass bins",
        lambda: summarize(logits, labels, bootstrap=1000, binning="mass"),
        max(1, args.repeats // 2))  # fmt: skip

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        "# Calibration metrics: CPU timings",
        "",
        "Produced by `python benchmarks/bench_metrics.py` (synthetic seeded data; wall clock,",
        "median of repeats after one warm-up run).",
        "",
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical cores visible)",
        f"- Python {platform.python_version()}, numpy {np.__version__}",
        f"- load average at the end of the run: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
        " (the machine was shared with other jobs)",
        "",
        "| what | median (s) | min (s) | max (s) | repeats |",
        "|---|---:|---:|---:|---:|",
    ]
    for what, median, lo, hi, reps in rows:
        lines.append(f"| {what} | {median:.3f} | {lo:.3f} | {hi:.3f} | {reps} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
