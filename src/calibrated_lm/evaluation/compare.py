"""``calibrated-lm compare DIR...``: several eval runs side by side.

For every task present in more than one run: accuracy, ECE and RMS calibration error with
bootstrap 95% intervals, and temperature scaling (Guo et al. 2017): T is fitted by NLL on the
task's held-out validation split (``samples_validation.jsonl``, written by ``eval
--fit-split``), then applied to the test scores, p_k ∝ exp(s_k / T); ECE and RMS-CE after
scaling are reported next to T. Runs without that split show "-" for T. One overlaid
reliability diagram per task.

Paired differences: every run after the first is compared with the first (the reference) on
the questions both scored (key: task and id), metric(run) - metric(reference) with a paired
bootstrap 95% interval (:func:`calibrated_lm.calibration.paired.paired_bootstrap`). When the
runs of a task scored different question sets, the report says so and which counts; runs
with no question in common with the reference get no difference, and a run folder without any
scored question is an error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from calibrated_lm.calibration.jsonfile import write_json
from calibrated_lm.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare eval runs: overlaid reliability diagrams, metrics with CIs, temperatures",
        description="Side-by-side calibration report of several `calibrated-lm eval` runs.",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run folders written by calibrated-lm eval")
    p.add_argument("--output", type=Path, default=Path("runs/compare"))
    p.add_argument("--labels", default=None, help="comma-separated names for the runs")
    p.add_argument("--normalization", choices=["none", "chars", "tokens"], default=None)
    p.add_argument("--n-bins", type=int, default=15)
    p.add_argument("--binning", choices=["width", "mass"], default="width")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.set_defaults(run=run)


def _load_run(path: Path) -> dict[str, Any]:
    from calibrated_lm.evaluation.runner import FIT_SAMPLES, SAMPLES
    from calibrated_lm.evaluation.samples_file import read_records

    samples = path / SAMPLES
    if not samples.exists():
        raise UserError(f"{path} is not an eval run folder (no {SAMPLES})")
    records = read_records(samples, repair=False)
    if not records:
        raise UserError(f"{path}: {SAMPLES} holds no scored question")
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {
        "path": path,
        "summary": summary,
        "records": records,
        "fit": read_records(path / FIT_SAMPLES, repair=False),
    }


def _by_task(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["task"], []).append(r)
    return out


def _scores(records: list[dict[str, Any]], normalization: str) -> tuple[np.ndarray, np.ndarray]:
    """(-inf padded scores after normalisation, labels)."""
    from calibrated_lm.calibration.scores import normalize_scores, padded_scores
    from calibrated_lm.evaluation.report import _lengths

    s, k = padded_scores([r["choice_logprobs"] for r in records])
    unit = "tokens" if normalization == "tokens" else "chars"
    s = normalize_scores(s, k, normalization, [_lengths(r, unit) for r in records])
    return s, np.array([int(r["label"]) for r in records])


def compare_runs(
    paths: list[Path],
    output: Path,
    *,
    labels: list[str] | None = None,
    normalization: str | None = None,
    n_bins: int = 15,
    binning: str = "width",
    bootstrap: int = 1000,
) -> dict[str, Any]:
    """Write ``compare.json``, ``compare.md`` and ``compare_<task>.png/.svg``; return the data."""
    from calibrated_lm.calibration import (
        apply_temperature,
        fit_temperature,
        reliability_diagram,
        summarize,
    )
    from calibrated_lm.evaluation.report import confidence_correct

    if len(paths) < 1:
        raise UserError("compare needs at least one run folder")
    runs = [_load_run(p) for p in paths]
    if labels is None:
        labels = []
        for r in runs:
            model = r["summary"].get("protocol", {}).get("model")
            labels.append(r["path"].name if model is None else f"{r['path'].name} ({model})")
    if len(labels) != len(runs):
        raise UserError(f"{len(labels)} labels for {len(runs)} runs")
    if normalization is None:
        normalization = runs[0]["summary"].get("protocol", {}).get("normalization", "none")
    output.mkdir(parents=True, exist_ok=True)
    task_names: list[str] = []
    for r in runs:
        for t in _by_task(r["records"]):
            if t not in task_names:
                task_names.append(t)
    result: dict[str, Any] = {"normalization": normalization, "runs": labels, "tasks": {}}
    result["reference"] = labels[0]
    result["warnings"] = []
    for task in task_names:
        series = {}
        rows = {}
        keyed = {
            label: {str(r["id"]): r for r in _by_task(run["records"]).get(task, [])}
            for label, run in zip(labels, runs)
        }
        present = {label: ids for label, ids in keyed.items() if ids}
        sets = {frozenset(ids) for ids in present.values()}
        if len(sets) > 1:
            counts = ", ".join(f"{label}: n={len(ids)}" for label, ids in present.items())
            shared = frozenset.intersection(*sets)
            result["warnings"].append(
                f"{task}: the runs scored different questions ({counts}); the metrics per run "
                f"are on each run's own questions, the paired differences on the "
                f"{len(shared)} shared with the reference"
            )
        for label, run in zip(labels, runs):
            recs = _by_task(run["records"]).get(task)
            if not recs:
                continue
            s, y = _scores(recs, normalization)
            base = summarize(s, y, n_bins=n_bins, binning=binning, bootstrap=bootstrap)
            entry: dict[str, Any] = {k: base[k] for k in base if k != "bins"}
            fit = _by_task(run["fit"]).get(task)
            if fit:
                fs, fy = _scores(fit, normalization)
                temp = fit_temperature(fs, fy)
                scaled = summarize(
                    apply_temperature(s, temp),
                    y,
                    n_bins=n_bins,
                    binning=binning,
                    bootstrap=bootstrap,
                )
                entry["temperature"] = temp
                entry["fit_n"] = len(fit)
                for k in ("ece", "rms_ce", "nll", "brier"):
                    entry[f"{k}_after_T"] = scaled[k]
                    entry[f"{k}_after_T_ci95"] = scaled.get(f"{k}_ci95")
            rows[label] = entry
            series[label] = confidence_correct(recs, normalization)
        if not rows:
            continue
        _paired_vs_reference(rows, keyed, labels[0], normalization, n_bins, bootstrap)
        for label, e in rows.items():
            why = e.get("paired", {}).get("why")
            if why:
                result["warnings"].append(f"{task}: {label}: no paired difference ({why})")
        paths_out = reliability_diagram(
            series, output / f"compare_{task}", n_bins=n_bins, binning=binning, title=task
        )
        result["tasks"][task] = {"runs": rows, "diagram": [str(p) for p in paths_out]}
    write_json(output / "compare.json", result)
    (output / "compare.md").write_text(_markdown(result), encoding="utf-8")
    return result


PAIRED_KEYS = ("accuracy", "ece", "rms_ce", "brier", "nll")


def _paired_vs_reference(
    rows: dict[str, dict[str, Any]],
    keyed: dict[str, dict[str, dict[str, Any]]],
    reference: str,
    normalization: str,
    n_bins: int,
    bootstrap: int,
) -> None:
    """Add ``paired`` (metric(run) - metric(reference) on the shared questions, paired
    bootstrap 95% CI) to every row but the reference's."""
    from calibrated_lm.calibration.paired import paired_bootstrap
    from calibrated_lm.evaluation.report import record_probabilities

    ref = keyed.get(reference) or {}
    for label, entry in rows.items():
        if label == reference or not ref:
            continue
        shared = sorted(set(ref) & set(keyed[label]))
        if not shared:
            entry["paired"] = {"n": 0}
            continue
        pa, y = record_probabilities([ref[k] for k in shared], normalization)
        pb, yb = record_probabilities([keyed[label][k] for k in shared], normalization)
        if not np.array_equal(y, yb):
            # Same ids, other answers: not the same questions (another task file or split).
            entry["paired"] = {"n": 0, "why": f"gold answers differ from {reference}'s"}
            continue
        width = max(pa.shape[1], pb.shape[1])
        pa = np.pad(pa, ((0, 0), (0, width - pa.shape[1])))
        pb = np.pad(pb, ((0, 0), (0, width - pb.shape[1])))
        res = paired_bootstrap(pa, pb, y, draws=max(bootstrap, 1), n_bins=n_bins)
        entry["paired"] = {"n": len(shared), **{k: res[k] for k in PAIRED_KEYS}}


