"""Over-confidence capacity of an output head: what confidence can logits ``A u + c`` reach?

For a head ``logits = A u + c`` with ``||u|| <= rho`` (``rho = sqrt(D)`` after RMSNorm; see
:mod:`calibrated_lm.analysis.head`) and a sample of target tokens y, we compute

* the confidence ceiling ``P_y = max_{||u||<=rho} softmax(A u + c)_y``. ``log p_y(u) = z_y -
  logsumexp(z)`` is concave in u (linear minus convex) and the ball is convex, so this is a convex
  problem: projected accelerated gradient ascent reaches the global optimum. We return the exact
  full-vocabulary value at the final point (achieved, so a lower bound) and the Frank-Wolfe
  duality bound ``f(u) + rho ||grad f(u)|| - grad f(u) . u`` (a certified upper bound);
* the best uniform margin ``gamma_y = max_{||u||<=rho} min_{j != y} (z_y - z_j)``, also concave.
  By minimax it equals ``min_{lambda in simplex} rho ||sum_j lambda_j a_j|| + sum_j lambda_j b_j``
  with ``a_j = A_y - A_j``, ``b_j = c_y - c_j``; without biases that is ``rho`` times the distance
  from ``A_y`` to the convex hull of the other rows. We maximise a smoothed minimum
  (``-tau logsumexp(-m/tau)``, annealed tau) and report a certified bracket: the exact minimum
  margin at the final point (lower) and the dual value at the smoothed weights (upper).
  ``gamma_y > 0`` iff y can be the strict argmax at all; ``gamma_y >= G_eps`` (the LS gap) is
  sufficient for the LS target probability ``1 - eps + eps/V`` (docs/theory.md, section 2.4);
* closed-form bounds: per token ``P_y <= 1 / (1 + sum_j exp(-(rho ||A_y - A_j|| + b_j)))`` and,
  for all tokens, the logit range ``R <= 2 rho max_j ||A_j|| + range(c)`` which bounds the
  largest probability and the smallest entropy (:mod:`calibrated_lm.analysis.theory`).

Only the K strongest competitors (by current logit) enter each optimisation step; the active set
is refreshed from a full-vocabulary pass between rounds, and every reported number is evaluated
on the full vocabulary, so the truncation can slow convergence but never falsifies a bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibrated_lm.analysis.head import OutputHead, extract_head
from calibrated_lm.analysis.theory import (
    entropy_floor_from_range,
    ls_target_gap,
    ls_target_prob,
    max_prob_from_range,
)

DEFAULT_EPS: tuple[float, ...] = (0.05, 0.1, 0.2)
# Margins below this many nats count as "cannot be the argmax" when certified from above.
ARGMAX_TOL = 1e-3


@dataclass
class CapacityReport:
    """Per-token results (arrays over the sampled token ids) and head-wide numbers."""

    vocab: int
    dim: int
    radius: float
    ball_radius: float
    max_row_norm: float
    norm_type: str
    softcap: float | None
    token_ids: np.ndarray
    log_ceiling: np.ndarray  # achieved max log p_y (exact at the returned point)
    log_ceiling_upper: np.ndarray  # certified upper bound on max log p_y
    log_ceiling_closed: np.ndarray  # closed-form per-token upper bound
    entropy_at_ceiling: np.ndarray  # entropy (nats) of the distribution at the ceiling point
    log_one_minus_ceiling: np.ndarray  # log(1 - P_y) at the ceiling point, without cancellation
    gap_lower: np.ndarray  # certified lower bound on gamma_y (achieved)
    gap_upper: np.ndarray  # certified upper bound on gamma_y
    eps: tuple[float, ...] = DEFAULT_EPS
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived quantities
    @property
    def logit_range_bound(self) -> float:
        """``R <= 2 rho max_j ||A_j|| + range(c)``, capped at 2c under softcapping."""
        r = self.extra.get("logit_range_bound", 2 * self.radius * self.max_row_norm)
        return min(r, 2 * self.softcap) if self.softcap else r

    def reach(self, eps: float) -> dict[str, float]:
        """Fractions of sampled tokens that can / cannot reach the LS optimum for ``eps``.

        ``frac_ceiling``: achieved ceiling >= ``1 - eps + eps/V`` (certified reachable).
        ``frac_ceiling_impossible``: certified ceiling upper bound < that probability.
        ``frac_gap``: certified margin ``gamma_y >= G_eps`` (every non-target logit at least the LS
        gap below the target at once; sufficient for the LS probability).
        ``frac_gap_impossible``: certified ``gamma_y < G_eps``.
        """
        p = ls_target_prob(eps, self.vocab)
        g = ls_target_gap(eps, self.vocab)
        lp = math.log(p)
        return {
            "eps": eps,
            "target_prob": p,
            "target_gap": g,
            "frac_ceiling": float(np.mean(self.log_ceiling >= lp)),
            "frac_ceiling_impossible": float(np.mean(self.log_ceiling_upper < lp)),
            "frac_gap": float(np.mean(self.gap_lower >= g)),
            "frac_gap_impossible": float(np.mean(self.gap_upper < g)),
        }

    @property
    def frac_can_be_argmax(self) -> float:
        return float(np.mean(self.gap_lower > 0))

    @property
    def frac_cannot_be_argmax(self) -> float:
        return float(np.mean(self.gap_upper < ARGMAX_TOL))

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable summary (the ``capacity`` command writes it to summary.json)."""
        ceiling = np.exp(self.log_ceiling)

        def q(x: np.ndarray) -> dict[str, float]:
            return {
                "min": float(np.min(x)),
                "p05": float(np.quantile(x, 0.05)),
                "median": float(np.median(x)),
                "p95": float(np.quantile(x, 0.95)),
                "max": float(np.max(x)),
                "mean": float(np.mean(x)),
            }

        return {
            "vocab": self.vocab,
            "dim": self.dim,
            "v_over_d": self.vocab / self.dim,
            "radius_sqrt_d": self.radius,
            "ball_radius_sqrt_d_max_gain": self.ball_radius,
            "max_row_norm_effective": self.max_row_norm,
            "norm_type": self.norm_type,
            "softcap": self.softcap,
            "samples": int(len(self.token_ids)),
            "ceiling": q(ceiling),
            "ceiling_upper_certified": q(np.exp(self.log_ceiling_upper)),
            "ceiling_closed_form": q(np.exp(self.log_ceiling_closed)),
            "log10_one_minus_ceiling": q(self.log_one_minus_ceiling / math.log(10)),
            "entropy_at_ceiling": q(self.entropy_at_ceiling),
            "gap_lower": q(self.gap_lower),
            "gap_upper": q(self.gap_upper),
            "frac_can_be_argmax": self.frac_can_be_argmax,
            "frac_cannot_be_argmax": self.frac_cannot_be_argmax,
            "argmax_tolerance": ARGMAX_TOL,
            "closed_form": {
                "logit_range_bound": self.logit_range_bound,
                "max_prob_bound": max_prob_from_range(self.logit_range_bound, self.vocab),
                "entropy_floor_bound": entropy_floor_from_range(self.logit_range_bound, self.vocab),
            },
            "lowest_entropy_found": float(np.min(self.entropy_at_ceiling)),
            "reach_ls": {f"{e:g}": self.reach(e) for e in self.eps},
            **self.extra.get("public", {}),
        }


