"""``calibrated-lm compare DIR...``: several eval runs side by side.

For every task present in more than one run: accuracy, ECE and RMS calibration error with
bootstrap 95% intervals, and temperature scaling (Guo et al. 2017): T is fitted by NLL on the
task's held-out validation split (``samples_validation.jsonl``, written by ``eval
--fit-split``), then applied to the test scores, p_k ∝ exp(s_k / T); ECE and RMS-CE after
scaling are reported next to T. Runs without that split show "-" for T. One overlaid
reliability diagram per task.

Paired differences: every run after the first is compared with the first (the reference) on
the questions both scored (key: task and id), metric(run) - metric(reference) with a paired
bootstrap 95% interval (:func:`calibrated_lm.calibration.paired.paired_bootstrap_items`), for
every metric of the registry's ``paired`` view (:mod:`calibrated_lm.calibration.registry`:
its labels head the columns, and its direction turns an interval that excludes 0 into
"better" or "worse"; a metric registered into that view appears in the table and JSON
without other edits). When the
runs of a task scored different question sets, the report says so and which counts; runs
with no question in common with the reference get no difference, and a run folder without any
scored question is an error.

Before anything is written, every option is checked and every run's records are read through
the reader ``calibrated-lm metrics`` uses (:func:`calibrated_lm.calibration.samples.read_samples`:
missing fields, NaN scores, non-integer or out-of-range labels, duplicate questions, lengths the
normalisation needs), so a bad run is one sentence naming its file and line; a damaged
``summary.json`` or a journal cut short by an interrupted eval is one too. The output folder is
locked (:mod:`calibrated_lm.runlock`) while it is written.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from calibrated_lm import durable
from calibrated_lm.calibration.items import ItemArrays
from calibrated_lm.calibration.jsonfile import write_json
from calibrated_lm.calibration.metric_draws import draws_bar
from calibrated_lm.calibration.record import SampleRecord
from calibrated_lm.calibration.registry import Metric
from calibrated_lm.calibration.registry import metrics as registered_metrics
from calibrated_lm.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare eval runs: overlaid reliability diagrams, metrics with CIs, temperatures",
        description="Side-by-side calibration report of several `calibrated-lm eval` runs.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        type=Path,
        help="run folders written by calibrated-lm eval, or lm-eval --output_path folders "
        "(with --log_samples)",
    )
    p.add_argument("--output", type=Path, default=Path("runs/compare"))
    p.add_argument("--labels", default=None, help="comma-separated names for the runs")
    p.add_argument("--normalization", choices=["none", "chars", "tokens"], default=None)
    p.add_argument("--n-bins", type=int, default=15)
    p.add_argument("--binning", choices=["width", "mass"], default="width")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.set_defaults(run=run)


def _cut_short(path: Path) -> UserError | None:
    """A sentence when the last line of ``path`` was cut short (an interrupted eval)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end == len(data) or not data[end:].strip():
        return None
    try:
        json.loads(data[end:])
        return None
    except ValueError:
        line = data[:end].count(b"\n") + 1
        return UserError(
            f"{path}:{line}: the last line is cut short (its eval was interrupted or is still "
            "running); rerun that eval to finish it"
        )


def _lm_eval_files(path: Path) -> list[Path]:
    """lm-evaluation-harness ``--log_samples`` files under ``path`` (it writes them into a
    sub-folder named after the model): one per task, or a sentence naming the duplicates."""
    from calibrated_lm.evaluation.run_file import FIT_SAMPLES

    # eval's validation journal matches lm-eval's pattern too: it is never one of its files.
    files = sorted(f for f in path.rglob("samples_*.jsonl") if f.name != FIT_SAMPLES)
    by_task: dict[str, list[Path]] = {}
    from calibrated_lm.calibration.samples import lm_eval_task_name

    for f in files:
        by_task.setdefault(lm_eval_task_name(f), []).append(f)
    for task, fs in by_task.items():
        if len(fs) > 1:
            raise UserError(
                f"{path} holds {len(fs)} lm-eval sample files of task {task} "
                f"({', '.join(str(f.relative_to(path)) for f in fs)}); keep one, or give "
                "the folder of one run"
            )
    return files


