"""Bin edges, equal-mass group sizes, bootstrap bins and the smooth ECE's accuracy (issue 16).

Equal-width bins are ``e[k] <= c < e[k + 1]`` on the floats ``e = numpy.linspace(0, 1, B + 1)``,
the last bin closed (see ``calibration.binning``). Checked here at, and one ulp either side
of, every edge against an exact (rational) reference, against netcal and torchmetrics when
installed, and against the rules of Kumar et al.'s ``calibration`` package and relplot, which
are not dependencies: their rules are copied from their source below (``calibration.utils``
0.1.4: ``get_equal_prob_bins`` + ``np.searchsorted``; ``relplot.metrics`` 1.0.3: ``binning``)
and, when those packages are importable, checked against them.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.special import ndtr

from calibrated_lm.calibration import bin_indices, bin_table, calibration_error
from calibrated_lm.calibration.binning import bin_sums
from calibrated_lm.calibration.resampled import multiplicities, weighted_bin_sums
from calibrated_lm.calibration.smooth import smooth_ece, smooth_ece_sigma

# The issue's example: 0.3, 0.6 and 0.7 are floats just below 3/10, 6/10 and 7/10.
C9 = [0.3, 0.3, 0.6, 0.6, 0.7, 0.7, 0.25, 0.55, 0.65]
Y9 = [1, 0, 1, 1, 0, 1, 0, 0, 1]


def test_issue_example_bins_below_the_edges():
    # bins [.2,.3): .3 .3 .25 -> conf 17/60, acc 1/3, gap 1/20; [.5,.6): .6 .6 .55 -> conf
    # 7/12, acc 2/3, gap 1/12; [.6,.7): .7 .7 .65 -> conf 41/60, acc 2/3, gap 1/60.
    # (floor(c * 10) gave ECE 0.3056, RMS-CE 0.3276 and MCE 0.55.)
    assert bin_indices(np.array(C9), 10).tolist() == [2, 2, 5, 5, 6, 6, 2, 5, 6]
    assert calibration_error(C9, Y9, n_bins=10) == pytest.approx(1 / 20, abs=1e-12)
    rms = math.sqrt((1 / 400 + 1 / 144 + 1 / 3600) / 3)  # 0.056928
    assert calibration_error(C9, Y9, n_bins=10, norm="l2") == pytest.approx(rms, abs=1e-12)
    assert calibration_error(C9, Y9, n_bins=10, norm="max") == pytest.approx(1 / 12, abs=1e-12)


def _edge_points(n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Every edge float (linspace's, and the nearest float to k/B where they differ) and the
    floats one ulp either side, in [0, 1]; with a mask of those that are edges themselves."""
    edges = set(np.linspace(0.0, 1.0, n_bins + 1).tolist()) | {
        k / n_bins for k in range(n_bins + 1)
    }
    pts = set()
    for v in edges:
        pts |= {np.nextafter(v, -1.0), v, np.nextafter(v, 2.0)}
    x = np.array(sorted(p for p in pts if 0.0 <= p <= 1.0))
    return x, np.isin(x, sorted(edges))


def _exact_bin(x: float, n_bins: int) -> int:
    """Rational comparison with the float edges: the largest k with e[k] <= x, last bin closed."""
    edges = [Fraction(v) for v in np.linspace(0.0, 1.0, n_bins + 1)]
    return min(max(k for k in range(n_bins + 1) if edges[k] <= Fraction(x)), n_bins - 1)


def _real_bin(x: float, n_bins: int) -> int:
    """Comparison with the real numbers k/B: floor(x * B) in exact arithmetic."""
    return min(math.floor(Fraction(x) * n_bins), n_bins - 1)


def _kumar_bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """calibration.utils: get_equal_prob_bins -> [i * 1.0 / B], fast_bin -> np.searchsorted
    (side left), so bins are right-closed on those floats."""
    return np.searchsorted([i * 1.0 / n_bins for i in range(1, n_bins + 1)], x)


