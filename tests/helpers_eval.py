"""The EvalConfig the evaluation tests start from: a small CPU run without a chat template."""

from __future__ import annotations

from pathlib import Path

from calibrated_lm.evaluation.runner import EvalConfig


def eval_config(model: Path, task: Path, out: Path, /, *, bootstrap: int = 20, **kw) -> EvalConfig:
    """One task file scored on the CPU, 4 rows a batch, ``bootstrap`` draws; ``kw`` overrides
    any field (``model`` too)."""
    base = dict(
        model=str(model),
        tasks=[str(task)],
        output=out,
        bootstrap=bootstrap,
        progress=False,
        device="cpu",
        chat_template="off",
        batch_size=4,
    )
    base.update(kw)
    return EvalConfig(**base)