def _load_lm_eval_run(path: Path, files: list[Path]) -> dict[str, Any]:
    """An lm-eval output folder as a run: its questions as records. Ids are the harness's
    ``doc_id`` (prefixed by the subject for MMLU's subtasks), so an lm-eval run pairs with
    another lm-eval run of the same tasks, not with a calibrated-lm run."""
    from calibrated_lm.calibration.command import read_samples_checked
    from calibrated_lm.calibration.samples import read_sample_records

    read_samples_checked(files)  # every file checked as ``metrics`` checks it
    records: list[SampleRecord] = []
    for f in files:
        for r in read_sample_records(f):
            records.append(replace(r, id=f"{r.subject}/{r.id}") if r.subject else r)
    summary = {"protocol": {"model": None, "normalization": "none", "source": "lm-eval"}}
    return {"path": path, "summary": summary, "records": records, "fit": [], "files": files,
            "lm_eval": True}  # fmt: skip


def _load_run(path: Path) -> dict[str, Any]:
    """A run folder's records and summary, read (not yet validated: see _validate_run): our
    eval folder, or an lm-evaluation-harness ``--output_path`` folder of ``--log_samples``."""
    from calibrated_lm.evaluation.run_file import FIT_SAMPLES, RUN_FILE, SAMPLES
    from calibrated_lm.evaluation.samples_file import read_records

    samples = path / SAMPLES
    if path.is_file():
        raise UserError(
            f"{path} is a file; compare takes eval run folders (the --output of calibrated-lm "
            "eval) or lm-evaluation-harness --output_path folders"
        )
    if not path.is_dir():
        raise UserError(f"{path} is not an eval run folder (no such folder)")
    if not samples.exists():
        ours = [n for n in (RUN_FILE, FIT_SAMPLES) if (path / n).exists()]
        if ours:  # eval's folder, its test journal gone: not an lm-eval folder
            raise UserError(
                f"{path} is an eval run folder ({', '.join(ours)}) without its {SAMPLES}: "
                "rerun that eval with the same --output to score the questions again"
            )
        harness = _lm_eval_files(path)
        if harness:
            return _load_lm_eval_run(path, harness)
        raise UserError(
            f"{path} is not an eval run folder (no {SAMPLES}, and no lm-eval "
            "samples_<task>_<date>.jsonl from --log_samples below it)"
        )
    files = [samples] + ([path / FIT_SAMPLES] if (path / FIT_SAMPLES).exists() else [])
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} is not a file; an eval run's {f.name} is a JSONL file")
    for f in files:
        problem = _cut_short(f)
        if problem is not None:
            raise problem
    try:
        records = read_records(samples, repair=False)
        fit = read_records(path / FIT_SAMPLES, repair=False)
    except UnicodeDecodeError:
        from calibrated_lm.calibration.command import utf8_error

        raise (utf8_error(files) or UserError(f"{path}: not UTF-8 text")) from None
    if not records:
        raise UserError(f"{path}: {SAMPLES} holds no scored question")
    summary_path = path / "summary.json"
    summary: Any = {}
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
            raise UserError(
                f"{summary_path} is damaged ({why}); rerun that eval to rebuild it, or delete it"
            ) from None
        if not isinstance(summary, dict) or not isinstance(summary.get("protocol", {}), dict):
            raise UserError(
                f"{summary_path} is not an eval summary (expected an object with a protocol); "
                "rerun that eval to rebuild it, or delete it"
            )
    # eval writes run.json first and summary.json last.
    unfinished = (path / RUN_FILE).exists() and not summary_path.exists()
    warnings: list[str] = []
    if summary_path.exists():
        records = _summary_questions(path, records, summary, warnings)
    return {
        "path": path,
        "summary": summary,
        "records": records,
        "fit": fit,
        "files": files,
        "unfinished": unfinished,
        "warnings": warnings,
    }


