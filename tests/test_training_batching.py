"""StepPlan: a step's examples do not depend on length grouping; its micro-batches do."""

from __future__ import annotations

import random

import pytest

from calibrated_lm.training.batching import StepPlan


def _plans(n=53, batch=4, accum=3, world=1):
    lengths = [random.Random(i).randint(1, 500) for i in range(n)]
    plain = StepPlan(n, batch, accum, seed=7, world=world)
    grouped = StepPlan(n, batch, accum, seed=7, world=world, lengths=lengths)
    return plain, grouped, lengths


@pytest.mark.parametrize("world", [1, 2])
def test_grouping_keeps_each_steps_examples_and_sorts_them(world):
    plain, grouped, lengths = _plans(world=world)
    assert plain.steps_per_epoch == grouped.steps_per_epoch
    for step in range(3 * plain.steps_per_epoch):  # three epochs, last steps short
        a, b = plain.step_batches(step), grouped.step_batches(step)
        assert sorted(i for m in a for i in m) == sorted(i for m in b for i in m)
        assert len(b) == len(a) and all(len(m) <= 4 for m in b)
        flat = [lengths[i] for m in b for i in m]
        assert flat == sorted(flat, reverse=True)


def test_grouping_cuts_padding():
    plain, grouped, lengths = _plans()

    def padded(plan):
        return sum(
            max(lengths[i] for i in m) * len(m)
            for s in range(plan.steps_per_epoch)
            for m in plan.step_batches(s)
        )

    assert padded(grouped) < 0.8 * padded(plain)


def test_lengths_must_match_the_examples():
    with pytest.raises(ValueError, match="3 lengths for 4 examples"):
        StepPlan(4, 2, 1, seed=0, lengths=[1, 2, 3])
