"""Reliability diagrams (DeGroot and Fienberg 1983; Niculescu-Mizil and Caruana 2005;
Guo et al. 2017 style): accuracy per confidence bin with the gap to the diagonal, over a
histogram of confidences. Several series (models) share one figure, side by side in each bin.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from calibrated_lm.calibration.binning import bin_indices, bin_table
from calibrated_lm.calibration.metrics import calibration_error
from calibrated_lm.calibration.validation import as_confidence, as_correct, check_bins

# Colour-blind-safe (Okabe and Ito 2008).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")


def _edges(confidence: np.ndarray, n_bins: int, binning: str) -> np.ndarray:
    """Bin boundaries to draw: fixed for equal width, midpoints between groups for equal mass."""
    if binning == "width":
        return np.linspace(0.0, 1.0, n_bins + 1)
    idx = bin_indices(confidence, n_bins, binning)
    lo = np.full(n_bins, np.nan)
    hi = np.full(n_bins, np.nan)
    np.fmin.at(lo, idx, confidence)
    np.fmax.at(hi, idx, confidence)
    keep = ~np.isnan(lo)
    lo, hi = lo[keep], hi[keep]
    inner = 0.5 * (hi[:-1] + lo[1:])
    return np.concatenate([[0.0], inner, [1.0]])


def reliability_diagram(
    series: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path_stem: str | Path,
    *,
    n_bins: int = 15,
    binning: str = "width",
    title: str | None = None,
) -> list[Path]:
    """Write ``path_stem.png`` and ``path_stem.svg``; return both paths.

    ``series`` maps a label to (top-label confidence, correct 0/1). Top panel: per bin, a solid
    bar up to the accuracy and a hatched bar spanning the gap to the mean confidence, for each
    series side by side; the dashed diagonal is perfect calibration; the legend gives each
    series' ECE (same bins) and item count. Bottom panel: share of items per confidence bin.
    """
    if not series:
        raise ValueError("reliability_diagram needs at least one series")
    check_bins(n_bins, binning)
    data = {}
    for name, (conf, corr) in series.items():
        c = as_confidence(conf, name=f"confidence of {name!r}")
        data[name] = (c, as_correct(corr, c.shape[0], name=f"correct of {name!r}"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(
        2,
        1,
        figsize=(6.4, 7.2),
        sharex=True,
        gridspec_kw={"height_ratios": [3.2, 1.0], "hspace": 0.08},
    )
    n_series = len(data)
    ax.plot([0, 1], [0, 1], ls="--", color="0.35", lw=1.2, zorder=1, label="perfect calibration")
    for s, (name, (c, y)) in enumerate(data.items()):
        color = PALETTE[s % len(PALETTE)]
        table = bin_table(c, y, n_bins=n_bins, binning=binning)
        edges = _edges(c, n_bins, binning)
        nonempty = table.count > 0
        lower, upper = edges[:-1], edges[1:]
        if binning == "width":
            lower, upper = lower[nonempty], upper[nonempty]
        # (equal-mass edges are already one interval per non-empty group)
        acc, conf, cnt = table.accuracy[nonempty], table.confidence[nonempty], table.count[nonempty]
        width = (upper - lower) / n_series
        left = lower + s * width
        ece = calibration_error(c, y, n_bins=n_bins, binning=binning)
        label = f"{name}: ECE {ece:.3f} (n={c.shape[0]:,})"
        ax.bar(
            left, acc, width=width, align="edge", color=color, alpha=0.85,
            edgecolor="white", linewidth=0.6, zorder=2, label=label,
        )  # fmt: skip
        gap_bottom = np.minimum(acc, conf)
        # The gap box is translucent so an under-confident bin (accuracy above confidence)
        # still shows its solid accuracy bar underneath.
        ax.bar(
            left, np.abs(conf - acc), bottom=gap_bottom, width=width, align="edge",
            facecolor=(*matplotlib.colors.to_rgb(color), 0.12), edgecolor="0.2", hatch="///",
            linewidth=0.6, zorder=3,
        )  # fmt: skip
        ax.plot(
            left + width / 2, conf, ls="none", marker="_", ms=8, mew=1.6, color="0.15", zorder=4
        )
        hx.bar(
            left, cnt / c.shape[0], width=width, align="edge", color=color, alpha=0.85,
            edgecolor="white", linewidth=0.6,
        )  # fmt: skip
    # One legend entry explains the hatched gap and the confidence tick for every series.
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Patch(facecolor="none", edgecolor="0.3", hatch="///", label="gap to mean confidence"),
        Line2D([], [], ls="none", marker="_", ms=8, mew=1.6, color="0.15", label="mean confidence"),
    ]
    ax.legend(handles=handles, loc="upper left", fontsize=8.5, frameon=True, framealpha=0.92)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_aspect("auto")
    ax.grid(alpha=0.25, lw=0.6)
    bins_text = "equal-width" if binning == "width" else "equal-mass"
    ax.set_title(title or "Reliability diagram", fontsize=11.5)
    hx.set_xlabel(f"confidence (top-label probability; {n_bins} {bins_text} bins)")
    hx.set_ylabel("share of items")
    hx.grid(alpha=0.25, lw=0.6)
    for a in (ax, hx):
        a.spines[["top", "right"]].set_visible(False)
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    # Text stays text in the SVG (searchable, editable) instead of outlines.
    with plt.rc_context({"svg.fonttype": "none"}):
        fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths
