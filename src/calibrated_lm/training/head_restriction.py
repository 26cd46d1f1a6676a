"""``calibrated-lm train --head-subset FILE``: SFT with the output softmax restricted to V' tokens.

FILE is a ``head_subset.json`` (``calibrated_lm.models.head_subset``), or a model folder
holding one. The run

* reads and checks it before the model is loaded (:func:`open_for_run`), and its V against
  the model's head once loaded (:func:`check_model`);
* patches the model with it (``patch_model(..., head_subset=...)``): the loss is the
  restricted softmax's over the kept head rows (a tied head stays tied), and targets outside the
  subset are left out of it. The loop's token-summed loss divides by the targets *inside* the
  subset (:func:`count_targets`), so every kept token weighs the same, and each logged record
  carries ``outside_subset_tokens`` and ``outside_subset_share`` = outside / (inside + outside)
  of the step's targets; the run's opening line gives the share over the whole data;
* writes FILE's bytes verbatim as ``head_subset.json`` into every checkpoint and ``final/``,
  beside ``config.json``, so ``calibrated-lm eval --model`` of that folder scores with the
  same subset (and the same sha256 names it everywhere);
* on ``--resume`` (:func:`for_resume`) keeps the checkpoint's subset: without
  ``--head-subset`` its copy is used, and a ``--head-subset`` of other content, or one given
  to a run checkpointed without a subset (or the other way round), is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from calibrated_lm.errors import UserError
from calibrated_lm.models.head_subset import FILE, SubsetFile, open_file

FLAG = "--head-subset"


def open_for_run(path: str | None) -> SubsetFile | None:
    """The ``--head-subset`` file, read and checked (None when not given)."""
    return None if path is None else open_file(path, FLAG)


def for_resume(given: SubsetFile | None, checkpoint: Path) -> SubsetFile | None:
    """The subset a resume from ``checkpoint`` trains with (its own ``head_subset.json``);
    :class:`UserError` when ``given`` would change it."""
    saved_path = Path(checkpoint) / FILE
    saved = None
    if saved_path.is_file():
        saved = open_file(saved_path, f"--resume: checkpoint {checkpoint.name}:")
    if saved is None and given is None:
        return None
    if saved is None:
        raise UserError(
            f"--resume: the run checkpointed in {checkpoint.name} trained the full output head, "
            f"so {FLAG} {given.path} would change its objective midway; leave {FLAG} out, or "
            "train into a new --output"
        )
    if given is not None and given.sha256 != saved.sha256:
        raise UserError(
            f"--resume: {FLAG} {given.path} (sha256 {given.sha256[:12]}..., V' = "
            f"{given.subset.size}) is not the subset the run checkpointed in {checkpoint.name} "
            f"trained with (sha256 {saved.sha256[:12]}..., V' = {saved.subset.size}); leave "
            f"{FLAG} out to keep the checkpoint's, or train into a new --output"
        )
    return saved


def check_model(subset: SubsetFile, model: Any) -> None:
    """:class:`UserError` unless the subset was chosen from this model's V head rows."""
    rows = model.get_output_embeddings().weight.shape[0]
    if subset.subset.vocab_size != rows:
        raise UserError(
            f"{FLAG} {subset.path}: the subset was chosen from a vocabulary of "
            f"{subset.subset.vocab_size} tokens, but the model's output head has {rows} rows; "
            "choose it with this model's tokenizer"
        )


def kept_mask(subset: SubsetFile) -> torch.Tensor:
    """(V,) bool: whether each token id is kept."""
    return torch.as_tensor(subset.subset.index_map() >= 0)


def count_targets(labels: torch.Tensor, kept: torch.Tensor) -> tuple[int, int]:
    """(inside, outside): the scored targets ``labels[:, 1:] != -100`` whose token is kept
    by the subset, and those it leaves out."""
    y = labels[:, 1:]
    valid = y != -100
    inside = valid & kept[y.clamp(min=0)]
    n_valid = int(valid.sum())
    n_inside = int(inside.sum())
    return n_inside, n_valid - n_inside


def data_counts(label_lists: Iterable[list[int]], kept: torch.Tensor) -> tuple[int, int]:
    """:func:`count_targets` summed over every example's labels."""
    inside = outside = 0
    for labels in label_lists:
        a, b = count_targets(torch.as_tensor([labels], dtype=torch.long), kept)
        inside, outside = inside + a, outside + b
    return inside, outside


def share(inside: int, outside: int) -> float:
    """outside / (inside + outside); 0 without targets."""
    total = inside + outside
    return outside / total if total else 0.0


def describe(subset: SubsetFile, inside: int, outside: int) -> str:
    """The run's opening line about the subset and the share of the data it leaves out."""
    return (
        f"head subset: V' = {subset.subset.size} of {subset.subset.vocab_size} tokens "
        f"({subset.path}, sha256 {subset.sha256[:12]}...); {outside} of {inside + outside} "
        f"target tokens ({100 * share(inside, outside):.2f}%) lie outside it and are left out "
        "of the loss"
    )