def _summary_questions(
    path: Path, records: list[SampleRecord], summary: dict[str, Any], warnings: list[str]
) -> list[SampleRecord]:
    """The records of the questions ``summary.json`` covers. samples.jsonl keeps every
    question ever scored into the folder (a later, smaller --limit or other --tasks reuses
    them), so without this a compare would score questions the summary did not. A folder
    written before questions.json existed keeps all its records, with a note where their
    count per task differs from the summary's."""
    from calibrated_lm.evaluation.run_file import QUESTIONS, SAMPLES, read_questions

    keys = read_questions(path)
    if keys is None:
        counts: dict[str, int] = {}
        for r in records:
            counts[r.task] = counts.get(r.task, 0) + 1
        tasks = summary.get("tasks", {}) if isinstance(summary.get("tasks"), dict) else {}
        stated = {t: v.get("n") for t, v in tasks.items() if isinstance(v, dict) and t != "all"}
        if stated and any(stated.get(t) != n for t, n in counts.items()):
            warnings.append(
                f"{path}: {SAMPLES} holds other questions than summary.json covers (per task: "
                f"{counts} vs {stated}); that folder predates {QUESTIONS}, so all of them are "
                "compared; rerun its eval to compare only the summary's"
            )
        return records
    chosen = [r for r in records if r.key in keys]
    missing = len(keys) - len({r.key for r in chosen})
    if missing:
        raise UserError(
            f"{path}: {missing} question(s) of {QUESTIONS} are not in {SAMPLES}; rerun that "
            "eval to rebuild the folder"
        )
    return chosen


def _validate_run(run: dict[str, Any], normalization: str) -> None:
    """Check every record as ``calibrated-lm metrics`` does (the same reader: fields, numbers,
    labels in range, no duplicate question, lengths that ``normalization`` needs), file by
    file, each error naming file and line."""
    from calibrated_lm.calibration.command import read_samples_checked

    if run.get("lm_eval"):  # read (so checked) by the same reader when loaded
        if normalization == "tokens":
            raise UserError(
                f"{run['path']}: lm-eval sample files hold no token counts; compare with "
                "--normalization none or chars"
            )
        read_samples_checked(run["files"], normalization=normalization)
        return
    for f, records in zip(run["files"], (run["records"], run["fit"])):
        if records:  # an empty validation journal only means: no temperature for this run
            read_samples_checked([f], normalization=normalization)


def _by_task(records: list[SampleRecord]) -> dict[str, list[SampleRecord]]:
    """Records per top-level task (a group's subjects together), first-seen order."""
    out: dict[str, list[SampleRecord]] = {}
    for r in records:
        out.setdefault(r.task, []).append(r)
    return out


