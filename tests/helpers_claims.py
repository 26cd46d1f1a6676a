"""Synthetic evaluation folders for the experiment reports' tests (control, claims 2 and 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def samples(
    path: Path,
    n: int,
    sharp: float,
    acc_shift: float = 0.0,
    tasks=("arc_easy", "arc_challenge"),
) -> None:
    """Tasks of n 4-choice questions (two primary ones by default); ``sharp`` scales the
    logits (confidence). Question i is the same for every model (its own seed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for task in tasks:
        for i in range(n):
            y = i % 4
            z = np.random.default_rng(i).normal(size=4)  # the same question for every model
            z[y] += 0.8 + acc_shift
            z = z * sharp
            lines.append(
                json.dumps(
                    {
                        "task": task,
                        "id": str(i),
                        "choice_logprobs": list(z * 3),
                        "label": y,
                        "choice_char_lengths": [5] * 4,
                        "choice_token_counts": [3] * 4,
                    }
                )  # fmt: skip
            )
    path.write_text("\n".join(lines) + "\n")
    (path.parent / "done.json").write_text("{}")
