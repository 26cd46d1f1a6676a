"""Report of issue 12's claim-2 test (``sft_calibration.py run --profile claim2``).

Against the criterion pre-registered in ``docs/issue12_plan.md``: for each eps > 0, the change
relative to eps 0 trained with the same seed, in the trained format with per-token scores,
averaged over seeds (two-level paired bootstrap: seeds, then questions) and over the five
primary tasks (draw by draw). ECE is the primary metric; RMS-CE, accuracy and mean confidence
are reported beside it, per task and as the primary-task mean, plus the secondary tasks. An
eps with fewer than the planned seeds, or a missing task, is named and gets no verdict.

Writes ``--results``/``results.json`` and ``tables.md``, and the ``claim2`` records of
``experiments/results/claims.json``. Two figures beside them:

* ``claim2_changes.png``: per eps, the primary-mean ECE and accuracy change against eps 0 with
  their 95% intervals (the accuracy panel marks the -0.01 non-inferiority margin), each
  primary task's ECE change as a dot;
* ``reliability_primary.png``: eps 0 and each eps > 0 overlaid, the five primary tasks and the
  eps's seeds pooled (trained format, per-token scores): where the confidence moved.

    python experiments/claim2_report.py [--work runs/claim2]
        [--results experiments/results/sft_claim2] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims as C  # noqa: E402
from common import read_json  # noqa: E402
from control_report import (  # noqa: E402
    PRIMARY,
    SECONDARY,
    _records,
    heldout_pair,
    probabilities,
    save_evidence,
)
from restore_units import RESTORED  # noqa: E402
from sft_calibration import CLAIM2_EPS, CLAIM2_SEEDS, SFTRun  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORMAT, NORM = "trained", "tokens"
METRICS = ("ece", "rms_ce", "accuracy", "mean_confidence")
NONINFERIORITY = 0.01  # accuracy: one point
NEGLIGIBLE_ECE = 0.005  # an ECE reduction smaller than this is not the claimed benefit


def _run_name(eps: float, seed: int) -> str:
    return SFTRun(eps, seed, lr=8e-5, epochs=3).name(8e-5)


def _eval_dir(work: Path, eps: float, seed: int) -> Path:
    return work / "evals" / f"{_run_name(eps, seed)}__{FORMAT}"


def heldout_changes(
    work: Path,
    eps: float,
    seeds: tuple[int, ...],
    draws: int,
    earlier: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per seed: held-out token gap / NLL / accuracy of eps minus eps 0 (paired over held-out
    examples). A run without its per-example held-out file (trained before the training
    records were committed; the control's eps-0 seed-1 run also counted one more token per
    example) is named, not used, unless ``earlier`` (this eps's entry of the results.json an
    earlier report wrote) holds the pair computed while both files were there: that pair is
    kept as it was, marked ``from_earlier_report``."""
    out: dict[str, Any] = {}
    before = (earlier or {}).get("heldout", {})
    for s in seeds:
        a = work / "runs" / _run_name(0.0, s) / "heldout.json"
        b = work / "runs" / _run_name(eps, s) / "heldout.json"
        if not (a.exists() and b.exists()):
            kept = before.get(str(s), {})
            if "token_gap" in kept:
                out[str(s)] = {**kept, "from_earlier_report": True}
                continue
            if not a.exists() and not b.exists():
                restored = (b.parent / RESTORED).exists()
                why = "neither held-out file was kept" if restored else "not trained"
            elif not a.exists():
                why = "the eps 0 run's held-out file was not kept"
            else:
                why = "its held-out file was not kept"
            out[str(s)] = {"missing": why}
            continue
        out[str(s)] = heldout_pair(read_json(a), read_json(b), draws)
    return out


def verdict(ece: dict[str, Any], acc: dict[str, Any]) -> str:
    """The pre-registered verdict from the primary-mean ECE and accuracy changes."""
    e_lo, e_hi = ece["ci95"]
    a_lo, a_hi = acc["ci95"]
    if e_hi < 0 and a_lo > -NONINFERIORITY:
        return "reproduced"
    if e_lo > -NEGLIGIBLE_ECE or a_hi < -NONINFERIORITY:
        return "not reproduced"
    return "inconclusive"