# ---------------------------------------------------------------------------------- solvers


def _project(u: Any, rho: float) -> Any:
    """Euclidean projection of each row of u onto the ball of radius rho."""
    n = u.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return u * (rho / n).clamp(max=1.0)


def _full_logits(a: Any, c: Any, u: Any, chunk: int = 65536) -> Any:
    """B x V logits ``u A^T + c`` computed in vocabulary chunks (memory: B x chunk)."""
    import torch

    parts = []
    for s in range(0, a.shape[0], chunk):
        z = u @ a[s : s + chunk].T
        if c is not None:
            z = z + c[s : s + chunk]
        parts.append(z)
    return torch.cat(parts, dim=1)


def _cap(z: Any, softcap: float | None) -> Any:
    import torch

    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _active_set(z: Any, ys: Any, k: int) -> Any:
    """Indices (B x K) of the K largest non-target logits per row."""
    import torch

    z = z.clone()
    z[torch.arange(len(ys)), ys] = -math.inf
    return z.topk(min(k, z.shape[1] - 1), dim=1).indices


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run many tiny tensor ops on one CPU thread.

    The inner loops work on B x K x r blocks far too small to split; on a busy machine two or
    more intra-op threads made them over ten times slower than one (measured on the
    2-core development machine). Full-vocabulary passes run outside with the usual threads.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@_one_thread()