def _relplot_bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """relplot.metrics.binning: ((f + 0) / (1.0 / B)).astype(int), with B + 1 bins (1.0 has
    a bin of its own; merged into the last here)."""
    return np.minimum((x / (1.0 / n_bins)).astype(int), n_bins - 1)


def _ece_from_bins(idx, c, y, n_bins, norm="l1"):
    gaps, weights = [], []
    for k in range(n_bins):
        m = idx == k
        if m.any():
            gaps.append(abs(c[m].mean() - y[m].mean()))
            weights.append(m.mean())
    gaps, weights = np.array(gaps), np.array(weights)
    if norm == "l1":
        return float(weights @ gaps)
    if norm == "l2":
        return float(np.sqrt(weights @ gaps**2))
    return float(gaps.max())


@pytest.mark.parametrize("n_bins", [10, 15])
def test_width_bins_at_and_one_ulp_around_every_edge(n_bins):
    x, at_edge = _edge_points(n_bins)
    ours = bin_indices(x, n_bins)
    assert ours.tolist() == [_exact_bin(v, n_bins) for v in x]
    # One ulp either side of an edge, the float edges and the real k/B agree.
    assert ours[~at_edge].tolist() == [_real_bin(v, n_bins) for v in x[~at_edge]]
    # Left-closed at the edge floats themselves; 0.0 in the first bin, 1.0 in the last.
    lin = np.linspace(0.0, 1.0, n_bins + 1)
    assert bin_indices(lin, n_bins).tolist() == [*range(n_bins), n_bins - 1]
    assert bin_indices(np.array([0.0, 1.0]), n_bins).tolist() == [0, n_bins - 1]
    # Every metric uses these bins.
    rng = np.random.default_rng(n_bins)
    y = rng.integers(0, 2, x.size).astype(float)
    ref = np.array([_exact_bin(v, n_bins) for v in x])
    for norm in ("l1", "l2", "max"):
        want = _ece_from_bins(ref, x, y, n_bins, norm)
        assert calibration_error(x, y, n_bins=n_bins, norm=norm) == pytest.approx(want, abs=1e-12)
    assert (
        bin_table(x, y, n_bins=n_bins).count.tolist() == np.bincount(ref, minlength=n_bins).tolist()
    )


@pytest.mark.parametrize("n_bins", [10, 15])
def test_kumar_and_relplot_rules_near_and_at_edges(n_bins):
    x, at_edge = _edge_points(n_bins)
    ours = bin_indices(x, n_bins)
    kumar, relplot = _kumar_bins(x, n_bins), _relplot_bins(x, n_bins)
    # Kumar's rule agrees except at an edge float that is an upper edge of both (linspace's
    # and i * 1.0 / B): right-closed there, one bin lower (0.5 with 10 bins: 4 there, 5 here).
    # With 10 bins linspace's 0.30000000000000004, 0.6000000000000001, 0.7000000000000001 are
    # not Kumar's 0.3, 0.6, 0.7, which both rules put below the edge.
    lin = np.linspace(0.0, 1.0, n_bins + 1)
    shared = np.isin(x, [v for k, v in enumerate(lin) if 0 < k < n_bins and v == k / n_bins])
    assert int(shared.sum()) == {10: 6, 15: 14}[n_bins]
    assert (ours[~shared] == kumar[~shared]).all()
    assert (ours[shared] == kumar[shared] + 1).all()
    assert at_edge[shared].all()
    # relplot agrees everywhere with 10 bins; with 15 its rounded quotient puts three floats
    # one ulp below an edge into the bin above.
    off = x[ours != relplot]
    if n_bins == 10:
        assert off.size == 0
    else:
        assert off.tolist() == [0.19999999999999998, 0.39999999999999997, 0.7999999999999999]
        assert (relplot[ours != relplot] == ours[ours != relplot] + 1).all()