def _scores(records: list[SampleRecord], normalization: str) -> tuple[list, np.ndarray]:
    """(per-question score rows after normalisation, labels). Ragged rows, not a padded
    array: a choice scored -inf is a real choice (p = 0), and only padding may be dropped."""
    from calibrated_lm.calibration.scores import normalize_scores, padded_scores
    from calibrated_lm.evaluation.report import record_lengths

    rows = [r.choice_logprobs for r in records]
    s, k = padded_scores(rows)
    s = normalize_scores(s, k, normalization, [record_lengths(r, normalization) for r in records])
    return [s[i, : k[i]] for i in range(len(rows))], np.array([r.label for r in records])


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
    """Write ``compare.json``, ``compare.md`` and ``compare_<task>.png/.svg``; return the data.

    Every option and every run folder is checked first (records through the reader that
    ``calibrated-lm metrics`` uses); nothing is written before that, and the output folder is
    locked while it is written."""
    from calibrated_lm.calibration.command import check_counts
    from calibrated_lm.runlock import run_lock

    # Every option and every run before any output is written.
    check_counts(n_bins=n_bins, bootstrap=bootstrap, binning=binning)
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise UserError(f"--normalization must be none, chars or tokens, not {normalization!r}")
    if len(paths) < 1:
        raise UserError("compare needs at least one run folder")
    if labels is not None:
        if len(labels) != len(paths):
            raise UserError(f"{len(labels)} labels for {len(paths)} runs")
        _check_labels(labels, "--labels")
    seen: dict[Path, Path] = {}
    for p in map(Path, paths):
        if p.resolve() in seen:
            raise UserError(
                f"{p} is given twice (as {seen[p.resolve()]} before); a run compared with "
                "itself has no difference to show"
            )
        seen[p.resolve()] = p
    runs = [_load_run(Path(p)) for p in paths]
    if labels is None:
        labels = []
        for r in runs:
            model = r["summary"].get("protocol", {}).get("model")
            labels.append(r["path"].name if model is None else f"{r['path'].name} ({model})")
        if len(set(labels)) < len(labels):  # same folder names: the paths tell them apart
            labels = [
                str(r["path"]) + label[len(r["path"].name) :] for r, label in zip(runs, labels)
            ]
        _check_labels(labels, "the default labels (give --labels)")
    chosen_by = "--normalization"
    if normalization is None:
        normalization = runs[0]["summary"].get("protocol", {}).get("normalization", "none")
        chosen_by = f"the reference's ({runs[0]['path'].name})"
        if normalization not in NORMALIZATIONS:
            raise UserError(
                f"{runs[0]['path']}/summary.json names an unknown normalization "
                f"{normalization!r}; pass --normalization none, chars or tokens"
            )
    # Each run's own (its eval's summary), so that one scored another way is said, not hidden.
    own = {
        r["path"].name: r["summary"].get("protocol", {}).get("normalization", normalization)
        for r in runs
    }
    differ = sorted(f"{name}: {n}" for name, n in own.items() if n != normalization)
    for r in runs:
        _validate_run(r, normalization)
    # The lock creates the output folder (and removes it again if nothing gets written).
    notes = [
        f"every run is compared with normalization {normalization} ({chosen_by}), but "
        f"some evals reported another ({', '.join(differ)}); pass --normalization to choose"
    ] if differ else []  # fmt: skip
    with run_lock(output):
        return _compare(
            runs, output, labels, normalization, n_bins, binning, bootstrap, notes, chosen_by
        )


NORMALIZATIONS = ("none", "chars", "tokens")


def _check_labels(labels: list[str], what: str) -> None:
    seen = set()
    for label in labels:
        if not label:
            raise UserError(f"{what}: a run's label is empty")
        if label in seen:
            raise UserError(f"{what}: two runs are labelled {label!r}")
        seen.add(label)


