"""The scorer's fp32 log-probabilities stay at fp32 rounding of the float64 value.

``_target_logprobs_on_device`` takes ``z[t] - logsumexp(z)``; torch's fp32 ``log_softmax`` on the CPU is
~20x further from float64 at a 49K vocabulary (benchmarks/logsoftmax_precision.py), which is
where the log-likelihood gap to lm-evaluation-harness comes from. This pins our side.
"""

from __future__ import annotations

import torch

from calibrated_lm.evaluation.scoring import _target_logprobs_on_device


def test_target_logprobs_match_float64_at_a_large_vocabulary() -> None:
    gen = torch.Generator().manual_seed(0)
    b, t, v = 3, 40, 49152
    # Model-like logits: a per-position offset, a spread of a few units, one peaked token.
    z = torch.randn(b, t, v, generator=gen) * 3 + torch.randn(b, t, 1, generator=gen) * 5
    b_idx = torch.arange(b).repeat_interleave(t)
    p_idx = torch.arange(t).repeat(b)
    t_idx = torch.randint(0, v, (b * t,), generator=gen)
    z[b_idx[::2], p_idx[::2], t_idx[::2]] += 15  # half the targets are the likely token
    got = _target_logprobs_on_device(z, b_idx, p_idx, t_idx)
    assert got.dtype == torch.float64
    rows = z.double()[b_idx, p_idx]
    want = rows.gather(1, t_idx[:, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)
    err = (got - want).abs()
    # fp32 rounding of values up to ~|20|: a few ulps (1 ulp at 16 is 1.9e-6).
    assert err.max().item() < 8e-6
    # And it does not drift with the sum: 120 targets summed stay within a few 1e-5.
    assert abs(got.sum().item() - want.sum().item()) < 5e-5