@pytest.mark.parametrize("n_bins", [10, 15])
def test_netcal_bins_at_and_around_every_edge(n_bins):
    netcal_metrics = pytest.importorskip("netcal.metrics")
    x, _ = _edge_points(n_bins)
    y = np.random.default_rng(0).integers(0, 2, x.size)
    ece = netcal_metrics.ECE(bins=n_bins)
    # netcal's own per-sample bin index (its prepare + binning, which clip to [eps, 1 - eps]).
    xs, matched, _, bounds, _ = ece.prepare(x, y, batched=False, uncertainty=None)
    theirs = ece.binning(bounds[0], xs[0], matched[0])[3][0]
    assert bin_indices(x, n_bins).tolist() == theirs.tolist()
    assert calibration_error(x, y, n_bins=n_bins) == pytest.approx(ece.measure(x, y), abs=1e-12)
    mce = netcal_metrics.MCE(bins=n_bins).measure(x, y)
    assert calibration_error(x, y, n_bins=n_bins, norm="max") == pytest.approx(mce, abs=1e-12)
    assert calibration_error(C9, Y9, n_bins=10) == pytest.approx(
        netcal_metrics.ECE(bins=10).measure(np.array(C9), np.array(Y9)), abs=1e-12
    )


@pytest.mark.parametrize("n_bins", [10, 15])
def test_torchmetrics_around_every_float32_edge(n_bins):
    torch = pytest.importorskip("torch")
    tm_cls = pytest.importorskip("torchmetrics.functional.classification")
    # torchmetrics bins in float32 on float32 linspace edges (up to two float32 ulps from
    # ours with 15 bins), and keeps 1.0 in a bin of its own. Probes: the nearest float32 below
    # both edges and above both, and the edges that are the same number in float32 and
    # float64 (0, and 0.5 with 10 bins).
    e32 = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32).numpy()
    e64 = np.linspace(0.0, 1.0, n_bins + 1)
    near = e64.astype(np.float32)
    probes = [
        np.nextafter(np.minimum(e32, near), np.float32(-1)),
        np.nextafter(np.maximum(e32, near), np.float32(2)),
        e32[e32 == e64],
    ]
    x32 = np.unique(np.concatenate(probes))
    x32 = x32[(x32 >= 0) & (x32 < 1)]
    x = x32.astype(np.float64)
    # Each probe is on the same side of the float32 and the float64 edges.
    assert ((x[:, None] >= e32[None, :]) == (x[:, None] >= e64[None, :])).all()
    y = np.random.default_rng(1).integers(0, 2, x.size)
    for norm in ("l1", "l2", "max"):
        theirs = tm_cls.binary_calibration_error(
            torch.tensor(x32), torch.tensor(y), n_bins=n_bins, norm=norm
        )
        ours = calibration_error(x, y, n_bins=n_bins, norm=norm)
        assert ours == pytest.approx(float(theirs), abs=1e-6)  # float32 sums


@pytest.mark.parametrize("n_bins", [10, 15])
def test_kumar_package_if_installed(n_bins):
    utils = pytest.importorskip("calibration.utils")
    if not hasattr(utils, "get_equal_prob_bins"):
        pytest.skip("'calibration' is not Kumar et al.'s package")
    x, at_edge = _edge_points(n_bins)
    bins = utils.get_equal_prob_bins(list(x), num_bins=n_bins)
    assert [utils.get_bin(v, bins) for v in x] == _kumar_bins(x, n_bins).tolist()
    near, y = x[~at_edge], np.random.default_rng(2).integers(0, 2, int((~at_edge).sum()))
    assert calibration_error(near, y, n_bins=n_bins) == pytest.approx(
        utils.get_ece(near, y, num_bins=n_bins), abs=1e-12
    )


