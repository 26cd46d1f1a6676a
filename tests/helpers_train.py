"""Shared pieces of the train-loop tests: a tiny instruction set, the tiny model and data on
disk, the small-run TrainConfig, a kill-at-step callback and the readers of a run's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.training.loop import TrainConfig

RECORDS = [
    {"instruction": "Which gas do plants take in?", "input": "", "output": "carbon dioxide"},
    {"prompt": "The capital of France is", "completion": "Paris, on the Seine."},
    {
        "messages": [
            {"role": "user", "content": "Boiling point?"},
            {"role": "assistant", "content": "100 degrees"},
        ]
    },
    {"instruction": "Name a star.", "output": "the sun is a star", "history": [["Hi", "Hello"]]},
    {"prompt": "Calibration means", "completion": "confidence matches accuracy"},
    {"instruction": "A planet?", "input": "A. Mars B. Venus", "output": "A. Mars"},
    {"prompt": "Multiple choice:", "completion": "Answer: C. Jupiter"},
] * 2


def write_setup(root: Path) -> tuple[Path, Path, Path]:
    """(root, tiny model folder, data.jsonl of RECORDS) under ``root``."""
    model_dir = build_tiny_lm(root / "model", seed=1)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root, model_dir, data


def small_cfg(root: Path, model_dir: Path, data: Path, out: str, **kw) -> TrainConfig:
    """A few CPU steps of 2 x 2 examples at length 64, checkpoints every 2 steps."""
    base = dict(
        model=str(model_dir),
        data=str(data),
        output=str(root / out),
        batch_size=2,
        grad_accum=2,
        max_seq_len=64,
        max_steps=4,
        lr=3e-3,
        warmup_ratio=0.2,
        save_every=2,
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


class Killed(Exception):
    """Stands for a crash: raised from ``on_step``."""


def kill_at(step: int):
    def on_step(record):
        if record["step"] == step:
            raise Killed

    return on_step


def params(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
