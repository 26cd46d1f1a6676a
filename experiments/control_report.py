"""Report of issue 12's positive control (``sft_calibration.py run --profile control``).

Reads a control work folder (run here, or unpacked from device bundles) and, against the
criterion pre-registered in ``docs/issue12_plan.md``, writes into ``--results``:

* ``results.json``: per dose, format, task and normalisation, the base's and the dose's
  accuracy, ECE, RMS-CE, Brier, NLL and mean confidence with the paired bootstrap difference
  (dose - base, questions resampled); the held-out token statistics with a paired bootstrap
  over held-out examples; and the criterion's outcome per dose;
* ``tables.md``: the same as tables, and the verdicts;
* ``reliability_<task>.png``: base and every dose overlaid (trained format, per-token scores);
* ``training_curves.png``: loss and token confidence/accuracy per step;
* ``samples/<eval>.jsonl.gz``: every evaluated model's per-question choice scores (slim
  records with token counts), so every number here can be recomputed;
* ``records/``: each run's and evaluation's done marker, command, summary, training log and
  per-example held-out statistics;
* the ``control`` records of ``experiments/results/claims.json``.

    python experiments/control_report.py [--work runs/control]
        [--results experiments/results/sft_control] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims as C  # noqa: E402
from common import COMMIT_FIELDS, read_json, slim_samples  # noqa: E402

from calibrated_lm.evaluation.report import record_probabilities as probabilities  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRIMARY = ("arc_easy", "arc_challenge", "piqa", "sciq", "openbookqa")
SECONDARY = ("mmlu", "hellaswag")
NORMS = ("tokens", "none", "chars")
PRIMARY_NORM, PRIMARY_FORMAT = "tokens", "trained"
METRICS = ("accuracy", "ece", "rms_ce", "brier", "nll", "mean_confidence")


def _records(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """task -> id -> record, from a samples journal."""
    from calibrated_lm.evaluation.samples_file import read_records

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in read_records(path, repair=False):
        out.setdefault(r.task, {})[str(r.id)] = r
    return out


def doses(work: Path) -> list[dict[str, Any]]:
    """Finished SFT runs (train done), in the profile's order."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sft_calibration import PROFILES

    out = []
    for run in PROFILES["control"].runs:
        name = run.name(run.lr)
        done = work / "runs" / name / "done.json"
        if done.exists():
            info = read_json(done)
            out.append({"name": name, "lr": run.lr, "epochs": run.epochs, "info": info})
    return out


def label(d: dict[str, Any]) -> str:
    return f"lr {d['lr']:g}, {d['epochs']:g} ep"


def heldout_pair(base: dict, sft: dict, draws: int, seed: int = 0) -> dict[str, dict]:
    """Paired bootstrap over held-out examples of the token gap (sum conf - sum acc) / sum n,
    token NLL and accuracy: dose - base."""
    from calibrated_lm.calibration import bootstrap_indices, percentile_interval

    a, b = base["per_example"], sft["per_example"]
    if len(a["n"]) != len(b["n"]):
        raise ValueError("held-out statistics cover different example counts")
    arr = {k: (np.asarray(a[k], float), np.asarray(b[k], float)) for k in a}
    idx = bootstrap_indices(len(a["n"]), draws, seed)

    def stat(side: int, rows) -> dict[str, np.ndarray]:
        n = arr["n"][side][rows].sum(-1)
        return {
            "token_gap": (
                arr["confidence"][side][rows].sum(-1) - arr["accuracy"][side][rows].sum(-1)
            )
            / n,
            "token_nll": arr["nll"][side][rows].sum(-1) / n,
            "token_accuracy": arr["accuracy"][side][rows].sum(-1) / n,
            "token_confidence": arr["confidence"][side][rows].sum(-1) / n,
        }

    full = np.arange(len(a["n"]))
    pa, pb = stat(0, full), stat(1, full)
    da, db = stat(0, idx), stat(1, idx)
    return {
        k: {
            "a": float(pa[k]),
            "b": float(pb[k]),
            "delta": float(pb[k] - pa[k]),
            "ci95": percentile_interval(db[k] - da[k]),
        }
        for k in pa
    }


