"""Learning-rate schedule of the paper's SFT setup: linear warmup, then linear decay to 0.

    lr(s) = lr_max * (s + 1) / W               for s < W   (W = ceil(warmup_ratio * S))
    lr(s) = lr_max * (S - s) / max(1, S - W)   for s >= W

for optimizer step ``s`` (0-based) of ``S`` total. It is a pure function of the step, so a
resumed run needs only the step to restore it; a run resumed with a larger ``S`` continues on
the schedule of the new total.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def learning_rate(step: int, total_steps: int, lr_max: float, warmup_ratio: float) -> float:
    """The learning rate for optimizer step ``step`` (formula in the module docstring)."""
    w = warmup_steps(total_steps, warmup_ratio)
    if step < w:
        return lr_max * (step + 1) / w
    return lr_max * max(0.0, (total_steps - step) / max(1, total_steps - w))