def verdict_reason(ece: dict[str, Any], acc: dict[str, Any]) -> str:
    """Why :func:`verdict` says what it says, in the pre-registered terms."""
    e_lo, e_hi = ece["ci95"]
    a_lo, a_hi = acc["ci95"]
    ece_txt = f"ECE change [{e_lo:+.3f}, {e_hi:+.3f}]"
    acc_txt = f"accuracy change [{a_lo:+.3f}, {a_hi:+.3f}]"
    margin = f"{-NONINFERIORITY:+.2f}"
    v = verdict(ece, acc)
    if v == "reproduced":
        return f"{ece_txt} below 0; {acc_txt} above the {margin} margin"
    if v == "not reproduced":
        if a_hi < -NONINFERIORITY:
            return f"{acc_txt} wholly below the {margin} margin (accuracy inferior)"
        return f"{ece_txt} above {-NEGLIGIBLE_ECE:+.3f} (no reduction worth the name)"
    parts = []
    if e_hi >= 0:
        parts.append(f"{ece_txt} reaches 0")
    if a_lo <= -NONINFERIORITY:
        parts.append(f"{acc_txt} crosses the {margin} margin")
    return "; ".join(parts)


def write_report(
    work: Path,
    results: Path,
    *,
    bootstrap: int = 1000,
    seeds: tuple[int, ...] = CLAIM2_SEEDS,
    claims_path: Path = C.CLAIMS,
) -> dict[str, Any]:
    from calibrated_lm.calibration.paired import two_level_bootstrap

    # Units restored from the control (restore_units.py) are committed there already.
    save_evidence(work, results, skip=RESTORED)
    recs = {
        (e, s): _records(_eval_dir(work, e, s) / "samples.jsonl")
        for e in CLAIM2_EPS
        for s in seeds
        if (_eval_dir(work, e, s) / "done.json").exists()
    }
    # Held-out pairs whose files are gone (see heldout_changes) survive from the last report.
    last = results / "results.json"
    earlier = read_json(last).get("eps", {}) if last.exists() else {}
    out: dict[str, Any] = {"criterion": "docs/issue12_plan.md (pre-registered)", "eps": {}}
    records: list[dict[str, Any]] = []
    for eps in CLAIM2_EPS[1:]:
        have = [s for s in seeds if (eps, s) in recs and (0.0, s) in recs]
        entry: dict[str, Any] = {"seeds": have, "missing": [], "tasks": {}, "verdict": None}
        entry["heldout"] = heldout_changes(
            work, eps, tuple(have), bootstrap, earlier.get(f"{eps:g}")
        )
        entry["missing"] += [f"seed {s}" for s in seeds if s not in have]
        if not have:
            out["eps"][f"{eps:g}"] = entry
            continue
        draws: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
        for task in PRIMARY + SECONDARY:
            if any(task not in recs[(e, s)] for s in have for e in (0.0, eps)):
                entry["missing"].append(f"task {task}")
                continue
            keys = sorted(
                set.intersection(*(set(recs[(e, s)][task]) for s in have for e in (0.0, eps)))
            )
            pa = [probabilities([recs[(0.0, s)][task][k] for k in keys], NORM)[0] for s in have]
            pb = [probabilities([recs[(eps, s)][task][k] for k in keys], NORM)[0] for s in have]
            y = probabilities([recs[(0.0, have[0])][task][k] for k in keys], NORM)[1]
            res = two_level_bootstrap(pa, pb, y, draws=bootstrap, seed=0, return_draws=True)
            entry["tasks"][task] = {
                m: {k: v for k, v in res[m].items() if k != "draws"} for m in METRICS
            }
            entry["tasks"][task]["n"] = len(keys)
            if task in PRIMARY:
                for m in METRICS:
                    draws[m].append(res[m]["draws"])
        primary = [t for t in PRIMARY if t in entry["tasks"]]
        if primary:
            mean: dict[str, Any] = {}
            from calibrated_lm.calibration import percentile_interval

            for m in METRICS:
                a = float(np.mean([entry["tasks"][t][m]["a"] for t in primary]))
                b = float(np.mean([entry["tasks"][t][m]["b"] for t in primary]))
                d = np.mean(np.stack(draws[m]), axis=0)
                mean[m] = {"a": a, "b": b, "delta": b - a, "ci95": percentile_interval(d)}
            entry["primary_mean"] = mean
        complete = len(have) == len(seeds) and not any(
            x.startswith("task") for x in entry["missing"]
        )
        pm = entry.get("primary_mean", {})
        entry["verdict"] = verdict(pm["ece"], pm["accuracy"]) if complete else None
        entry["verdict_reason"] = verdict_reason(pm["ece"], pm["accuracy"]) if complete else None
        setting = f"eps {eps:g} vs eps 0 (lr 8e-5, 3 ep; seeds {','.join(map(str, have))})"
        if "primary_mean" in entry:
            for m in ("ece", "rms_ce", "accuracy"):
                r = entry["primary_mean"][m]
                v = entry["verdict"] if m == "ece" and entry["verdict"] else None
                records.append(
                    C.record(
                        "2",
                        setting,
                        "primary mean",
                        m,
                        r["a"],
                        r["b"],
                        r["ci95"],
                        verdict=v
                        or (
                            "incomplete: " + ", ".join(entry["missing"])
                            if entry["missing"]
                            else None
                        ),
                        headline=m in ("ece", "accuracy"),
                    )  # fmt: skip
                )
        for task, t in entry["tasks"].items():
            r = t["ece"]
            records.append(C.record("2", setting, task, "ece", r["a"], r["b"], r["ci95"]))
        out["eps"][f"{eps:g}"] = entry
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    (results / "tables.md").write_text(_tables(out), encoding="utf-8")
    if records:
        C.update(records, source="claim2", path=claims_path)
    _figures(out, recs, results)  # after the records: a figure cannot cost the tables
    return out


