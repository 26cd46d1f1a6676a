"""Numerical checks of the closed forms in docs/theory.md (calibrated_lm.analysis.theory)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibrated_lm.analysis.theory import (
    entropy_floor_from_range,
    ls_loss_identity,
    ls_target_gap,
    ls_target_prob,
    max_prob_from_range,
    softcap_gap_bound,
)


def test_ls_loss_is_ce_plus_eps_times_target_minus_mean_logit():
    rng = np.random.default_rng(0)
    for vocab, eps in [(7, 0.1), (50, 0.05), (300, 0.3)]:
        z = rng.normal(scale=3.0, size=vocab)
        y = int(rng.integers(vocab))
        left, right = ls_loss_identity(z, y, eps)
        torch_loss = F.cross_entropy(
            torch.tensor(z)[None], torch.tensor([y]), label_smoothing=eps
        ).item()
        assert left == pytest.approx(torch_loss, rel=1e-12, abs=1e-12)
        assert right == pytest.approx(left, rel=1e-12, abs=1e-12)


def test_quoted_ls_gaps():
    # the numbers quoted in docs/theory.md and the issue (eps = 0.1)
    assert ls_target_gap(0.1, 32_000) == pytest.approx(math.log(288_001))
    assert round(ls_target_gap(0.1, 32_000), 1) == 12.6
    assert round(ls_target_gap(0.1, 256_000), 1) == 14.7
    assert ls_target_prob(0.1, 32_000) == pytest.approx(0.9 + 0.1 / 32_000)
    assert ls_target_gap(0.0, 10) == math.inf


def test_free_logit_minimiser_of_ls_loss_is_the_stated_optimum():
    # the LS loss is convex in the logits, so a zero gradient identifies the minimiser; the
    # stated optimum (target gap G_eps to every other logit) has one, and a generic optimiser
    # started elsewhere finds no lower loss
    vocab, eps, y = 40, 0.1, 3

    def loss_of(z):
        return F.cross_entropy(z[None], torch.tensor([y]), label_smoothing=eps)

    star = torch.zeros(vocab, dtype=torch.float64)
    star[y] = ls_target_gap(eps, vocab)
    star.requires_grad_(True)
    loss_star = loss_of(star)
    (grad,) = torch.autograd.grad(loss_star, star)
    assert grad.abs().max().item() < 1e-12
    assert torch.softmax(star.detach(), 0)[y].item() == pytest.approx(
        ls_target_prob(eps, vocab), rel=1e-12
    )
    z = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_of(z)
        loss.backward()
        return loss

    opt.step(closure)
    assert loss_of(z.detach()).item() >= loss_star.item() - 1e-12
    assert loss_of(z.detach()).item() == pytest.approx(loss_star.item(), abs=1e-6)


def test_max_prob_bound_is_attained_and_never_exceeded():
    rng = np.random.default_rng(1)
    vocab, r = 30, 4.0
    bound = max_prob_from_range(r, vocab)
    z = np.zeros(vocab)
    z[0] = r
    p = np.exp(z) / np.exp(z).sum()
    assert p.max() == pytest.approx(bound, rel=1e-12)
    for _ in range(200):
        z = rng.uniform(0, r, size=vocab)
        z[rng.integers(vocab)] = rng.choice([0.0, r])
        p = np.exp(z) / np.exp(z).sum()
        assert p.max() <= bound + 1e-12


def _entropy(z: np.ndarray) -> float:
    p = np.exp(z - z.max())
    p /= p.sum()
    return float(-(p * np.log(np.where(p > 0, p, 1.0))).sum())


def test_entropy_floor_from_range_is_the_minimum_over_the_box():
    rng = np.random.default_rng(2)
    for vocab, r in [(5, 1.0), (12, 3.0), (40, 6.0)]:
        floor = entropy_floor_from_range(r, vocab)
        # attained by one of the vertices with k logits on top
        vertex = min(_entropy(np.r_[np.full(k, r), np.zeros(vocab - k)]) for k in range(1, vocab))
        assert floor == pytest.approx(vertex, rel=1e-10, abs=1e-12)
        # no random point of the box, nor a local descent from one, goes below it
        for _ in range(25):
            z = torch.tensor(rng.uniform(0, r, size=vocab), requires_grad=True)
            opt = torch.optim.SGD([z], lr=0.5)
            for _ in range(50):
                opt.zero_grad()
                p = torch.softmax(z, 0)
                (-(p * torch.log_softmax(z, 0)).sum()).backward()
                opt.step()
                with torch.no_grad():
                    z.clamp_(0, r)
            assert _entropy(z.detach().numpy()) >= floor - 1e-9
    assert entropy_floor_from_range(0.0, 9) == pytest.approx(math.log(9))


def test_equal_non_target_logits_need_h_zero_when_v_exceeds_d_plus_one():
    # LS optimum: z_j equal for all j != y, i.e. (w_j - w_k) . h = 0. For a generic W with
    # V - 2 >= D these differences span R^D, so only h = 0 (all logits equal) satisfies it.
    rng = np.random.default_rng(3)
    d, v, y = 6, 20, 0
    w = rng.normal(size=(v, d))
    others = np.delete(w, y, axis=0)
    diffs = others[1:] - others[0]
    smallest = np.linalg.svd(diffs, compute_uv=False).min()
    assert smallest > 1e-3  # full column rank: the null space is {0}
    # with V - 2 < D a non-zero h exists
    w_small = rng.normal(size=(d - 1, d))
    diffs_small = w_small[2:] - w_small[1]
    null = np.linalg.svd(diffs_small)[2][-1]
    z = w_small @ null
    assert np.allclose(z[1:], z[1]) and abs(z[0] - z[1]) > 1e-6


def test_softcap_gap_bound():
    rng = np.random.default_rng(4)
    c = 5.0
    a, b = rng.normal(scale=20, size=(2, 1000))
    a, b = np.maximum(a, b), np.minimum(a, b)
    capped = c * np.tanh(a / c) - c * np.tanh(b / c)
    assert np.all(capped <= softcap_gap_bound(a - b, c) + 1e-12)
    assert np.all(capped < 2 * c)
    assert softcap_gap_bound(3.0, None) == 3.0


def test_temperature_scales_the_needed_raw_gap():
    # training with logits z / T: the LS optimum needs softmax(z / T) at the LS target, i.e. a
    # raw gap of T * G_eps
    vocab, eps, t = 100, 0.1, 2.5
    z = np.zeros(vocab)
    z[0] = t * ls_target_gap(eps, vocab)
    p = np.exp(z / t) / np.exp(z / t).sum()
    assert p[0] == pytest.approx(ls_target_prob(eps, vocab), rel=1e-12)


def test_logit_range_needed_for_ls_target_is_exactly_the_ls_gap():
    # p_max <= e^R / (e^R + V - 1) reaches 1 - eps + eps/V exactly at R = G_eps (theory 2.2)
    for vocab, eps in [(32_000, 0.1), (262_144, 0.05), (50, 0.2)]:
        g = ls_target_gap(eps, vocab)
        assert max_prob_from_range(g, vocab) == pytest.approx(ls_target_prob(eps, vocab), rel=1e-12)
        assert max_prob_from_range(g - 1e-3, vocab) < ls_target_prob(eps, vocab)
