"""Reliability diagrams (DeGroot and Fienberg 1983; Niculescu-Mizil and Caruana 2005;
Guo et al. 2017 style): accuracy per confidence bin with the gap to the diagonal, over a
histogram of confidences. Several series (models) share one figure, side by side in each bin.

Each bin's accuracy carries a 95% Wilson score interval (Wilson 1927), so a bin of 3 items at
accuracy 1.0 reads as the weak evidence it is next to a bin of 161; each bar is labelled with its
item count when the bars are wide enough to hold it. :func:`plot_reliability` draws into given
axes (or a new figure) and returns the figure; :func:`reliability_diagram` draws and writes
PNG and SVG files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from calibrated_lm.calibration.binning import bin_table
from calibrated_lm.calibration.metrics import calibration_error
from calibrated_lm.calibration.validation import as_confidence, as_correct, check_bins

# Colour-blind-safe (Okabe and Ito 2008).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")


def wilson_interval(successes: ArrayLike, n: ArrayLike, z: float = 1.96) -> np.ndarray:
    """(2, m) Wilson score interval of a binomial proportion for each (successes, n), n > 0:
    centre (k + z^2/2) / (n + z^2), half-width z sqrt(k(n - k)/n + z^2/4) / (n + z^2)."""
    k = np.asarray(successes, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    centre = (k + z * z / 2) / (m + z * z)
    half = z * np.sqrt(np.maximum(k * (m - k) / m, 0.0) + z * z / 4) / (m + z * z)
    return np.stack([np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)])


def _yerr(acc: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """Error-bar lengths below and above the accuracy; rounding can put the accuracy a hair
    outside its own interval (e.g. 1.0 vs an upper bound of 0.9999999999999999)."""
    return [np.maximum(acc - lo, 0.0), np.maximum(hi - acc, 0.0)]


def _bars(ax, hx, s, n_series, color, label, table, nonempty, acc, conf, cnt, n) -> None:
    """Equal-width bins: series side by side inside each bin, accuracy bar plus gap box, the
    accuracy's Wilson interval and (when there is room) the bin's item count."""
    lower, upper = table.lower[nonempty], table.upper[nonempty]
    width = (upper - lower) / n_series
    left = lower + s * width
    ax.bar(
        left, acc, width=width, align="edge", color=color, alpha=0.85,
        edgecolor="white", linewidth=0.6, zorder=2, label=label,
    )  # fmt: skip
    # The gap box is translucent so an under-confident bin (accuracy above confidence)
    # still shows its solid accuracy bar underneath.
    import matplotlib.colors

    ax.bar(
        left, np.abs(conf - acc), bottom=np.minimum(acc, conf), width=width, align="edge",
        facecolor=(*matplotlib.colors.to_rgb(color), 0.12), edgecolor="0.2", hatch="///",
        linewidth=0.6, zorder=3,
    )  # fmt: skip
    ax.plot(left + width / 2, conf, ls="none", marker="_", ms=8, mew=1.6, color="0.15", zorder=4)
    lo, hi = wilson_interval(acc * cnt, cnt)
    ax.errorbar(left + width / 2, acc, yerr=_yerr(acc, lo, hi), fmt="none", ecolor="0.1",
                elinewidth=0.8, capsize=1.5, zorder=5)  # fmt: skip
    if n_series <= 2:  # counts fit above the bars only while the bars are wide
        for x, y, c in zip(left + width / 2, np.maximum(hi, conf), cnt):
            ax.text(x, min(y + 0.015, 0.985), f"{int(c)}", ha="center", va="bottom",
                    fontsize=6, color="0.25", rotation=90 if n_series == 2 else 0)  # fmt: skip
    hx.bar(
        left, cnt / n, width=width, align="edge", color=color, alpha=0.85,
        edgecolor="white", linewidth=0.6,
    )  # fmt: skip


def _points(ax, hx, color, label, acc, conf, cnt, c) -> None:
    """Equal-mass bins differ per series and crowd near 1, so each bin is a point at (mean
    confidence, accuracy) with a dotted gap to the diagonal; the histogram below is a
    density over 20 equal-width bins (equal-mass counts would be flat by construction)."""
    ax.plot(conf, acc, marker="o", ms=4.5, lw=1.4, color=color, zorder=3, label=label)
    lo, hi = wilson_interval(acc * cnt, cnt)
    ax.errorbar(conf, acc, yerr=_yerr(acc, lo, hi), fmt="none", ecolor=color, elinewidth=0.8,
                capsize=1.5, zorder=3)  # fmt: skip
    ax.vlines(conf, np.minimum(acc, conf), np.maximum(acc, conf), colors=color, linestyles=":",
              lw=1.2, zorder=2)  # fmt: skip
    hx.hist(c, bins=20, range=(0.0, 1.0), density=True, histtype="stepfilled", alpha=0.3,
            color=color)  # fmt: skip
    hx.hist(c, bins=20, range=(0.0, 1.0), density=True, histtype="step", lw=1.2, color=color)


def plot_reliability(
    series: Mapping[str, tuple[ArrayLike, ArrayLike]],
    *,
    ax: Any = None,
    hist_ax: Any = None,
    n_bins: int = 15,
    binning: str = "width",
    title: str | None = None,
    normalization: str | None = None,
) -> Any:
    """Draw a reliability diagram and return its matplotlib ``Figure``.

    ``series`` maps a label to (top-label confidence, correct 0/1). Top panel (``ax``): per bin,
    a solid bar up to the accuracy with its 95% Wilson interval and a hatched bar spanning the
    gap to the mean confidence, for each series side by side; the dashed diagonal is perfect
    calibration; the legend gives each series' ECE (same bins) and item count. Bottom panel
    (``hist_ax``): share of items per confidence bin. With equal-mass bins (which differ per
    series) each bin is a point at its mean confidence, over a density histogram of
    confidences. Without ``ax`` a new two-panel figure is made; with ``ax`` alone the
    histogram panel is left out. The title names n (when all series have the same) and,
    when given, the score normalisation.
    """
    if not series:
        raise ValueError("reliability_diagram needs at least one series")
    check_bins(n_bins, binning)
    data = {}
    for name, (conf, corr) in series.items():
        c = as_confidence(conf, name=f"confidence of {name!r}")
        data[name] = (c, as_correct(corr, c.shape[0], name=f"correct of {name!r}"))

    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if ax is None:
        fig, (ax, hist_ax) = plt.subplots(
            2,
            1,
            figsize=(6.4, 7.2),
            sharex=True,
            gridspec_kw={"height_ratios": [3.2, 1.0], "hspace": 0.08},
        )
    else:
        fig = ax.figure
    hx = hist_ax
    if hx is None:  # drawing into a caller's single axes: the histogram goes nowhere
        hx = _NullAxes()
    n_series = len(data)
    ax.plot([0, 1], [0, 1], ls="--", color="0.35", lw=1.2, zorder=1, label="perfect calibration")
    for s, (name, (c, y)) in enumerate(data.items()):
        color = PALETTE[s % len(PALETTE)]
        table = bin_table(c, y, n_bins=n_bins, binning=binning)
        nonempty = table.count > 0
        acc, conf, cnt = table.accuracy[nonempty], table.confidence[nonempty], table.count[nonempty]
        ece = calibration_error(c, y, n_bins=n_bins, binning=binning)
        label = f"{name}: ECE {ece:.3f} (n={c.shape[0]:,})"
        if binning == "width":
            _bars(ax, hx, s, n_series, color, label, table, nonempty, acc, conf, cnt, c.shape[0])
        else:
            _points(ax, hx, color, label, acc, conf, cnt, c)
    handles, labels = ax.get_legend_handles_labels()
    interval = Line2D(
        [], [], color="0.1", lw=0.8, marker="_", ms=4, label="accuracy, 95% Wilson interval"
    )
    if binning == "width":
        handles += [
            Patch(facecolor="none", edgecolor="0.3", hatch="///", label="gap to mean confidence"),
            Line2D(
                [], [], ls="none", marker="_", ms=8, mew=1.6, color="0.15", label="mean confidence"
            ),
            interval,
        ]
    else:
        handles += [Line2D([], [], ls=":", color="0.3", label="gap to the diagonal"), interval]
    # Outside the axes, on the right: inside, it covered the low-confidence bars and their
    # counts; the figure is saved with a tight bounding box, which takes it in.
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8.5, frameon=False
    )
    ax.set_xlim(0, 1)
    # Headroom above 1 for the bin counts written over the tallest bars.
    ax.set_ylim(0, 1.1)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.25, lw=0.6)
    bins_text = "equal-width" if binning == "width" else "equal-mass"
    sizes = {v[0].shape[0] for v in data.values()}
    facts = [f"n={sizes.pop():,}"] if len(sizes) == 1 else []
    if normalization is not None:
        facts.append(f"scores: {NORM_TEXT.get(normalization, normalization)}")
    ax.set_title((title or "Reliability diagram") + (f" ({', '.join(facts)})" if facts else ""),
                 fontsize=11)  # fmt: skip
    xlabel = f"confidence (top-label probability; {n_bins} {bins_text} bins)"
    if hist_ax is not None:
        hist_ax.set_xlabel(xlabel)
        hist_ax.set_ylabel("share of items" if binning == "width" else "density")
        hist_ax.grid(alpha=0.25, lw=0.6)
        hist_ax.spines[["top", "right"]].set_visible(False)
    else:
        ax.set_xlabel(xlabel)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


class _NullAxes:
    """Stands in for the histogram panel when the caller gave only the main axes."""

    def bar(self, *args: Any, **kwargs: Any) -> None:
        return None

    def hist(self, *args: Any, **kwargs: Any) -> None:
        return None


NORM_TEXT = {
    "none": "summed log-likelihood",
    "chars": "per character",
    "tokens": "per token",
}


def reliability_diagram(
    series: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path_stem: str | Path,
    *,
    n_bins: int = 15,
    binning: str = "width",
    title: str | None = None,
    normalization: str | None = None,
) -> list[Path]:
    """Draw :func:`plot_reliability` and write ``path_stem.png`` and ``path_stem.svg``;
    return both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_reliability(
        series, n_bins=n_bins, binning=binning, title=title, normalization=normalization
    )
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    from calibrated_lm.durable import save_figure

    save_figure(fig, paths[0], dpi=150, bbox_inches="tight")
    # Text stays text in the SVG (searchable, editable) instead of outlines.
    with plt.rc_context({"svg.fonttype": "none"}):
        save_figure(fig, paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths
