"""Head subsets (claim 3): selection, coverage, the saved file, and that the fused loss over
the kept rows is the cross-entropy of the restricted softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibrated_lm.loss import linear_cross_entropy
from calibrated_lm.models import head_subset as hs


def test_selection_keeps_required_then_most_frequent_with_id_ties():
    counts = np.array([5, 0, 9, 9, 1, 7, 0, 3])
    s = hs.select_vocabulary(counts, 4, required=[6])  # 6 never occurs but an answer needs it
    # required 6; then by count: 2 (9), 3 (9, larger id), 5 (7)
    assert s.kept.tolist() == [2, 3, 5, 6]
    assert s.index_map().tolist() == [-1, -1, 0, 1, -1, 2, 3, -1]
    assert hs.coverage(s, counts) == pytest.approx((9 + 9 + 7 + 0) / counts.sum())
    assert hs.select_vocabulary(counts, 8, required=[]).kept.tolist() == list(range(8))


def test_selection_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="3 tokens are required .* V' = 2"):
        hs.select_vocabulary(np.ones(5), 2, required=[0, 1, 4])
    with pytest.raises(ValueError, match="size must be in"):
        hs.select_vocabulary(np.ones(5), 6, required=[])
    with pytest.raises(ValueError, match="required token ids must lie"):
        hs.select_vocabulary(np.ones(5), 2, required=[5])


def test_counts_and_file_round_trip(tmp_path):
    counts = hs.token_counts([[1, 2, 2], [], [3]], vocab_size=5)
    assert counts.tolist() == [0, 1, 2, 1, 0]
    with pytest.raises(ValueError, match="outside"):
        hs.token_counts([[5]], vocab_size=5)
    s = hs.select_vocabulary(counts, 3, required=[4])
    hs.save(s, tmp_path, rule="test")
    back = hs.load(tmp_path)
    assert back is not None and back.kept.tolist() == s.kept.tolist() and back.vocab_size == 5
    assert hs.load(tmp_path / "nowhere") is None
    (tmp_path / hs.FILE).write_text('{"kept": [3, 1], "vocab_size": 5}')
    with pytest.raises(ValueError, match="head_subset.json: not a valid head subset"):
        hs.load(tmp_path)


def test_fused_loss_over_kept_rows_is_the_restricted_softmax_cross_entropy():
    torch.manual_seed(0)
    v, d, n = 50, 8, 40
    w, h = torch.randn(v, d), torch.randn(n, d)
    subset = hs.select_vocabulary(np.arange(v)[::-1].copy(), 12, required=[0, 49])
    kept = torch.as_tensor(subset.kept)
    remap = torch.as_tensor(subset.index_map())
    y_full = kept[torch.randint(0, subset.size, (n,))]
    y = remap[y_full]
    assert (y >= 0).all()
    ours = linear_cross_entropy(h, w[kept], y, label_smoothing=0.1, impl="torch")
    full = h @ w.T
    masked = full.masked_fill(remap[None, :] < 0, float("-inf"))
    # the restricted softmax is the full one with the other tokens at -inf ...
    torch.testing.assert_close(
        torch.log_softmax(masked, -1)[:, kept], torch.log_softmax(full[:, kept], -1)
    )
    # ... and smoothing spreads eps over the V' kept tokens
    ref = F.cross_entropy(full[:, kept], y, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
