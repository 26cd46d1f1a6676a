"""Histograms of a capacity report: achievable margins and confidence ceilings per token."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibrated_lm.analysis.capacity import CapacityReport
from calibrated_lm.analysis.theory import ls_target_gap, ls_target_prob


def plot_capacity(report: CapacityReport, path_stem: Path, title: str = "") -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg``; returns the paths.

    Left: certified achievable uniform margin ``gamma_y`` (lower and upper bound) per sampled
    token, with the LS target gaps ``G_eps`` as vertical lines. Right: ``1 - P_y`` (how far the
    confidence ceiling stays below 1, log scale) against ``eps - eps/V`` for each eps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    hi = max(
        float(np.max(report.gap_upper)), max(ls_target_gap(e, report.vocab) for e in report.eps)
    )
    bins = np.linspace(0, hi * 1.05 + 1e-9, 40)
    ax1.hist(report.gap_lower, bins=bins, alpha=0.6, label="achieved margin (lower bound)")
    ax1.hist(report.gap_upper, bins=bins, histtype="step", lw=1.5, label="certified upper bound")
    colors = plt.cm.autumn(np.linspace(0, 0.7, len(report.eps)))
    for e, col in zip(report.eps, colors):
        ax1.axvline(ls_target_gap(e, report.vocab), color=col, ls="--", label=f"LS gap eps={e:g}")
    ax1.set_xlabel("max over h of min_j (z_y - z_j)  [nats]")
    ax1.set_ylabel("sampled tokens")
    ax1.set_title("uniform margin the head can give each token")
    ax1.legend(fontsize=7)
    logs = report.log_one_minus_ceiling / np.log(10)
    lo = min(float(logs.min()), -1.0)
    ax2.hist(logs, bins=np.linspace(lo - 0.5, 0.0, 40), alpha=0.7, label="1 - ceiling")
    for e, col in zip(report.eps, colors):
        ax2.axvline(
            np.log10(1 - ls_target_prob(e, report.vocab)),
            color=col,
            ls="--",
            label=f"1 - LS target, eps={e:g}",
        )
    ax2.set_xlabel("log10(1 - max_h p_y(h))")
    ax2.set_title("confidence ceiling per token (left of a line: reaches it)")
    ax2.legend(fontsize=7)
    fig.suptitle(title or f"V={report.vocab}, D={report.dim}, V/D={report.vocab / report.dim:.0f}")
    fig.tight_layout()
    from calibrated_lm.durable import save_figure

    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        out = path_stem.with_suffix(f".{ext}")
        save_figure(fig, out, dpi=120)
        paths.append(out)
    plt.close(fig)
    return paths
