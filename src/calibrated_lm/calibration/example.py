"""A small synthetic samples file for trying the metrics without a model.

Simulation (seeded, documented so the numbers it yields can be reasoned about): for item i
with K_i choices, a *calibrated* logit vector z_i = 1.6 * g_i, g_i ~ N(0, I), defines the
true answer distribution softmax(z_i), from which the gold label is drawn. The simulated
model reports log-likelihoods log_softmax(z_i / tau)_k + a_i with tau = 0.5 < 1, so its
softmax is sharper than the truth: over-confident by construction. The item offset
a_i ~ -Uniform(5, 40) mimics summed log-likelihoods and leaves the softmax unchanged.
Temperature scaling would recover T = 1 / tau = 2 in the limit of many items.

Two tasks are written: ``synthetic_4choice`` (MMLU-like, 4 choices) and
``synthetic_3to5choice`` (ARC-like, 3 to 5 choices). Every record's ``prompt`` says it is
synthetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calibrated_lm import durable

TAU = 0.5
SCALE = 1.6
TASKS = (("synthetic_4choice", 1200, (4, 4)), ("synthetic_3to5choice", 800, (3, 5)))


def simulate(seed: int = 0) -> list[dict]:
    """The example records (our samples format), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    records = []
    for task, n, (k_min, k_max) in TASKS:
        for i in range(n):
            k = int(rng.integers(k_min, k_max + 1))
            z = SCALE * rng.standard_normal(k)
            p_true = np.exp(z - z.max())
            p_true /= p_true.sum()
            label = int(rng.choice(k, p=p_true))
            zt = z / TAU
            logp = zt - zt.max() - np.log(np.exp(zt - zt.max()).sum())
            offset = -rng.uniform(5.0, 40.0)
            lengths = rng.integers(4, 40, size=k)
            records.append(
                {
                    "task": task,
                    "id": i,
                    "choice_logprobs": [round(float(v + offset), 6) for v in logp],
                    "label": label,
                    "choice_char_lengths": [int(x) for x in lengths],
                    "prompt": (
                        f"[synthetic] item {i} of a simulated over-confident model "
                        f"(tau={TAU}, seed={seed}); not real model output"
                    ),
                }
            )
    return records


class ExampleExistsError(FileExistsError):
    """``path`` holds a file other than this example: it is left as it was."""


def write_example(path: str | Path, seed: int = 0) -> Path:
    """Write the synthetic samples JSONL to ``path`` (parents created) and return the path.

    A file already at ``path`` is kept: an identical example (an earlier ``--example`` with
    the same seed) is used as it is, anything else raises :class:`ExampleExistsError`, so
    the example can never replace an evaluation's samples or any other file."""
    path = Path(path)
    text = "".join(json.dumps(rec) + "\n" for rec in simulate(seed))
    if path.is_file():
        # Sizes first: a large samples file is refused without being read.
        if path.stat().st_size == len(text.encode()) and path.read_text(encoding="utf-8") == text:
            return path
        raise ExampleExistsError(f"{path} exists and is not this example file")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomically (durable.py): `metrics` reads the file right after, and later runs again.
    return durable.write_text(path, text)