def write_report(
    work: Path, results: Path, *, bootstrap: int = 1000, claims_path: Path = C.CLAIMS
) -> dict[str, Any]:
    from calibrated_lm.calibration import reliability_diagram
    from calibrated_lm.calibration.paired import paired_bootstrap

    results.mkdir(parents=True, exist_ok=True)
    evals = sorted(p for p in (work / "evals").glob("*") if (p / "done.json").exists())
    if not any(p.name.startswith("base__") for p in evals):
        raise SystemExit(f"error: {work} has no finished base evaluation")
    save_evidence(work, results)  # the per-question evidence of every evaluated model
    base_held = read_json(work / "heldout_base" / "heldout.json")
    out: dict[str, Any] = {
        "criterion": "docs/issue12_plan.md (pre-registered)",
        "primary": {"format": PRIMARY_FORMAT, "normalization": PRIMARY_NORM},
        "doses": [],
        "missing": [],
    }
    records: list[dict[str, Any]] = []
    base_recs = {fmt: _records(work / "evals" / f"base__{fmt}" / "samples.jsonl")
                 for fmt in ("trained", "plain") if (work / "evals" / f"base__{fmt}" / "done.json").exists()}  # fmt: skip
    series: dict[str, dict[str, tuple]] = {}
    for d in doses(work):
        entry: dict[str, Any] = {"name": d["name"], "lr": d["lr"], "epochs": d["epochs"]}
        entry["train"] = {k: d["info"].get(k) for k in ("steps", "train_s", "unit_s")}
        held = read_json(work / "runs" / d["name"] / "heldout.json")
        entry["heldout"] = heldout_pair(base_held, held, bootstrap)
        # Records of the SFT side count one more token per example (the newline after EOS,
        # tokenized through the saved template): see docs/results.md.
        entry["heldout"]["note"] = "SFT side includes the newline after EOS (+1 token/example)"
        for k in ("token_gap", "token_nll"):
            h = entry["heldout"][k]
            records.append(
                C.record(
                    "control",
                    f"SFT {label(d)} vs base",
                    "held-out SFT tokens",
                    k,
                    h["a"],
                    h["b"],
                    h["ci95"],
                    headline=k == "token_gap",
                )  # fmt: skip
            )
        entry["tasks"] = {}
        for fmt, brecs in base_recs.items():
            folder = work / "evals" / f"{d['name']}__{fmt}"
            if not (folder / "done.json").exists():
                out["missing"].append(f"{d['name']}: {fmt} format not evaluated")
                continue
            srecs = _records(folder / "samples.jsonl")
            for task in PRIMARY + SECONDARY:
                if task not in brecs or task not in srecs:
                    continue
                keys = sorted(set(brecs[task]) & set(srecs[task]))
                ra = [brecs[task][k] for k in keys]
                rb = [srecs[task][k] for k in keys]
                for norm in NORMS:
                    pa, y = probabilities(ra, norm)
                    pb, _ = probabilities(rb, norm)
                    res = paired_bootstrap(pa, pb, y, draws=bootstrap, seed=0)
                    res["n"] = len(keys)
                    entry["tasks"][f"{fmt}/{task}/{norm}"] = res
                    if fmt == PRIMARY_FORMAT and norm == PRIMARY_NORM:
                        for m in ("ece", "accuracy", "mean_confidence"):
                            records.append(
                                C.record(
                                    "control",
                                    f"SFT {label(d)} vs base",
                                    task,
                                    m,
                                    res[m]["a"],
                                    res[m]["b"],
                                    res[m]["ci95"],
                                    format=fmt,
                                    normalization=norm,
                                    n=len(keys),
                                    headline=m == "ece" and task in PRIMARY,
                                )  # fmt: skip
                            )
                        if task in PRIMARY:
                            series.setdefault(task, {})
                            if "base" not in series[task]:
                                series[task]["base"] = (pa.max(1), (pa.argmax(1) == y) * 1.0)
                            series[task][label(d)] = (pb.max(1), (pb.argmax(1) == y) * 1.0)
        entry["criterion"] = _criterion(entry)
        out["doses"].append(entry)
    out["selected_for_claim2"] = _select(out["doses"])
    # The README shows the held-out gap of every dose and the primary-task ECE of the setting
    # selected for claim 2 (all records stay in claims.json).
    chosen = out["selected_for_claim2"]
    for r in records:
        if r["metric"] == "ece":
            r["headline"] = (
                bool(chosen)
                and r["setting"] == (f"SFT lr {chosen['lr']:g}, {chosen['epochs']:g} ep vs base")
                and r["task"] in PRIMARY
            )
    for task, s in series.items():
        reliability_diagram(
            s,
            results / f"reliability_{task}",
            title=f"{task}: gemma-3-270m base vs eps-0 SFT doses (trained format, per-token)",
        )
    for svg in results.glob("*.svg"):
        svg.unlink()  # the PNGs are what the docs show; SVGs of every task add megabytes
    _curves(work, out["doses"], results / "training_curves.png")
    (results / "results.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    (results / "tables.md").write_text(_tables(out), encoding="utf-8")
    C.update(records, source="control", path=claims_path)
    return out


# The small records behind the tables (timings, commands, held-out statistics per example,
# training logs), copied so that every number of the write-up has a committed source.
_RECORD_FILES = {
    "runs": ("done.json", "heldout.json", "metrics.jsonl", "command.txt"),
    "evals": ("done.json", "run.json", "summary.json", "command.txt"),
    "heldout_base": ("done.json", "heldout.json"),
}


def _copy_records(work: Path, results: Path, skip: str | None = None) -> None:
    """Copy the unit records of ``work`` into ``results/records`` (folders holding a file
    named ``skip`` left out, and unfinished units: a run the machine's return cut short
    is no evidence, and its partial log would pass for a finished run's)."""
    import shutil

    for kind, names in _RECORD_FILES.items():
        folders = [work / kind] if kind == "heldout_base" else sorted((work / kind).glob("*"))
        for folder in folders:
            if (skip and (folder / skip).exists()) or not (folder / "done.json").exists():
                continue
            for name in names:
                src = folder / name
                if src.is_file():
                    rel = src.relative_to(work)
                    (results / "records" / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, results / "records" / rel)


def save_evidence(work: Path, results: Path, skip: str | None = None) -> None:
    """Commit-sized evidence of ``work`` into ``results``: each finished evaluation's
    per-question scores as ``samples/<unit>.jsonl.gz`` (the committed fields only) and the
    unit records (:func:`_copy_records`). The work folder itself is not kept (a device machine
    keeps nothing, and ``runs/`` is not committed), and the next session's staging restores
    its finished units from these files. Folders holding a file named ``skip`` (units
    restored from another results folder, committed there) are left out."""
    (results / "samples").mkdir(parents=True, exist_ok=True)
    for p in sorted((work / "evals").glob("*")):
        if (p / "done.json").exists() and not (skip and (p / skip).exists()):
            (results / "samples" / f"{p.name}.jsonl.gz").write_bytes(
                gzip.compress(slim_samples(p / "samples.jsonl", COMMIT_FIELDS), mtime=0)
            )
    _copy_records(work, results, skip=skip)


def _criterion(entry: dict[str, Any]) -> dict[str, Any]:
    """The pre-registered test: held-out gap up beyond its CI, and ECE up beyond its CI on
    the over-confident side on >= 2 primary tasks (trained format, per-token)."""
    gap = entry["heldout"]["token_gap"]
    part1 = gap["ci95"][0] > 0
    tasks_up = []
    for task in PRIMARY:
        r = entry["tasks"].get(f"{PRIMARY_FORMAT}/{task}/{PRIMARY_NORM}")
        if r is None:
            continue
        over = r["mean_confidence"]["b"] > r["accuracy"]["b"]
        if r["ece"]["ci95"][0] > 0 and over:
            tasks_up.append(task)
    evaluated = sum(f"{PRIMARY_FORMAT}/{t}/{PRIMARY_NORM}" in entry["tasks"] for t in PRIMARY)
    return {
        "heldout_gap_up": part1,
        "primary_tasks_ece_up_overconfident": tasks_up,
        "primary_tasks_evaluated": evaluated,
        "met": bool(part1 and len(tasks_up) >= 2),
    }


def _select(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Largest mean primary ECE rise among doses meeting the criterion with a mean primary
    accuracy loss of at most 2 points; else the largest rise, loss stated."""
    met = [e for e in entries if e["criterion"]["met"]]
    if not met:
        return None

    def mean_delta(e: dict[str, Any], m: str) -> float:
        vals = [
            e["tasks"][f"{PRIMARY_FORMAT}/{t}/{PRIMARY_NORM}"][m]["delta"]
            for t in PRIMARY
            if f"{PRIMARY_FORMAT}/{t}/{PRIMARY_NORM}" in e["tasks"]
        ]
        return float(np.mean(vals))

    keep = [e for e in met if mean_delta(e, "accuracy") >= -0.02]
    pool = keep or met
    best = max(pool, key=lambda e: mean_delta(e, "ece"))
    return {
        "name": best["name"],
        "lr": best["lr"],
        "epochs": best["epochs"],
        "mean_primary_ece_delta": mean_delta(best, "ece"),
        "mean_primary_accuracy_delta": mean_delta(best, "accuracy"),
        "accuracy_kept_within_2_points": bool(keep),
    }


def _curves(work: Path, entries: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for e in entries:
        path = work / "runs" / e["name"] / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        ep = [r["epoch"] for r in rows]
        lab = f"lr {e['lr']:g}, {e['epochs']:g} ep"
        axes[0].plot(ep, [r["loss"] for r in rows], lw=0.8, label=lab)
        axes[1].plot(ep, [r["confidence"] - r["accuracy"] for r in rows], lw=0.8, label=lab)
    axes[0].set_ylabel("training loss (token mean)")
    axes[1].set_ylabel("token confidence - accuracy (train batch)")
    for a in axes:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=130)
    plt.close(fig)


def _f(x: float) -> str:
    return f"{x:+.3f}"


def _tables(out: dict[str, Any]) -> str:
    lines = [
        "# Positive control: does eps-0 SFT make gemma-3-270m over-confident?",
        "",
        "Generated by `experiments/control_report.py`; criterion pre-registered in "
        "`docs/issue12_plan.md`. Differences are dose - base with paired bootstrap 95% "
        "intervals (1,000 draws).",
        "",
        "## Held-out SFT tokens",
        "",
        "| dose | token gap base | token gap SFT | delta [95% CI] | token NLL base | SFT |",
        "|---|---|---|---|---|---|",
    ]
    for e in out["doses"]:
        g, n = e["heldout"]["token_gap"], e["heldout"]["token_nll"]
        lines.append(
            f"| lr {e['lr']:g}, {e['epochs']:g} ep | {g['a']:.3f} | {g['b']:.3f} | "
            f"{_f(g['delta'])} [{_f(g['ci95'][0])}, {_f(g['ci95'][1])}] | {n['a']:.3f} | "
            f"{n['b']:.3f} |"
        )
    for fmt in ("trained", "plain"):
        for norm in NORMS:
            lines += [
                "",
                f"## {fmt} format, {norm} normalisation"
                + (" (primary)" if (fmt, norm) == (PRIMARY_FORMAT, PRIMARY_NORM) else ""),
                "",
                "| dose | task | n | acc base | acc SFT | d acc [95% CI] | ECE base | ECE SFT "
                "| d ECE [95% CI] | conf SFT |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for e in out["doses"]:
                for task in PRIMARY + SECONDARY:
                    r = e["tasks"].get(f"{fmt}/{task}/{norm}")
                    if r is None:
                        continue
                    a, c = r["accuracy"], r["ece"]
                    lines.append(
                        f"| lr {e['lr']:g}, {e['epochs']:g} ep | {task} | {r['n']} | "
                        f"{a['a']:.3f} | {a['b']:.3f} | {_f(a['delta'])} [{_f(a['ci95'][0])}, "
                        f"{_f(a['ci95'][1])}] | {c['a']:.3f} | {c['b']:.3f} | {_f(c['delta'])} "
                        f"[{_f(c['ci95'][0])}, {_f(c['ci95'][1])}] | "
                        f"{r['mean_confidence']['b']:.3f} |"
                    )
    lines += ["", "## Criterion", ""]
    for e in out["doses"]:
        c = e["criterion"]
        lines.append(
            f"- lr {e['lr']:g}, {e['epochs']:g} ep: held-out gap up beyond CI: "
            f"{'yes' if c['heldout_gap_up'] else 'no'}; primary tasks with ECE up on the "
            f"over-confident side: {', '.join(c['primary_tasks_ece_up_overconfident']) or 'none'}"
            f" (of {c['primary_tasks_evaluated']} evaluated) -> "
            f"**{'met' if c['met'] else 'not met'}**"
        )
    sel = out["selected_for_claim2"]
    lines += [
        "",
        "Setting for claim 2: "
        + (
            f"**lr {sel['lr']:g}, {sel['epochs']:g} epochs** (mean primary ECE "
            f"{_f(sel['mean_primary_ece_delta'])}, accuracy {_f(sel['mean_primary_accuracy_delta'])})"
            if sel
            else "none: no dose met the criterion"
        ),
    ]
    if out["missing"]:
        lines += ["", "Not evaluated: " + "; ".join(out["missing"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "control")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments/results/sft_control")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    out = write_report(args.work, args.results, bootstrap=args.bootstrap)
    print((args.results / "tables.md").read_text())
    return 0 if out["doses"] else 1


if __name__ == "__main__":
    sys.exit(main())