def _cell(entry: dict[str, Any], key: str) -> str:
    v = entry.get(key)
    if v is None:
        return "-"
    ci = entry.get(f"{key}_ci95")
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


HEADER = ["run", "n", "accuracy", "ECE", "RMS-CE", "T (fit on val)", "ECE after T", "RMS after T"]


def table(result: dict[str, Any], task: str) -> list[list[str]]:
    rows = []
    for label, e in result["tasks"][task]["runs"].items():
        t = e.get("temperature")
        rows.append(
            [
                label,
                str(e["n"]),
                _cell(e, "accuracy"),
                _cell(e, "ece"),
                _cell(e, "rms_ce"),
                "-" if t is None else f"{t:.3f} (n={e['fit_n']})",
                _cell(e, "ece_after_T"),
                _cell(e, "rms_ce_after_T"),
            ]
        )
    return rows


PAIRED_HEADER = ["run - reference", "shared n", "accuracy", "ECE", "RMS-CE", "Brier", "NLL"]


def paired_table(result: dict[str, Any], task: str) -> list[list[str]]:
    """One row per non-reference run: each metric's difference [95% CI] on shared questions."""
    rows = []
    for label, e in result["tasks"][task]["runs"].items():
        p = e.get("paired")
        if p is None:
            continue
        if not p["n"]:
            rows.append([label, "0"] + ["-"] * len(PAIRED_KEYS))
            continue
        cells = [
            f"{p[k]['delta']:+.3f} [{p[k]['ci95'][0]:+.3f}, {p[k]['ci95'][1]:+.3f}]"
            for k in PAIRED_KEYS
        ]
        rows.append([label, str(p["n"])] + cells)
    return rows