@pytest.mark.parametrize("n_bins", [10, 15])
def test_relplot_package_if_installed(n_bins):
    metrics = pytest.importorskip("relplot.metrics")
    x, _ = _edge_points(n_bins)
    x = x[(x > 0) & (x < 1)]
    theirs = [
        int(np.flatnonzero(metrics.binning(np.array([v]), np.array([0.0]), 1.0 / n_bins))[0])
        for v in x
    ]
    assert theirs == _relplot_bins(x, n_bins).tolist()
    if n_bins == 10:
        y = np.random.default_rng(3).integers(0, 2, x.size)
        want = metrics.binnedECE(x, y, n_bins)
        assert calibration_error(x, y, n_bins=n_bins) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    ("n", "n_bins"),
    [(100, 15), (7, 3), (3, 5), (1, 4), (15, 15), (16, 15), (29, 4), (1000, 7), (2, 1)],
)
def test_equal_mass_groups_are_array_split_of_the_sorted_order(n, n_bins):
    rng = np.random.default_rng(n + n_bins)
    c = np.round(rng.uniform(size=n), 1)  # ties: the stable sort keeps input order
    idx = bin_indices(c, n_bins, "mass")
    groups = np.array_split(np.argsort(c, kind="stable"), n_bins)
    assert np.bincount(idx, minlength=n_bins).tolist() == [len(g) for g in groups]
    for k, g in enumerate(groups):
        assert sorted(np.flatnonzero(idx == k).tolist()) == sorted(g.tolist())


def test_equal_mass_ece_uses_array_split_groups():
    # Interleaved sizes ([7, 7, 6, 7, ...]) gave 0.1035 on this sample.
    rng = np.random.default_rng(0)
    c = rng.uniform(size=100)
    y = (rng.uniform(size=100) < c).astype(float)
    groups = np.array_split(np.argsort(c, kind="stable"), 15)
    want = sum(len(g) / 100 * abs(c[g].mean() - y[g].mean()) for g in groups)
    assert want == pytest.approx(0.15170074801025, abs=1e-12)
    assert calibration_error(c, y, n_bins=15, binning="mass") == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("binning", ["width", "mass"])
@pytest.mark.parametrize("n_bins", [1, 4, 15, 40])
def test_resampled_draws_bin_like_the_direct_computation(binning, n_bins):
    rng = np.random.default_rng(n_bins)
    n = 23
    c = np.concatenate([np.round(rng.uniform(size=n - 5), 1), [0.0, 1.0, 0.3, 0.7, 0.5]])
    y = (rng.uniform(size=n) < c).astype(float)
    values = np.stack([np.ones(n), c, y], axis=1)
    # A draw that takes every item once is the direct computation, outcome sums included.
    got = weighted_bin_sums(c, values, np.ones((2, n)), n_bins, binning)
    _, count, conf_sum, acc_sum = bin_sums(c, y, n_bins, binning)
    want = np.stack([count, conf_sum, acc_sum], axis=1)
    assert np.array_equal(got[0, :, 0], count) and np.allclose(got, want[None], atol=1e-12)
    # Any draw equals the direct computation on its expanded sample (distinct confidences,
    # so the sorted order of the copies is unambiguous).
    c = rng.permutation(np.linspace(0.01, 0.99, n))
    values = np.stack([np.ones(n), c, y], axis=1)
    draws = rng.integers(0, n, (5, n))
    weights = multiplicities(draws, n)
    got = weighted_bin_sums(c, values, weights, n_bins, binning)
    for b in range(5):
        rows = np.repeat(np.arange(n), weights[b].astype(int))
        _, count, conf_sum, acc_sum = bin_sums(c[rows], y[rows], n_bins, binning)
        assert np.allclose(got[b], np.stack([count, conf_sum, acc_sum], axis=1), atol=1e-12)


def test_resampled_equal_mass_needs_whole_weights():
    c = np.array([0.1, 0.5, 0.9])
    values = np.stack([np.ones(3), c, c], axis=1)
    with pytest.raises(ValueError, match="whole-number weights"):
        weighted_bin_sums(c, values, np.full((1, 3), 0.5), 2, "mass")