def _figures(
    out: dict[str, Any], recs: dict[tuple[float, int], dict[str, dict]], results: Path
) -> None:
    """claim2_changes.png and reliability_primary.png (module docstring); none without data."""
    from calibrated_lm import durable
    from calibrated_lm.calibration import reliability_diagram

    done = [(float(e), v) for e, v in out["eps"].items() if "primary_mean" in v]
    if not done:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, m, name in ((axes[0], "ece", "ECE"), (axes[1], "accuracy", "accuracy")):
        for i, (_eps, v) in enumerate(done):
            r = v["primary_mean"][m]
            lo, hi = r["ci95"]
            # Clipped at 0: a percentile interval need not contain the point estimate.
            err = [[max(r["delta"] - lo, 0.0)], [max(hi - r["delta"], 0.0)]]
            ax.errorbar([i], [r["delta"]], yerr=err,
                        fmt="o", color="C0", capsize=4,
                        label="primary mean, 95% CI" if i == 0 else None)  # fmt: skip
            if m == "ece":
                per = [t["ece"]["delta"] for k, t in v["tasks"].items() if k in PRIMARY]
                ax.plot([i + 0.15] * len(per), per, ".", color="0.55",
                        label="each primary task" if i == 0 else None)  # fmt: skip
        ax.axhline(0, color="0.3", lw=0.8)
        if m == "accuracy":
            ax.axhline(-NONINFERIORITY, color="C3", ls="--", lw=0.9, label="margin -0.01")
        ax.set_xticks(range(len(done)), [f"eps {e:g}\nseeds {len(v['seeds'])}" for e, v in done])
        ax.set_ylabel(f"{name}: eps - eps 0")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Claim 2: label smoothing vs eps 0 at the control's setting (gemma-3-270m)")
    fig.tight_layout()
    durable.save_figure(fig, results / "claim2_changes.png", dpi=130)
    plt.close(fig)

    def pooled(eps: float, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        conf, corr = [], []
        for s in seeds:
            for task in PRIMARY:
                rows = recs.get((eps, s), {}).get(task)
                if not rows:
                    continue
                p, y = probabilities(list(rows.values()), NORM)
                conf.append(p.max(1))
                corr.append((p.argmax(1) == y) * 1.0)
        return np.concatenate(conf), np.concatenate(corr)

    zero_seeds = sorted({s for (e, s) in recs if e == 0.0})
    series = {f"eps 0 ({len(zero_seeds)} seeds)": pooled(0.0, zero_seeds)}
    for eps, v in done:
        series[f"eps {eps:g} ({len(v['seeds'])} seeds)"] = pooled(eps, v["seeds"])
    reliability_diagram(
        series,
        results / "reliability_primary",
        title="five primary tasks pooled, trained format, per-token scores",
    )
    for svg in results.glob("reliability_primary*.svg"):
        svg.unlink()  # the PNG is what the docs show


def _tables(out: dict[str, Any]) -> str:
    lines = [
        "# Claim 2: label smoothing at the control's over-confident setting",
        "",
        "Generated by `experiments/claim2_report.py`; pre-registered in `docs/issue12_plan.md`. "
        "eps - eps 0 (same seed), trained format, per-token scores; two-level bootstrap 95% "
        "intervals.",
        "",
        "conf - acc: the eps model's mean confidence minus its accuracy (> 0: over-confident).",
        "",
        "| eps | seeds | task | ECE eps 0 | ECE eps | d ECE [95% CI] | d acc [95% CI] | "
        "conf - acc, eps 0 | conf - acc, eps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for eps, e in out["eps"].items():
        rows = ([("primary mean", e["primary_mean"])] if "primary_mean" in e else []) + list(
            e["tasks"].items()
        )
        for task, t in rows:
            ece, acc = t["ece"], t["accuracy"]
            lines.append(
                f"| {eps} | {','.join(map(str, e['seeds']))} | {task} | {ece['a']:.3f} | "
                f"{ece['b']:.3f} | {ece['delta']:+.3f} [{ece['ci95'][0]:+.3f}, "
                f"{ece['ci95'][1]:+.3f}] | {acc['delta']:+.3f} [{acc['ci95'][0]:+.3f}, "
                f"{acc['ci95'][1]:+.3f}] | "
                f"{t['mean_confidence']['a'] - acc['a']:+.3f} | "
                f"{t['mean_confidence']['b'] - acc['b']:+.3f} |"
            )
    lines += [
        "",
        "## Held-out SFT tokens: eps minus eps 0, same seed (paired over held-out examples)",
        "",
        "| eps | seed | token gap eps 0 | token gap eps | d gap [95% CI] | d token NLL [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for eps, e in out["eps"].items():
        for seed, h in e.get("heldout", {}).items():
            if "missing" in h:
                lines.append(f"| {eps} | {seed} | - | - | ({h['missing']}) | - |")
                continue
            g, n = h["token_gap"], h["token_nll"]
            mark = " (a)" if h.get("from_earlier_report") else ""
            lines.append(
                f"| {eps} | {seed}{mark} | {g['a']:+.3f} | {g['b']:+.3f} | {g['delta']:+.3f} "
                f"[{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] | {n['delta']:+.3f} "
                f"[{n['ci95'][0]:+.3f}, {n['ci95'][1]:+.3f}] |"
            )
    if any(
        h.get("from_earlier_report") for e in out["eps"].values() for h in e["heldout"].values()
    ):
        lines += [
            "",
            "(a) kept from an earlier report of this script: the runs' held-out files were not "
            "committed (the repository's `runs/` ignore rule also matched `records/runs/`, fixed "
            "in session 12), so this pair cannot be recomputed from the committed files.",
        ]
    lines += ["", "## Verdicts", ""]
    for eps, e in out["eps"].items():
        if e["verdict"]:
            why = f" ({e['verdict_reason']})" if e.get("verdict_reason") else ""
            lines.append(f"- eps {eps}: **{e['verdict']}**{why}")
        else:
            lines.append(f"- eps {eps}: no verdict; missing: {', '.join(e['missing'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "claim2")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments/results/sft_claim2")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    write_report(args.work, args.results, bootstrap=args.bootstrap)
    print((args.results / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
