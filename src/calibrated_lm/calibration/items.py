"""The validated per-question arrays every calibration metric is computed from."""

from __future__ import annotations

from functools import cached_property

import numpy as np


class ItemArrays:
    """One task's questions after the softmax: ``logp`` (n, k) choice log-probabilities
    (-inf past an item's ``n_choices``), gold ``labels``; derived top-label ``confidence``,
    prediction ``pred``, ``correct`` (0/1), gold log-probability ``gold_logp`` and per-item
    multiclass Brier term ``brier``.

    Inputs are trusted (built by :func:`calibrated_lm.calibration.report.summarize` after
    validation, or by :meth:`from_probs`); a metric function reads these arrays and must not
    modify them. ``probs`` may be given with ``logp`` when the caller holds both (then
    ``probs == exp(logp)`` is the caller's promise), so that probabilities given by a caller
    are used as given rather than through a log/exp round trip."""

    def __init__(
        self,
        logp: np.ndarray,
        n_choices: np.ndarray,
        labels: np.ndarray,
        probs: np.ndarray | None = None,
    ) -> None:
        self.logp = logp
        self.n_choices = n_choices
        self.labels = labels
        self.probs = np.exp(logp) if probs is None else probs
        self.pred = self.probs.argmax(axis=1)
        rows = np.arange(logp.shape[0])
        self.confidence = self.probs[rows, self.pred]
        self.correct = (self.pred == labels).astype(np.float64)
        self.gold_logp = logp[rows, labels]
        py = np.exp(self.gold_logp)
        self.brier = np.einsum("ij,ij->i", self.probs, self.probs) - 2.0 * py + 1.0

    @classmethod
    def from_probs(
        cls, probs: np.ndarray, labels: np.ndarray, n_choices: np.ndarray | None = None
    ) -> ItemArrays:
        """Items from (n, k) choice probabilities (validated by the caller: finite, >= 0, rows
        summing to 1 over each item's choices, 0 past them) and gold ``labels``.
        ``n_choices`` defaults to k for every item: a 0 column is then a choice of
        probability 0, which only the classwise ECE can tell from padding."""
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        if n_choices is None:
            n_choices = np.full(labels.shape[0], probs.shape[1], dtype=np.int64)
        with np.errstate(divide="ignore"):
            logp = np.log(probs)
        return cls(logp, np.asarray(n_choices, dtype=np.int64), labels, probs)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: np.ndarray) -> ItemArrays:
        """The items at ``idx`` (with repeats: one bootstrap resample)."""
        return ItemArrays(self.logp[idx], self.n_choices[idx], self.labels[idx], self.probs[idx])

    @cached_property
    def smooth(self) -> tuple[float, float]:
        """(smooth ECE, its bandwidth), computed once for both."""
        from calibrated_lm.calibration.smooth import smooth_ece

        value, bandwidth = smooth_ece(self.confidence, self.correct, return_bandwidth=True)
        return float(value), float(bandwidth)