def _smooth_oracle(c: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Exact smECE_sigma: S(t) = sum_i K_sigma(t, c_i) r_i has closed-form integrals (normal
    CDFs) between its zeros, which are bracketed on a mesh of spacing sigma / 20 and bisected
    to machine precision. No grid, no FFT, no interpolation."""
    r = c - y
    shifts = 2.0 * np.arange(-int(math.ceil(10 * sigma)) - 1, int(math.ceil(10 * sigma)) + 2)
    pts = np.concatenate([c[None, :] + shifts[:, None], -c[None, :] + shifts[:, None]]).ravel()
    w = np.tile(r, 2 * shifts.size)
    near = (pts > -40 * sigma) & (pts < 1 + 40 * sigma)  # the rest contribute exp(-800)
    pts, w = pts[near], w[near]

    def dens(t):
        return np.exp(-0.5 * ((t[:, None] - pts[None, :]) / sigma) ** 2) @ w

    mesh = np.linspace(0.0, 1.0, int(math.ceil(20 / sigma)) + 1)
    s = np.concatenate([dens(part) for part in np.array_split(mesh, 1 + mesh.size // 4000)])
    sign = np.sign(s)
    j = np.flatnonzero(sign[:-1] * sign[1:] < 0)
    lo, hi, s_lo = mesh[j], mesh[j + 1], s[j]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        f = dens(mid)
        left = np.sign(f) == np.sign(s_lo)
        lo, s_lo, hi = np.where(left, mid, lo), np.where(left, f, s_lo), np.where(left, hi, mid)
    cuts = np.unique(np.concatenate([[0.0, 1.0], mesh[s == 0.0], 0.5 * (lo + hi)]))
    cdf = ndtr((cuts[:, None] - pts[None, :]) / sigma) @ w
    return float(np.abs(np.diff(cdf)).sum() / c.size)


def test_smooth_oracle_by_hand():
    # One item at 0.5 with residual 0.5: smECE_sigma = 0.5 * P(|N(0.5, sigma^2)| in [0, 1])
    # plus its reflections, = 0.5 for small sigma; two items with opposite residuals far
    # apart add their masses.
    assert _smooth_oracle(np.array([0.5]), np.array([0.0]), 0.05) == pytest.approx(0.5, abs=1e-12)
    two = _smooth_oracle(np.array([0.2, 0.8]), np.array([0.0, 1.0]), 0.01)
    assert two == pytest.approx((0.2 + 0.2) / 2, abs=1e-12)


@pytest.mark.parametrize("sigma", [0.001, 0.002, 0.003, 0.005, 0.01, 0.05, 0.3])
def test_smooth_ece_sigma_within_stated_tolerance_of_exact(sigma):
    rng = np.random.default_rng(7)
    c = rng.uniform(0, 1, 300)
    y = (rng.uniform(size=300) < c**1.3).astype(float)
    c[:3] = [0.0, 1.0, 0.5]
    assert smooth_ece_sigma(c, y, sigma) == pytest.approx(_smooth_oracle(c, y, sigma), abs=1e-6)


def test_smooth_ece_fixed_point_within_stated_tolerance_of_exact():
    rng = np.random.default_rng(8)
    c = rng.beta(5, 1, 300)
    y = (rng.uniform(size=300) < c - 0.1).astype(float)
    value, sigma = smooth_ece(c, y, return_bandwidth=True)
    assert value == pytest.approx(sigma, abs=1e-8)
    assert value == pytest.approx(_smooth_oracle(c, y, sigma), abs=1e-6)
    # A bandwidth below 0.0029 is searched on the finer grid.
    y = (rng.uniform(size=300) < 0.5).astype(float)
    c = np.where(y == 1, 1 - rng.uniform(0, 0.004, 300), rng.uniform(0, 0.004, 300))
    value, sigma = smooth_ece(c, y, return_bandwidth=True)
    assert 0.001 < sigma < 0.0029
    assert value == pytest.approx(_smooth_oracle(c, y, sigma), abs=1e-6)


def test_a_figure_that_fails_to_save_leaves_the_previous_file(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibrated_lm.durable import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    out = save_figure(fig, tmp_path / "r.png", dpi=50)
    before = out.read_bytes()
    assert before.startswith(b"\x89PNG")

    def torn(self, fname, **kwargs):  # writes half a file, then the disk is full
        open(fname, "wb").write(b"\x89PN")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(fig), "savefig", torn)
    with pytest.raises(OSError, match="No space"):
        save_figure(fig, out, dpi=50)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]
    plt.close(fig)
