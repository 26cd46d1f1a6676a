"""From per-choice scores to probabilities, and the proper scores on them.

Multiple-choice items have a log-likelihood score per choice. Items may have different numbers
of choices: pass per-item sequences (ragged: a list of lists or of 1-D arrays, as samples files
give), or a 2-D array right-padded with -inf.

* Per-item sequences: an item's number of choices is its sequence's length. A -inf score is a
  real score there (a choice the model gives probability 0), never padding, wherever it sits.
* A 2-D array (numpy, or a tensor): trailing -inf entries of a row are padding, so an item has
  as many choices as the position after its last finite score. A choice that really scores
  -inf at the end of its row cannot be told from padding; pass per-item sequences for such
  data.

Confidence is the softmax over an item's choices of the same scores that make the prediction:

    p_ik = exp(s_ik) / sum_j exp(s_ij),  s_ik = loglik_ik            (normalization="none")
                                          s_ik = loglik_ik / len_ik   (normalization="chars",
                                                 lm-evaluation-harness acc_norm: len_ik is the
                                                 character length of choice k)
                                          s_ik = loglik_ik / ntok_ik  (normalization="tokens":
                                                 the mean log-probability per continuation
                                                 token; ntok_ik is choice k's token count)

Both length normalisations divide by per-choice lengths; the functions below take them as
``choice_char_lengths`` whichever the unit (a samples record picks the right field with
:meth:`calibrated_lm.calibration.record.SampleRecord.lengths`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from calibrated_lm.calibration.validation import (
    as_labels,
    as_probs,
    pad_ragged,
    pad_ragged_with_lengths,
)

NORMALIZATIONS = ("none", "chars", "tokens")
ChoiceScores = ArrayLike | Sequence[Sequence[float]]


def padded_scores(
    choice_scores: ChoiceScores, name: str = "choice_scores"
) -> tuple[np.ndarray, np.ndarray]:
    """(scores padded with -inf, number of choices per item).

    For per-item sequences the choice count of an item is its length (-inf entries are choices
    of probability 0); for a 2-D array it is the position after the row's last finite score
    (trailing -inf is padding). An item without a finite score, NaN, or +inf anywhere is an
    error.
    """
    s, lengths = pad_ragged_with_lengths(choice_scores, fill=-np.inf, name=name)
    if np.isnan(s).any():
        i = int(np.flatnonzero(np.isnan(s).any(axis=1))[0])
        raise ValueError(f"{name} contains NaN (item {i})")
    if np.isposinf(s).any():
        i = int(np.flatnonzero(np.isposinf(s).any(axis=1))[0])
        raise ValueError(f"{name} contains +inf (item {i})")
    finite = np.isfinite(s)
    has = finite.any(axis=1)
    if not has.all():
        i = int(np.flatnonzero(~has)[0])
        raise ValueError(f"{name}[{i}] has no finite score")
    if lengths is not None:
        return s, lengths.astype(np.int64)
    width = s.shape[1]
    n_choices = width - np.argmax(finite[:, ::-1], axis=1)
    return s, n_choices.astype(np.int64)


def normalize_scores(
    scores: np.ndarray,
    n_choices: np.ndarray,
    normalization: str,
    choice_char_lengths: ChoiceScores | None,
) -> np.ndarray:
    """Apply ``normalization`` ("none", "chars" or "tokens") to padded scores; for the two
    length normalisations ``choice_char_lengths`` holds the lengths in that unit."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization {normalization!r}: choose one of {', '.join(NORMALIZATIONS)}"
        )
    if normalization == "none":
        return scores
    if choice_char_lengths is None:
        unit = "character lengths" if normalization == "chars" else "token counts"
        raise ValueError(f'normalization="{normalization}" needs per-choice {unit}')
    lengths = pad_ragged(choice_char_lengths, fill=np.nan, name="choice_char_lengths")
    if lengths.shape[0] != scores.shape[0]:
        raise ValueError(
            f"length mismatch: {scores.shape[0]} items but {lengths.shape[0]} choice_char_lengths"
        )
    width = scores.shape[1]
    if lengths.shape[1] < width:
        lengths = np.pad(lengths, ((0, 0), (0, width - lengths.shape[1])), constant_values=np.nan)
    lengths = lengths[:, :width]
    inside = np.arange(width)[None, :] < n_choices[:, None]
    bad = inside & ~(np.isfinite(lengths) & (lengths > 0))
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(
            f"choice_char_lengths[{i}] must give a positive length for each of its "
            f"{int(n_choices[i])} choices"
        )
    out = np.full_like(scores, -np.inf)
    out[inside] = scores[inside] / lengths[inside]
    return out


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of -inf-padded scores (every row has a finite entry)."""
    m = scores.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        z = scores - m
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def choice_log_probabilities(
    choice_scores: ChoiceScores,
    *,
    choice_char_lengths: ChoiceScores | None = None,
    normalization: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """(log p_ik padded with -inf, number of choices per item); see the module docstring."""
    s, n_choices = padded_scores(choice_scores)
    s = normalize_scores(s, n_choices, normalization, choice_char_lengths)
    return log_softmax(s), n_choices


def choice_probabilities(
    choice_scores: ChoiceScores,
    *,
    choice_char_lengths: ChoiceScores | None = None,
    normalization: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """(p_ik padded with 0, number of choices per item)."""
    logp, n_choices = choice_log_probabilities(
        choice_scores, choice_char_lengths=choice_char_lengths, normalization=normalization
    )
    return np.exp(logp), n_choices


def top_label(probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(confidence max_k p_ik, prediction argmax_k p_ik; ties go to the first choice)."""
    p = as_probs(probs)
    pred = p.argmax(axis=1)
    return p[np.arange(p.shape[0]), pred], pred


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """mean_i 1[argmax_k p_ik = y_i] (ties go to the first choice, as numpy.argmax does)."""
    p = as_probs(probs)
    y = as_labels(labels, p.shape[0], p.shape[1])
    return float(np.mean(p.argmax(axis=1) == y))


def mean_confidence(probs: ArrayLike) -> float:
    """mean_i max_k p_ik."""
    return float(np.mean(as_probs(probs).max(axis=1)))


def brier_score(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multiclass Brier score (Brier 1950): mean_i sum_k (p_ik - 1[k = y_i])^2, in [0, 2]."""
    p = as_probs(probs)
    y = as_labels(labels, p.shape[0], p.shape[1])
    return float(_brier(p, y))


def _brier(p: np.ndarray, y: np.ndarray) -> float:
    rows = np.arange(p.shape[0])
    py = p[rows, y]
    # sum_k (p_k - e_yk)^2 = sum_k p_k^2 - 2 p_y + 1
    return float(np.mean(np.einsum("ij,ij->i", p, p) - 2.0 * py + 1.0))


def top_label_brier(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Top-label Brier score: mean_i (c_i - 1[prediction_i correct])^2, in [0, 1]."""
    from calibrated_lm.calibration.validation import as_confidence, as_correct

    c = as_confidence(confidence)
    y = as_correct(correct, c.shape[0])
    return float(np.mean((c - y) ** 2))


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Negative log-likelihood of the gold choice: -mean_i log p_{i, y_i} (natural log).

    ``+inf`` (not an error) when a gold choice has probability 0, e.g. a -inf score.
    """
    p = as_probs(probs)
    y = as_labels(labels, p.shape[0], p.shape[1])
    with np.errstate(divide="ignore"):
        return float(-np.mean(np.log(p[np.arange(p.shape[0]), y])))