def _markdown(result: dict[str, Any]) -> str:
    from calibrated_lm.evaluation.report import markdown_table

    lines = ["# Calibration comparison", ""]
    lines.append(f"Normalization: {result['normalization']}; 95% bootstrap intervals in brackets.")
    lines.append(f"Paired differences are against the reference run, {result['reference']}.")
    for w in result["warnings"]:
        lines += ["", f"**Warning**: {w}."]
    for task, data in result["tasks"].items():
        png = [p for p in data["diagram"] if p.endswith(".png")][0]
        lines += ["", f"## {task}", "", markdown_table(HEADER, table(result, task)), ""]
        paired = paired_table(result, task)
        if paired:
            lines += [markdown_table(PAIRED_HEADER, paired), ""]
        lines.append(f"![{task}]({Path(png).name})")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from calibrated_lm.evaluation.report import text_table

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    result = compare_runs(
        args.runs,
        args.output,
        labels=labels,
        normalization=args.normalization,
        n_bins=args.n_bins,
        binning=args.binning,
        bootstrap=args.bootstrap,
    )
    for w in result["warnings"]:
        print(f"warning: {w}")
    for task, data in result["tasks"].items():
        print(f"\n{task}")
        print(text_table(HEADER, table(result, task)))
        paired = paired_table(result, task)
        if paired:
            print(f"paired differences vs {result['reference']} (95% CI):")
            print(text_table(PAIRED_HEADER, paired))
        print(f"diagram: {[p for p in data['diagram'] if p.endswith('.png')][0]}")
    print(f"\nreport: {args.output / 'compare.md'}")
    return 0
