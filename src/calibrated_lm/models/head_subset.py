"""An output head restricted to V' of a model's V tokens (issue 12, claim 3: D fixed, V varied).

Claim 3 says label smoothing helps less when the vocabulary is large relative to the hidden
size. To vary V at a fixed D on one real model, the output softmax is restricted to a subset
S of the vocabulary, |S| = V': the V' most frequent tokens of the SFT and evaluation text,
always including every token a scored answer needs (so every choice stays scorable) and the
special tokens. The model then predicts

    p(y | h) = exp(w_y . h) / sum_{j in S} exp(w_j . h),   y in S,

i.e. the full model's logits with every token outside S at -inf. The input embedding keeps all
V rows (inputs may hold any token); only the softmax changes.

This module owns the subset itself: choosing it (:func:`select_vocabulary`), its coverage of
a token stream (:func:`coverage`), the V -> V' index map, and its file ``head_subset.json`` in
a model folder (:func:`save` / :func:`load`), which training and scoring read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibrated_lm import durable

FILE = "head_subset.json"


@dataclass(frozen=True)
class HeadSubset:
    """``kept``: the V' token ids of the softmax, ascending. ``vocab_size``: V."""

    kept: np.ndarray
    vocab_size: int

    def __post_init__(self) -> None:
        k = np.asarray(self.kept)
        if k.ndim != 1 or k.size == 0:
            raise ValueError("a head subset needs at least one token id")
        if not np.issubdtype(k.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {k.dtype}")
        if np.any(np.diff(k) <= 0):
            raise ValueError("token ids of a head subset must be strictly ascending")
        if k[0] < 0 or k[-1] >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {k[0]}..{k[-1]}")

    @property
    def size(self) -> int:
        return int(np.asarray(self.kept).size)

    def index_map(self) -> np.ndarray:
        """V entries: the position of each token in ``kept``, -1 for tokens outside."""
        m = np.full(self.vocab_size, -1, dtype=np.int64)
        m[np.asarray(self.kept)] = np.arange(self.size)
        return m


def token_counts(sequences: Iterable[Iterable[int]], vocab_size: int) -> np.ndarray:
    """Occurrences of each of the V token ids over ``sequences`` (ids outside [0, V) refused)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for seq in sequences:
        ids = np.asarray(list(seq), dtype=np.int64)
        if ids.size == 0:
            continue
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"token id outside [0, {vocab_size}) in the counted text")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def select_vocabulary(counts: np.ndarray, size: int, required: Iterable[int]) -> HeadSubset:
    """The ``size`` tokens to keep: every ``required`` id, then the most frequent others
    (ties broken by the smaller id, so the choice is deterministic).

    Raises ValueError when the required tokens alone exceed ``size``.
    """
    counts = np.asarray(counts)
    v = counts.shape[0]
    req = np.unique(np.asarray(list(required), dtype=np.int64))
    if req.size and (req[0] < 0 or req[-1] >= v):
        raise ValueError(f"required token ids must lie in [0, {v})")
    if not 0 < size <= v:
        raise ValueError(f"size must be in [1, {v}], got {size}")
    if req.size > size:
        raise ValueError(
            f"{req.size} tokens are required (answer and special tokens) but V' = {size}; "
            "choose a larger V'"
        )
    is_req = np.zeros(v, dtype=bool)
    is_req[req] = True
    # Stable sort on -count keeps ascending ids among equal counts.
    order = np.argsort(-counts, kind="stable")
    others = order[~is_req[order]][: size - req.size]
    return HeadSubset(np.sort(np.concatenate([req, others])), v)


def coverage(subset: HeadSubset, counts: np.ndarray) -> float:
    """The fraction of the counted token occurrences whose token is kept (1.0 for no text)."""
    counts = np.asarray(counts)
    total = counts.sum()
    return float(counts[np.asarray(subset.kept)].sum() / total) if total else 1.0


def save(subset: HeadSubset, folder: str | Path, **meta: object) -> Path:
    """Write ``folder/head_subset.json`` (kept ids, V, and ``meta`` such as the selection rule)
    atomically and durably (``calibrated_lm.durable``); returns its path."""
    path = Path(folder) / FILE
    body = {"vocab_size": subset.vocab_size, "size": subset.size, **meta,
            "kept": [int(i) for i in np.asarray(subset.kept)]}  # fmt: skip
    # Imported here: the calibration package costs a third of a second to import.
    from calibrated_lm.calibration.jsonfile import json_safe

    # Atomically and durably: train --head-subset, eval and train --resume read it later.
    # json_safe: a non-finite figure in ``meta`` (informational) becomes null, not an error.
    return durable.write_json(path, json_safe(body), indent=None)


def load(folder: str | Path) -> HeadSubset | None:
    """The subset saved in ``folder``, or None when it has none. A damaged file is an error
    naming the file (a model silently scored over the full vocabulary would be wrong)."""
    path = Path(folder) / FILE
    if not path.exists():
        return None
    return read(path)


def read(path: str | Path) -> HeadSubset:
    """The subset in the file ``path`` (any name); ValueError naming the file when it is not
    one (OSError when it cannot be read)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a valid head subset ({exc})") from exc
    return _parse(text, path)


def _parse(text: str, path: Path) -> HeadSubset:
    try:
        body = json.loads(text)
        return HeadSubset(np.asarray(body["kept"], dtype=np.int64), int(body["vocab_size"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid head subset ({exc})") from exc


@dataclass(frozen=True, eq=False)
class SubsetFile:
    """A head subset file as a run read it. ``data`` is copied verbatim into every model
    folder a training run saves, so one ``sha256`` names the subset in the trained model, its
    checkpoints and the base model scored with it."""

    path: Path
    data: bytes
    sha256: str
    subset: HeadSubset

    def record(self) -> dict[str, object]:
        """What a run records of it: path, sha256, V' (``size``) and V (``vocab_size``)."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "size": self.subset.size,
            "vocab_size": self.subset.vocab_size,
        }


def open_file(path: str | Path, flag: str = "--head-subset") -> SubsetFile:
    """Read ``path`` (a head subset file, or a model folder holding ``head_subset.json``);
    a missing or invalid file is a :class:`~calibrated_lm.errors.UserError` naming ``flag``."""
    import hashlib

    from calibrated_lm.errors import UserError

    p = Path(path)
    if p.is_dir():
        p = p / FILE
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserError(
            f"{flag} {path}: cannot read the head subset ({exc.strerror or exc})"
        ) from None
    try:
        subset = _parse(data.decode("utf-8"), p)
    except UnicodeDecodeError:
        raise UserError(f"{flag} {p}: not a valid head subset (not UTF-8 text)") from None
    except ValueError as exc:
        raise UserError(f"{flag} {exc}") from None
    return SubsetFile(p.resolve(), data, hashlib.sha256(data).hexdigest(), subset)