def _fista(obj: Any, u0: Any, rho: float, step: Any, iters: int) -> Any:
    """Projected accelerated ascent with gradient-based adaptive restart (batched over rows).

    ``obj(u) -> (value [B], grad [B, D])`` of a concave objective, ``step <= 1/L`` per row
    (so every step stays where the active-set model is trusted). The restart test of
    O'Donoghue & Candes (2015) -- drop the momentum when the gradient-mapping step points
    against the last move -- needs no objective values. Returns the last iterate; callers
    evaluate it exactly on the full vocabulary.
    """
    import torch

    x = u0.clone()
    y, t = x.clone(), torch.ones(len(x), dtype=x.dtype)
    for _ in range(iters):
        x_new = _project(y + step[:, None] * obj(y)[1], rho)
        restart = ((x_new - y) * (x_new - x)).sum(1) < 0
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        mom = ((t - 1) / t_new)[:, None]
        y = torch.where(restart[:, None], x_new, x_new + mom * (x_new - x))
        t = torch.where(restart, torch.ones_like(t), t_new)
        x = x_new
    return x


def _bmv(m: Any, v: Any) -> Any:
    """Batched matrix-vector product: (B, K, D) x (B, D) -> (B, K)."""
    return (m @ v[:, :, None])[:, :, 0]


def _bvm(w: Any, m: Any) -> Any:
    """Batched weighted row sum: (B, K) x (B, K, D) -> (B, D)."""
    return (w[:, None, :] @ m)[:, 0, :]


def _reduce(rows: Any, u: Any) -> tuple[Any, Any, Any]:
    """Express batched rows (B, K, D) in an orthonormal basis of their span.

    ``rows^T = Q R`` (reduced QR), so ``rows u = R^T (Q^T u)``. The objectives below depend on u
    only through ``rows u``, and any part of u outside span(Q) merely spends norm, so optimising
    ``alpha = Q^T u`` over the same ball is equivalent and costs K x min(K, D) per step instead
    of K x D. Returns ``(R^T, Q, alpha0)``.
    """
    q, r = torch_linalg_qr(rows.transpose(1, 2))
    return r.transpose(1, 2).contiguous(), q, (q.transpose(1, 2) @ u[:, :, None])[:, :, 0]


def torch_linalg_qr(x: Any) -> tuple[Any, Any]:
    import torch

    return torch.linalg.qr(x, mode="reduced")


def _solve_ceiling(a, c, ys, rho, k, rounds, iters):  # noqa: ANN001, ANN202 - internal
    """Maximise log p_y(u) over the ball; returns final u (B x D)."""
    import torch

    ay = a[ys]
    u = _project(ay * (rho / ay.norm(dim=1, keepdim=True).clamp_min(1e-30)), rho)
    for _ in range(rounds):
        z = _full_logits(a, c, u)
        idx = _active_set(z, ys, k)
        a_s = torch.cat([ay[:, None, :], a[idx]], dim=1)  # B x (K+1) x D, target first
        c_s = None if c is None else torch.cat([c[ys][:, None], c[idx]], dim=1)
        # Hessian of logsumexp = Cov_p(rows) <= max_j ||A_j - A_y||^2 I
        lip = ((a_s - ay[:, None, :]) ** 2).sum(-1).max(dim=1).values.clamp_min(1e-12)
        a_s, basis, alpha = _reduce(a_s, u)

        def obj(v, a_s=a_s, c_s=c_s):  # noqa: ANN001, ANN202
            zs = _bmv(a_s, v)
            if c_s is not None:
                zs = zs + c_s
            val = zs[:, 0] - torch.logsumexp(zs, dim=1)
            return val, a_s[:, 0] - _bvm(torch.softmax(zs, dim=1), a_s)

        u = (basis @ _fista(obj, alpha, rho, 1.0 / lip, iters)[:, :, None])[:, :, 0]
    return u


def _project_simplex(v: Any) -> Any:
    """Euclidean projection of each row onto the probability simplex (Duchi et al., 2008)."""
    import torch

    srt = v.sort(dim=1, descending=True).values
    css = srt.cumsum(1) - 1
    ind = torch.arange(1, v.shape[1] + 1, dtype=v.dtype)
    count = (srt - css / ind > 0).sum(1, keepdim=True)
    theta = css.gather(1, count - 1) / count
    return (v - theta).clamp_min(0)


