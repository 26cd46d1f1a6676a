"""Held-out evaluation during training: ``calibrated-lm train --eval-data FILE --eval-every N``.

Every ``N`` optimizer steps, and after the last one, the model scores the target (assistant)
tokens of ``FILE`` (any layout ``--data`` takes, tokenized the same way and truncated at
``--max-seq-len``) with the training forward, without gradients and in eval mode. The step's
record (``metrics.jsonl`` and the trackers) then also holds:

* ``eval_loss``: the training objective (label smoothing, z-loss, temperature... as
  configured) per held-out target token, so it is comparable with ``loss``;
* ``eval_confidence``: the mean max-probability of the next-token distribution;
* ``eval_accuracy``: the share of target tokens that are the argmax;
* ``eval_entropy``: the mean entropy of that distribution (nats);
* ``eval_ece``: the top-label expected calibration error of those token confidences against
  argmax correctness, with ``ECE_BINS`` equal-width bins (the binning of
  ``calibrated_lm.calibration.calibration_error``);
* ``eval_tokens``: how many target tokens were scored;
* ``eval_outside_subset_tokens`` (``--head-subset`` runs only): how many held-out targets lie
  outside the head subset and were left out of the figures above.

Confidence and accuracy are of the distribution the model is trained on (after
``--temperature`` / ``--softcap``), like the training figures. The per-token statistics come
from the fused kernel (``linear_cross_entropy(..., return_stats=True)``), which the patched
forward calls once per forward; :func:`evaluate` reads them as that call returns them (see
:func:`_token_statistics`), so no logits are materialised and the forward is exactly the one
that works under FSDP2 and ZeRO-3.

Distributed runs: rank ``r`` scores every ``world``-th micro-batch, every rank runs as many
forwards (a rank short of one repeats a micro-batch with weight 0, as the training step
does: FSDP2 and ZeRO-3 gather parameters inside forwards), and the sums and bin tables are
all-reduced, so the figures equal those of one process. The random generators are restored
after the evaluation, so evaluating (or not) leaves training, and ``--resume``, unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrated_lm.calibration.binning import bin_sums
from calibrated_lm.errors import UserError
from calibrated_lm.training import distributed as D
from calibrated_lm.training.batching import collate
from calibrated_lm.training.data import Dataset, check_layouts, load_dataset, read_records

ECE_BINS = 15
FLAG = "--eval-data"
EVAL_KEYS = (
    "eval_loss",
    "eval_confidence",
    "eval_accuracy",
    "eval_entropy",
    "eval_ece",
    "eval_tokens",
)


def check_eval_file(path: str | Path) -> None:
    """Read ``path`` and check every record's layout; raises :class:`UserError` naming
    ``--eval-data`` (run before the model is loaded)."""
    try:
        check_layouts(read_records(path), f"{FLAG} {path}")
    except UserError as exc:
        text = str(exc)
        raise UserError(text if text.startswith(FLAG) else f"{FLAG}: {text}") from exc


def load_eval_set(path: str | Path, tokenizer: Any, *, max_seq_len: int) -> Dataset:
    """Tokenize the held-out file like the training data; none left is a :class:`UserError`."""
    return load_dataset(
        path, tokenizer, max_seq_len=max_seq_len, label=f"{FLAG} {path}", what="example",
        hint="check the file",
    )  # fmt: skip


@contextlib.contextmanager
def _token_statistics() -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """While active, each ``linear_cross_entropy(..., return_stats=True)`` call (the patched
    forward's) appends ``(confidence, correct)`` of its scored target tokens to the yielded
    list.

    The patched forward hands back only token means (``loss_stats``); a calibration error
    needs the tokens themselves. The kernel is looked up on ``calibrated_lm.loss`` at each
    call, so wrapping it there for the duration of an evaluation reads them without a second
    forward or the logits. Training forwards never run inside this context.
    """
    import calibrated_lm.loss as loss_package

    real = loss_package.linear_cross_entropy
    signature = inspect.signature(real)
    captured: list[tuple[np.ndarray, np.ndarray]] = []

    def capturing(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a["return_stats"]:
            stats = out[1]
            targets = a["targets"]
            scored = targets[..., 1:] if a["shift"] else targets
            ignore = a["ignore_index"]
            valid = (
                torch.ones_like(scored, dtype=torch.bool) if ignore is None else scored != ignore
            )
            confidence = stats.confidence[valid].detach().float().cpu().numpy()
            correct = stats.correct[valid].detach().cpu().numpy()
            captured.append((confidence, correct))
        return out

    loss_package.linear_cross_entropy = capturing
    try:
        yield captured
    finally:
        loss_package.linear_cross_entropy = real


def _all_reduce(values: np.ndarray, info: D.DistInfo) -> np.ndarray:
    if not info.enabled:
        return values
    import torch.distributed as dist

    device = info.device if info.device.type == "cuda" else torch.device("cpu")
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().numpy()


def expected_calibration_error(count: np.ndarray, conf_sum: np.ndarray, acc_sum: np.ndarray):
    """ECE from per-bin sums: ``sum_b |acc_sum_b - conf_sum_b| / n`` (equal to
    ``sum_b (n_b / n) |acc_b - conf_b|``); ``None`` without items."""
    n = float(count.sum())
    return float(np.abs(acc_sum - conf_sum).sum() / n) if n > 0 else None


def evaluate(
    forward: Any,
    model: torch.nn.Module,
    data: Dataset,
    *,
    batch_size: int,
    pad_id: int,
    info: D.DistInfo,
    autocast: bool,
) -> dict[str, float | int | None]:
    """Score ``data`` with ``forward`` (the patched model, or the DeepSpeed engine around it;
    ``model`` is the module put in eval mode); returns the ``eval_*`` record fields (module
    docstring). Every rank must call it (collectives)."""
    from calibrated_lm.models.attention import training_attention
    from calibrated_lm.training.checkpoint import rng_state, set_rng_state

    # Longest first: similar lengths share a micro-batch (less padding), deterministically.
    order = sorted(range(len(data.examples)), key=lambda i: (-len(data.examples[i].input_ids), i))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    mine = batches[info.rank :: info.world]
    n_real = len(mine)
    per_rank = -(-len(batches) // info.world)
    mine += [batches[0]] * (per_rank - n_real)  # weight-0 repeats: every rank joins each forward

    sums = np.zeros(4)  # loss, confidence, accuracy, entropy (token sums)
    tokens = 0.0
    outside = 0.0  # targets outside a head subset (left out of the figures)
    bins = np.zeros((3, ECE_BINS))  # count, confidence sum, correct sum
    saved_rng = rng_state()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _token_statistics() as captured:
            for j, indices in enumerate(mine):
                batch = collate([data.examples[i] for i in indices], pad_id)
                batch = {k: v.to(info.device) for k, v in batch.items()}
                with (
                    torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=autocast),
                    training_attention(info.device),
                ):
                    out = forward(**batch, calibrated_lm_reduction="sum", calibrated_lm_stats=True)
                if not captured:
                    raise RuntimeError(
                        "held-out evaluation: the patched forward did not call "
                        "calibrated_lm.loss.linear_cross_entropy with return_stats"
                    )
                confidence, correct = captured.pop()
                captured.clear()
                if j >= n_real:
                    continue
                stats = out.loss_stats
                n = stats.n_tokens
                sums += [
                    float(out.loss),
                    stats.confidence * n,
                    stats.accuracy * n,
                    stats.entropy * n,
                ]
                tokens += n
                outside += stats.n_outside
                _, count, conf_sum, acc_sum = bin_sums(
                    np.clip(confidence.astype(np.float64), 0.0, 1.0),
                    correct.astype(np.float64),
                    ECE_BINS,
                    "width",
                )
                bins += np.stack([count, conf_sum, acc_sum])
    finally:
        if was_training:
            model.train()
        set_rng_state(saved_rng)
    totals = _all_reduce(np.concatenate([sums, [tokens, outside], bins.ravel()]), info)
    sums, tokens, outside = totals[:4], float(totals[4]), float(totals[5])
    bins = totals[6:].reshape(3, ECE_BINS)
    denom = max(tokens, 1.0)
    extra = {}
    if _has_head_subset(model):
        extra["eval_outside_subset_tokens"] = int(outside)
    return {
        "eval_loss": float(sums[0] / denom),
        "eval_confidence": float(sums[1] / denom),
        "eval_accuracy": float(sums[2] / denom),
        "eval_entropy": float(sums[3] / denom),
        "eval_ece": expected_calibration_error(*bins),
        "eval_tokens": int(tokens),
        **extra,
    }


def _has_head_subset(model: torch.nn.Module) -> bool:
    from calibrated_lm.models.patching import patch_config

    cfg = patch_config(model)
    return cfg is not None and cfg.head is not None
