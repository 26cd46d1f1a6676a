"""compare_hellaswag_tokens.logits_cache_groups: the check that lm-eval's shared-logits path
could misalign a HellaSwag choice finds a group whose continuations differ in length, and
does not count exact duplicates (which share logits correctly)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
_env = dict(os.environ)
import compare_hellaswag_tokens as cht  # noqa: E402

# The module sets thread variables for its own runs; the test process keeps its own.
os.environ.clear()
os.environ.update(_env)


def test_a_group_with_continuations_of_different_lengths_is_found() -> None:
    ids = {
        # ctx + cont[:-1] = [2, 5, 6, 7] for both: one split after 5, one after 6.
        "a/0": [([2, 5], [6, 7, 8]), ([2, 5], [9])],
        "b/1": [([2, 5, 6], [7, 4]), ([2, 5, 6], [3])],
    }
    res = cht.logits_cache_groups(ids)
    assert res["groups_with_continuations_of_different_lengths"] == 1
    assert res["groups_of_more_than_one_request"] == 1
    assert res["examples"] == [["a/0 choice 0 (3 tokens)", "b/1 choice 0 (2 tokens)"]]


def test_exact_duplicates_share_a_group_without_counting_as_mixed() -> None:
    ids = {"a/0": [([2, 5], [6, 7])], "b/1": [([2, 5], [6, 7])], "c/2": [([2], [8])]}
    res = cht.logits_cache_groups(ids)
    assert res["groups_of_more_than_one_request"] == 1
    assert res["requests_in_them"] == 2
    assert res["groups_with_continuations_of_different_lengths"] == 0