@_one_thread()
def _min_norm_weights(a_j: Any, lam0: Any, iters: int) -> Any:
    """Simplex weights making ``||sum_j lam_j a_j||`` small (dual of the margin problem).

    Minimises ``lam^T G lam`` with ``G = a a^T`` by accelerated projected gradient on the
    simplex (warm start ``lam0``). Every iterate is a valid certificate; the minimum is the
    squared distance from 0 to the convex hull of the a_j, i.e. (gamma_y / rho)^2 without
    biases.
    """
    import torch

    # rows are in reduced coordinates (K x r, r = min(K, D)): lambda_max(a a^T) equals
    # lambda_max(a^T a), an r x r symmetric eigenproblem
    small = a_j.transpose(1, 2) @ a_j
    lip = 2 * torch.linalg.eigvalsh(small)[:, -1].clamp_min(1e-30) * 1.001
    x = lam0.clone()
    y, t = x.clone(), torch.ones(len(x), dtype=x.dtype)
    for _ in range(iters):
        grad = 2 * _bmv(a_j, _bvm(y, a_j))
        x_new = _project_simplex(y - grad / lip[:, None])
        restart = ((y - x_new) * (x_new - x)).sum(1) > 0
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        mom = ((t - 1) / t_new)[:, None]
        y = torch.where(restart[:, None], x_new, x_new + mom * (x_new - x))
        t = torch.where(restart, torch.ones_like(t), t_new)
        x = x_new
    return x


def _solve_margin(a, c, ys, rho, k, u0, taus, iters):  # noqa: ANN001, ANN202 - internal
    """Maximise the smoothed minimum margin; returns (u, best certified upper bound)."""
    import torch

    ay = a[ys]
    cy = None if c is None else c[ys]
    u = u0.clone()
    upper = torch.full((len(ys),), math.inf, dtype=a.dtype)
    for tau in taus:
        z = _full_logits(a, c, u)
        idx = _active_set(z, ys, k)
        a_j = ay[:, None, :] - a[idx]  # margins m_j = a_j . u + b_j
        b_j = None if c is None else cy[:, None] - c[idx]
        lip = (a_j**2).sum(-1).max(dim=1).values.clamp_min(1e-12) / tau
        a_full = a_j
        a_j, basis, alpha = _reduce(a_j, u)

        def obj(v, a_j=a_j, b_j=b_j, tau=tau):  # noqa: ANN001, ANN202
            m = _bmv(a_j, v)
            if b_j is not None:
                m = m + b_j
            val = -tau * torch.logsumexp(-m / tau, dim=1)
            return val, _bvm(torch.softmax(-m / tau, dim=1), a_j)

        alpha = _fista(obj, alpha, rho, 1.0 / lip, iters)
        u = (basis @ alpha[:, :, None])[:, :, 0]
        # dual certificate: any simplex weights give rho ||sum lam a|| + sum lam b >= gamma
        m = _bmv(a_full, u) + (0 if b_j is None else b_j)
        lam = torch.softmax(-m / tau, dim=1)
        dual = rho * _bvm(lam, a_full).norm(dim=1)
        if b_j is not None:
            dual = dual + (lam * b_j).sum(1)
        else:  # bias-free: polish the weights towards the min-norm point of the hull
            lam = _min_norm_weights(a_j, lam, 4 * iters)
            dual = torch.minimum(dual, rho * _bvm(lam, a_full).norm(dim=1))
        upper = torch.minimum(upper, dual)
    return u, upper