def _compare(
    runs: list[dict[str, Any]],
    output: Path,
    labels: list[str],
    normalization: str,
    n_bins: int,
    binning: str,
    bootstrap: int,
    notes: Sequence[str] = (),
    chosen_by: str = "--normalization",
) -> dict[str, Any]:
    from calibrated_lm.calibration import reliability_diagram
    from calibrated_lm.evaluation.report import confidence_correct

    task_names: list[str] = []
    for r in runs:
        for t in _by_task(r["records"]):
            if t not in task_names:
                task_names.append(t)
    result: dict[str, Any] = {
        "normalization": normalization,
        "normalization_chosen_by": chosen_by,
        "bootstrap": bootstrap,
        "runs": labels,
        "tasks": {},
    }
    result["reference"] = labels[0]
    per_run = [set(_by_task(r["records"])) for r in runs]
    shared_tasks = [t for t in task_names if sum(t in ts for ts in per_run) > 1]
    result["warnings"] = list(notes) + [
        f"{label}: its eval has not finished (run.json but no summary.json: interrupted, or "
        "still running), so its questions are compared as far as it got; rerun that eval "
        "with the same --output to finish it"
        for label, r in zip(labels, runs)
        if r.get("unfinished")
    ]
    result["warnings"] += [w for r in runs for w in r.get("warnings", [])]
    if len(runs) > 1 and not shared_tasks:
        which = "; ".join(f"{lab}: {', '.join(sorted(ts))}" for lab, ts in zip(labels, per_run))
        result["warnings"].append(
            f"the runs share no task ({which}), so nothing is paired: each run is summarised alone"
        )
    from tqdm import tqdm

    # Each task's per-run bootstraps and paired bootstraps are the long part (minutes at
    # MMLU's 14k questions or many draws), as in ``metrics``' bar.
    for task in tqdm(task_names, desc="tasks", unit="task"):
        series = {}
        rows = {}
        keyed = {
            label: {str(r.id): r for r in _by_task(run["records"]).get(task, [])}
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
        # The draws of this task (each run's summary, again after T, and each paired
        # difference) on a bar of their own: one task can take minutes.
        total = bootstrap * _draw_passes(runs, labels, keyed, task)
        with draws_bar(total, f"{task} bootstrap"):
            for label, run in zip(labels, runs):
                recs = _by_task(run["records"]).get(task)
                if not recs:
                    continue
                fit = _by_task(run["fit"]).get(task)
                entry = _run_entry(recs, fit, normalization, n_bins, binning, bootstrap)
                rows[label] = entry
                series[label] = confidence_correct(recs, normalization)
            if rows:
                _paired_vs_reference(
                    rows, keyed, labels[0], normalization, n_bins, binning, bootstrap
                )
        if not rows:
            continue
        for label, e in rows.items():
            why = e.get("paired", {}).get("why")
            if why:
                result["warnings"].append(f"{task}: {label}: no paired difference ({why})")
        paths_out = reliability_diagram(
            series,
            output / f"compare_{task}",
            n_bins=n_bins,
            binning=binning,
            title=task,
            normalization=normalization,  # the title names it, as eval's diagrams do
        )
        result["tasks"][task] = {"runs": rows, "diagram": [str(p) for p in paths_out]}
    write_json(output / "compare.json", result)
    durable.write_text(output / "compare.md", _markdown(result))
    from calibrated_lm.run_folders import remove_stale_figures

    drawn = [p for t in result["tasks"].values() for p in t["diagram"]]
    remove_stale_figures(output, "compare_", drawn)
    return result


def _run_entry(
    recs: list[SampleRecord],
    fit: list[SampleRecord] | None,
    normalization: str,
    n_bins: int,
    binning: str,
    bootstrap: int,
) -> dict[str, Any]:
    """One run's row for one task: ``summarize`` of its records (without the bin table) and,
    with a fit split, the temperature fitted by NLL on it and the ``after_T`` metrics of the
    records' scores divided by it."""
    from calibrated_lm.calibration import fit_temperature, summarize

    s, y = _scores(recs, normalization)
    base = summarize(s, y, n_bins=n_bins, binning=binning, bootstrap=bootstrap)
    entry: dict[str, Any] = {k: base[k] for k in base if k != "bins"}
    if fit:
        fs, fy = _scores(fit, normalization)
        temp = fit_temperature(fs, fy)
        scaled = summarize(
            [row / temp for row in s],  # ragged: -inf choices stay choices
            y,
            n_bins=n_bins,
            binning=binning,
            bootstrap=bootstrap,
        )
        entry["temperature"] = temp
        entry["fit_n"] = len(fit)
        for m in registered_metrics("after_T"):
            entry[f"{m.name}_after_T"] = scaled[m.name]
            entry[f"{m.name}_after_T_ci95"] = scaled.get(f"{m.name}_ci95")
    return entry


def _draw_passes(
    runs: list[dict[str, Any]],
    labels: list[str],
    keyed: dict[str, dict[str, SampleRecord]],
    task: str,
) -> int:
    """How many bootstraps ``compare`` runs on ``task`` (for its draws bar): one per run that
    has the task, one more per run with a fit split for it, and one per paired difference
    (a run other than the reference sharing questions with it). An upper bound: a pair
    whose gold answers or numbers of choices differ is counted but draws nothing."""
    ref = keyed.get(labels[0]) or {}
    passes = 0
    for label, run in zip(labels, runs):
        if not keyed[label]:
            continue
        passes += 1 + bool(_by_task(run["fit"]).get(task))
        if label != labels[0] and set(ref) & set(keyed[label]):
            passes += 1
    return passes


def paired_metrics() -> list[Metric]:
    """The metrics of the paired differences: the registry's ``paired`` view (its labels
    head the columns, its directions give the verdicts)."""
    return registered_metrics("paired")


def _items(records: list[SampleRecord], normalization: str) -> ItemArrays:
    """The records' questions as the metrics see them: log-softmax over each question's own
    choices after ``normalization`` (as ``summarize`` computes the per-run numbers)."""
    from calibrated_lm.calibration.scores import choice_log_probabilities
    from calibrated_lm.evaluation.report import record_lengths

    logp, k = choice_log_probabilities(
        [r.choice_logprobs for r in records],
        choice_char_lengths=[record_lengths(r, normalization) for r in records],
        normalization=normalization,
    )
    return ItemArrays(logp, k, np.array([r.label for r in records], dtype=np.int64))


FLOAT_NOISE = 1e-6


def verdict(metric: Metric, ci: list[float] | None) -> str | None:
    """The run against the reference on ``metric``: "better" or "worse" when the interval
    of metric(run) - metric(reference) excludes 0 and the metric has a better direction, "no
    clear difference" when it includes 0 or lies within +-``FLOAT_NOISE``, None without a
    direction or an interval."""
    if metric.direction is None or ci is None or any(np.isnan(ci)):
        return None
    # An interval inside +-FLOAT_NOISE is the rounding of equal scores (another summation
    # order or batch), not a difference, however consistent its sign.
    if ci[0] <= 0.0 <= ci[1] or max(abs(ci[0]), abs(ci[1])) < FLOAT_NOISE:
        return "no clear difference"
    up = ci[0] > 0.0
    return "better" if up == (metric.direction == "higher") else "worse"


def _paired_vs_reference(
    rows: dict[str, dict[str, Any]],
    keyed: dict[str, dict[str, SampleRecord]],
    reference: str,
    normalization: str,
    n_bins: int,
    binning: str,
    bootstrap: int,
) -> None:
    """Add ``paired`` (for each metric of :func:`paired_metrics`: metric(run) -
    metric(reference) on the shared questions with its paired bootstrap 95% CI, the
    metric's ``direction`` and :func:`verdict`) to every row but the reference's."""
    from calibrated_lm.calibration.paired import paired_bootstrap_items

    ref = keyed.get(reference) or {}
    shown = paired_metrics()
    for label, entry in rows.items():
        if label == reference or not ref:
            continue
        shared = sorted(set(ref) & set(keyed[label]))
        if not shared:
            entry["paired"] = {"n": 0}
            continue
        ia = _items([ref[k] for k in shared], normalization)
        ib = _items([keyed[label][k] for k in shared], normalization)
        # Same ids, other answers or choices: not the same questions (another task file or
        # split).
        if not np.array_equal(ia.labels, ib.labels):
            entry["paired"] = {"n": 0, "why": f"gold answers differ from {reference}'s"}
            continue
        if not np.array_equal(ia.n_choices, ib.n_choices):
            entry["paired"] = {"n": 0, "why": f"numbers of choices differ from {reference}'s"}
            continue
        res = paired_bootstrap_items(
            ia, ib, metrics=shown, draws=bootstrap, n_bins=n_bins, binning=binning
        )
        for m in shown:
            res[m.name]["direction"] = m.direction
            res[m.name]["verdict"] = verdict(m, res[m.name]["ci95"])
        entry["paired"] = {"n": len(shared), **res}


def header() -> list[str]:
    """The per-run table's heading: the registry's ``compare`` view, the temperature, and the
    ``compare`` metrics that are also recomputed after scaling (``after_T``)."""
    shown = registered_metrics("compare")
    after = [m for m in shown if "after_T" in m.views]
    return (
        ["run", "n"]
        + [m.heading("compare", ci_suffix=False) for m in shown]
        + ["T (fit on val)"]
        + [f"{m.label} after T" for m in after]
    )


def table(result: dict[str, Any], task: str) -> list[list[str]]:
    """One row per run of ``task``, the columns of :func:`header`."""
    shown = registered_metrics("compare")
    after = [m for m in shown if "after_T" in m.views]
    rows = []
    for label, e in result["tasks"][task]["runs"].items():
        t = e.get("temperature")
        rows.append(
            [label, str(e["n"])]
            + [m.cell(e, "compare") for m in shown]
            + ["-" if t is None else f"{t:.3f} (n={e['fit_n']})"]
            + [m.cell(e, "compare", key=f"{m.name}_after_T") for m in after]
        )
    return rows


def paired_header() -> list[str]:
    """The paired table's heading: each metric's label, with its better direction."""
    arrows = {"higher": " (higher better)", "lower": " (lower better)", None: ""}
    return ["run - reference", "shared n"] + [
        m.label + arrows[m.direction] for m in paired_metrics()
    ]


def _signed(x: float) -> str:
    return "-" if x is None or np.isnan(x) else f"{x:+.3f}"


def paired_table(result: dict[str, Any], task: str) -> list[list[str]]:
    """One row per non-reference run: each metric's difference on the shared questions, its
    95% CI where the registry's ``paired`` view prints it, and "better"/"worse" where that
    interval excludes 0 and the metric has a better direction."""
    shown = paired_metrics()
    rows = []
    for label, e in result["tasks"][task]["runs"].items():
        p = e.get("paired")
        if p is None:
            continue
        if not p["n"]:
            rows.append([label, "0"] + ["-"] * len(shown))
            continue
        cells = []
        for m in shown:
            d = p[m.name]
            text = _signed(d["delta"])
            if d["ci95"] is not None and m.shows_ci("paired"):
                text += f" [{_signed(d['ci95'][0])}, {_signed(d['ci95'][1])}]"
            if d.get("verdict") in ("better", "worse"):
                text += f" {d['verdict']}"
            cells.append(text)
        rows.append([label, str(p["n"])] + cells)
    return rows


def _markdown(result: dict[str, Any]) -> str:
    from calibrated_lm.evaluation.report import markdown_table

    lines = ["# Calibration comparison", ""]
    ci = (
        "95% bootstrap intervals in brackets"
        if result.get("bootstrap", 1)
        else "no intervals and no better/worse (--bootstrap 0)"
    )
    lines.append(f"Normalization: {result['normalization']}; {ci}.")
    lines.append(
        f"Paired differences are run - reference ({result['reference']}) on the questions both "
        "scored; better/worse: the interval excludes 0 in the metric's better/worse direction."
    )
    for w in result["warnings"]:
        lines += ["", f"**Warning**: {w}."]
    for task, data in result["tasks"].items():
        png = [p for p in data["diagram"] if p.endswith(".png")][0]
        lines += ["", f"## {task}", "", markdown_table(header(), table(result, task)), ""]
        paired = paired_table(result, task)
        if paired:
            lines += [markdown_table(paired_header(), paired), ""]
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
    print(f"normalization: {result['normalization']} ({result['normalization_chosen_by']})")
    for w in result["warnings"]:
        print(f"warning: {w}")
    for task, data in result["tasks"].items():
        print(f"\n{task}")
        print(text_table(header(), table(result, task)))
        paired = paired_table(result, task)
        if paired:
            ci = "95% CI" if result.get("bootstrap", 1) else "no intervals: --bootstrap 0"
            print(f"paired differences vs {result['reference']} ({ci}):")
            print(text_table(paired_header(), paired))
        print(f"diagram: {[p for p in data['diagram'] if p.endswith('.png')][0]}")
    print(f"\nreport: {args.output / 'compare.md'}")
    return 0