def analyze_head(
    head: OutputHead | Any,
    gain: Any = None,
    *,
    samples: int = 128,
    eps: Sequence[float] = DEFAULT_EPS,
    seed: int = 0,
    token_ids: Sequence[int] | None = None,
    batch: int = 128,
    active: int = 128,
    rounds: int = 3,
    iters: int = 120,
    taus: Sequence[float] = (1.0, 0.1, 0.01),
    progress: bool = True,
) -> CapacityReport:
    """Capacity of an output head for ``samples`` random target tokens (or ``token_ids``).

    ``head`` is an :class:`OutputHead`, or a V x D weight matrix W together with ``gain`` (the
    RMSNorm gain g; ``None`` means g = 1), i.e. logits ``W (g * u)`` with ``||u|| <= sqrt(D)``.
    """
    import torch
    from tqdm import tqdm

    if not isinstance(head, OutputHead):
        w = torch.as_tensor(head).detach().float().cpu()
        g = torch.ones(w.shape[1]) if gain is None else torch.as_tensor(gain).detach().float()
        head = OutputHead(weight=w, gain=g.cpu())
    a, c = head.effective()
    a = a.float().contiguous()
    vocab, dim = a.shape
    rho = head.radius
    # small heads: optimise over every token (the active set only pays off for large V x D,
    # and spread-out optima, e.g. ceilings far below 1, need many competitors)
    if token_ids is None:
        n = min(samples, vocab)
        gen = np.random.default_rng(seed)
        token_ids = np.sort(gen.choice(vocab, size=n, replace=False))
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab})")
    # small vocabularies: optimise over every token (spread-out optima, e.g. ceilings far
    # below 1, need many competitors; beyond a few thousand the active set is much faster)
    if vocab <= 2048:
        active = vocab - 1

    row_sq = (a * a).sum(1)
    max_row = float(row_sq.max().sqrt())
    c_range = 0.0 if c is None else float(c.max() - c.min())
    keys = ("lc", "lcu", "lcc", "ent", "l1m", "gl", "gu")
    out: dict[str, list] = {k: [] for k in keys}
    bar = tqdm(range(0, len(ids), batch), desc="capacity", disable=not progress, unit="batch")
    with torch.no_grad():
        for s in bar:
            ys = torch.from_numpy(ids[s : s + batch])
            u = _solve_ceiling(a, c, ys, rho, active, rounds, iters)
            # exact full-vocabulary evaluation at u (softcap applied if the model has one)
            z = _cap(_full_logits(a, c, u), head.softcap)
            logp = torch.log_softmax(z, dim=1)
            lc = logp[torch.arange(len(ys)), ys]
            p = logp.exp()
            ent = (-(p * logp).sum(1)).clamp_min(0)
            others = z.clone()
            others[torch.arange(len(ys)), ys] = -math.inf
            l1m = torch.logsumexp(others, dim=1) - torch.logsumexp(z, dim=1)
            if head.softcap is None:
                # Frank-Wolfe bound for the concave problem: max_v grad.(v - u) over the ball
                grad = a[ys] - p @ a
                fw = rho * grad.norm(dim=1) - (grad * u).sum(1)
                lcu = lc + fw.clamp_min(0)
            else:
                lcu = torch.full_like(lc, math.inf)  # not concave under softcap: closed form only
            # closed form: every margin z_y - z_j <= rho ||A_y - A_j|| + (c_y - c_j)
            ay = a[ys]
            d2 = (row_sq[ys][:, None] + row_sq[None, :] - 2 * ay @ a.T).clamp_min(0)
            mmax = d2.sqrt() * rho
            if c is not None:
                mmax = mmax + (c[ys][:, None] - c[None, :])
            if head.softcap is not None:
                mmax = mmax.clamp(max=2 * head.softcap)
            mmax[torch.arange(len(ys)), ys] = math.inf
            lcc = -torch.log1p(torch.exp(-mmax).sum(1))
            lcu = torch.minimum(lcu, lcc)
            # best uniform margin, warm-started at the ceiling point
            u2, gup = _solve_margin(a, c, ys, rho, active, u, taus, iters)
            margins = []
            for point in (u, u2, torch.zeros_like(u)):
                zz = _cap(_full_logits(a, c, point), head.softcap)
                zy = zz[torch.arange(len(ys)), ys].clone()
                zz[torch.arange(len(ys)), ys] = -math.inf
                margins.append(zy - zz.max(dim=1).values)
            gl = torch.stack(margins).max(dim=0).values
            if head.softcap is not None:
                gup = gup.clamp(max=2 * head.softcap)
            gup = torch.maximum(gup, gl)  # numerical safety: the bracket must be ordered
            for key, val in zip(keys, (lc, lcu, lcc, ent, l1m, gl, gup)):
                out[key].append(val.double().numpy())
    cat = {k: np.concatenate(v) for k, v in out.items()}
    gains = head.gain.abs()
    return CapacityReport(
        vocab=vocab,
        dim=dim,
        radius=rho,
        ball_radius=rho * float(gains.max()) * head.logit_scale,
        max_row_norm=max_row,
        norm_type=head.norm_type,
        softcap=head.softcap,
        token_ids=ids,
        log_ceiling=cat["lc"],
        log_ceiling_upper=cat["lcu"],
        log_ceiling_closed=cat["lcc"],
        entropy_at_ceiling=cat["ent"],
        log_one_minus_ceiling=cat["l1m"],
        gap_lower=cat["gl"],
        gap_upper=cat["gu"],
        eps=tuple(float(e) for e in eps),
        extra={
            "logit_range_bound": 2 * rho * max_row + c_range,
            "public": {
                "max_abs_gain": float(gains.max()),
                "max_row_norm_W": float(head.weight.norm(dim=1).max()),
                "centred_norm": head.centred,
                "logit_scale": head.logit_scale,
            },
        },
    )


def analyze_model(model: Any, **kwargs: Any) -> CapacityReport:
    """:func:`analyze_head` on the output head and final norm of a transformers causal LM."""
    return analyze_head(extract_head(model), **kwargs)
