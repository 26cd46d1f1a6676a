"""Tables and figures of the SFT-calibration experiment (``sft_calibration.py report``).

Reads a work folder written by ``sft_calibration.py run`` (or unpacked from a device bundle) and
writes into the results folder:

* ``compare_all/``: ``calibrated-lm compare`` over every evaluated model (metrics with bootstrap
  95% CIs, temperatures fitted on each task's validation split, overlaid diagrams);
* ``headline/``: the same for base vs SFT vs SFT+LS (eps 0.1), seed 1: the overlaid reliability
  diagrams of the README;
* ``results.json`` and ``tables.md``: the main table (seeds pooled as mean and range), paired
  bootstrap differences for the three claims, held-out token statistics and SFT timings;
* ``training_curves.png``: loss, token confidence and token accuracy per SFT step.

Paired differences: both models scored the same questions, so one bootstrap resample of the
question indices is applied to both and the statistic is metric(A) - metric(B); the 95%
percentile interval excluding 0 is what "differs" means below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from common import read_json, write_json

TASKS = ("mmlu", "arc_easy", "hellaswag")
METRIC_KEYS = ("accuracy", "ece", "rms_ce")
# Per-run fields of `calibrated-lm compare` that the report tables carry.
RUN_FIELDS = (
    "n",
    "accuracy",
    "accuracy_ci95",
    "ece",
    "ece_ci95",
    "rms_ce",
    "rms_ce_ci95",
    "mean_confidence",
    "nll",
    "temperature",
    "ece_after_T",
    "rms_ce_after_T",
)
METRIC_NAMES = {"accuracy": "acc", "ece": "ECE", "rms_ce": "RMS-CE"}


def _evals(work: Path) -> list[dict[str, Any]]:
    """Finished evaluations, base first, SFT runs by name, reference last."""
    out = []
    for d in sorted((work / "evals").glob("*")):
        if not (d / "done.json").exists():
            continue
        name = d.name
        train = work / "runs" / name / "done.json"
        info = read_json(train) if train.exists() else {}
        model = read_json(d / "done.json").get("model", "")
        if name == "base":
            label, setting, seed = f"base ({model})", "base", None
        elif name == "reference":
            label, setting, seed = f"reference ({model})", "reference", None
        else:
            setting, seed = info.get("setting", name), info.get("seed")
            label = f"{setting} (seed {seed})"
        out.append(
            {"name": name, "path": d, "label": label, "setting": setting, "seed": seed, **info}
        )
    order = {"base": 0, "reference": 2}
    out.sort(key=lambda e: (order.get(e["name"], 1), _setting_rank(e), e["seed"] or 0))
    return out


def _setting_rank(e: dict[str, Any]) -> tuple:
    return (
        e.get("temperature") is not None or e.get("softcap") is not None,
        e.get("temperature") or 0,
        e.get("softcap") or 0,
        e.get("eps") or 0,
    )


def _records(path: Path) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    from calibrated_lm.evaluation.samples_file import read_records

    by: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for r in read_records(path / "samples.jsonl", repair=False):
        by.setdefault(r.task, {})[r.key] = r
    return by


def _conf_correct(recs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    from calibrated_lm.evaluation.report import confidence_correct

    return confidence_correct(recs, "none")


def _metric(conf: np.ndarray, corr: np.ndarray, key: str) -> float:
    from calibrated_lm.calibration import calibration_error

    if key == "accuracy":
        return float(corr.mean())
    return calibration_error(conf, corr, n_bins=15, norm="l1" if key == "ece" else "l2")


def paired_difference(
    a: list[dict[str, Any]], b: list[dict[str, Any]], key: str, draws: int, seed: int = 0
) -> dict[str, Any]:
    """metric(a) - metric(b) on the same questions, with a paired bootstrap 95% interval."""
    from calibrated_lm.calibration import bootstrap_indices, percentile_interval

    ca, ya = _conf_correct(a)
    cb, yb = _conf_correct(b)
    point = _metric(ca, ya, key) - _metric(cb, yb, key)
    idx = bootstrap_indices(len(a), draws, seed)
    diffs = np.array([_metric(ca[i], ya[i], key) - _metric(cb[i], yb[i], key) for i in idx])
    lo, hi = percentile_interval(diffs)
    return {"diff": point, "ci95": [lo, hi], "differs": bool(lo > 0 or hi < 0)}


def _aligned(ra: dict, rb: dict, task: str) -> tuple[list, list]:
    keys = sorted(set(ra.get(task, {})) & set(rb.get(task, {})))
    return [ra[task][k] for k in keys], [rb[task][k] for k in keys]


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _metric_cells(e: dict[str, Any]) -> list[str]:
    """accuracy, ECE, RMS-CE (with CIs), confidence, T, ECE after T of one evaluation."""
    return [
        _ci(e, "accuracy"),
        _ci(e, "ece"),
        _ci(e, "rms_ce"),
        _fmt(e.get("mean_confidence")),
        _fmt(e.get("temperature")),
        _fmt(e.get("ece_after_T") or None),
    ]


def _ci(e: dict[str, Any], key: str) -> str:
    ci = e.get(f"{key}_ci95")
    return f"{e[key]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{e[key]:.3f}"


def write_report(work: Path, results: Path, *, bootstrap: int = 1000) -> dict[str, Any]:
    from calibrated_lm.evaluation.compare import compare_runs

    evals = _evals(work)
    if not evals:
        raise SystemExit(f"error: no finished evaluations under {work / 'evals'}")
    results.mkdir(parents=True, exist_ok=True)
    labels = [e["label"] for e in evals]
    comp = compare_runs(
        [e["path"] for e in evals], results / "compare_all", labels=labels, bootstrap=bootstrap
    )
    # The harness' acc_norm view: scores divided by the choice's length in characters. Same
    # samples, no new scoring; shown because summed log-probs of choices of different lengths
    # (HellaSwag) make the softmax over choices extreme whatever the model's knowledge.
    comp_norm = compare_runs(
        [e["path"] for e in evals],
        results / "compare_all_acc_norm",
        labels=labels,
        normalization="chars",
        bootstrap=bootstrap,
    )
    by_name = {e["name"]: e for e in evals}
    head = [n for n in ("base", _first(evals, 0.0), _first(evals, 0.1)) if n in by_name]
    if len(head) >= 2:
        compare_runs(
            [by_name[n]["path"] for n in head],
            results / "headline",
            labels=[by_name[n]["label"] for n in head],
            bootstrap=bootstrap,
        )
    for svg in results.rglob("*.svg"):  # PNGs are enough in git; SVGs are 5-10x larger
        svg.unlink()

    tasks = [t for t in TASKS if t in comp["tasks"]] + [t for t in comp["tasks"] if t not in TASKS]
    out: dict[str, Any] = {"tasks": tasks, "models": [], "settings": [], "claims": {}}
    for e in evals:
        row: dict[str, Any] = {
            "name": e["name"],
            "label": e["label"],
            "setting": e["setting"],
            "seed": e["seed"],
        }
        for t in tasks:
            entry = comp["tasks"][t]["runs"].get(e["label"])
            if entry:
                row[t] = {k: entry.get(k) for k in RUN_FIELDS}
        held = e.get("heldout")
        if held is None and (e["path"] / "heldout.json").exists():
            held = read_json(e["path"] / "heldout.json")
        row["heldout"] = held
        row["train_s"] = e.get("train_s")
        row["eval_s"] = read_json(e["path"] / "done.json").get("eval_s")
        out["models"].append(row)

    # Seeds pooled per setting: mean and (min, max) over seeds.
    settings: dict[str, list[dict[str, Any]]] = {}
    for row in out["models"]:
        settings.setdefault(row["setting"], []).append(row)
    for setting, rows in settings.items():
        s: dict[str, Any] = {"setting": setting, "seeds": [r["seed"] for r in rows]}
        for t in tasks:
            for k in METRIC_KEYS:
                vals = [r[t][k] for r in rows if t in r]
                if vals:
                    s.setdefault(t, {})[k] = {
                        "mean": float(np.mean(vals)),
                        "min": float(min(vals)),
                        "max": float(max(vals)),
                    }
        out["settings"].append(s)

    out["acc_norm"] = {
        t: {
            label: {k: e.get(k) for k in RUN_FIELDS if k not in ("nll", "rms_ce_after_T")}
            for label, e in comp_norm["tasks"][t]["runs"].items()
        }
        for t in tasks
        if t in comp_norm["tasks"]
    }
    out["lr_selection"] = _lr_selection(work)
    out["claims"] = _claims(work, evals, tasks, draws=bootstrap)
    out["curves"] = _curves(work, evals, results / "training_curves.png")
    out["bundle_profile"] = (
        read_json(work / "profile.json") if (work / "profile.json").exists() else None
    )
    write_json(results / "results.json", out)
    (results / "tables.md").write_text(_tables_md(out), encoding="utf-8")
    print(f"wrote {results / 'tables.md'} and {results / 'results.json'}")
    return out


def _lr_selection(work: Path) -> dict[str, Any] | None:
    """The ``full`` profile's learning-rate choice and each candidate run's held-out stats."""
    done = work / "select_lr" / "done.json"
    if not done.exists():
        return None
    sel = read_json(done)
    runs = []
    for d in sorted((work / "runs").glob("sft_lr*_eps0_s1")):  # plain eps 0, seed 1 only
        if (d / "done.json").exists():  # a unit killed before its marker has no lr on record
            runs.append({"lr": read_json(d / "done.json")["lr"], "run": d.name})
            runs[-1].update(read_json(d / "heldout.json"))
    runs.sort(key=lambda r: r["lr"])
    return {"lr": sel["lr"], "rule": sel.get("rule"), "candidates": runs}


def _first(evals: list[dict[str, Any]], eps: float) -> str | None:
    for e in evals:
        if (
            e.get("eps") == eps
            and e.get("temperature") is None
            and e.get("softcap") is None
            and e.get("seed") == 1
        ):
            return e["name"]
    return None


def _claims(
    work: Path, evals: list[dict[str, Any]], tasks: list[str], draws: int
) -> dict[str, Any]:
    """Paired bootstrap differences that test each claim, per task and metric."""
    by = {e["name"]: e for e in evals}

    def find(eps: float, seed: int, temperature=None, softcap=None) -> str | None:
        for e in evals:
            if (
                e.get("eps") == eps
                and e.get("seed") == seed
                and e.get("temperature") == temperature
                and e.get("softcap") == softcap
            ):
                return e["name"]
        return None

    pairs: list[tuple[str, str, str]] = []  # (claim, A, B): A - B
    seeds = sorted({e["seed"] for e in evals if e.get("seed") is not None})
    for s in seeds:
        sft = find(0.0, s)
        if sft and "base" in by:
            pairs.append(("1: SFT - base", sft, "base"))
        for eps in (0.1, 0.2):
            ls = find(eps, s)
            if ls and sft:
                pairs.append((f"2: LS {eps:g} - SFT", ls, sft))
            if ls and "base" in by:
                pairs.append((f"2: LS {eps:g} - base", ls, "base"))
        for eps in (0.0, 0.1):
            plain = find(eps, s)
            for t, c in ((0.5, None), (None, 32.0)):
                rem = find(eps, s, temperature=t, softcap=c)
                if rem and plain:
                    what = f"T={t:g}" if t else f"C={c:g}"
                    pairs.append((f"3: LS {eps:g} + {what} - LS {eps:g}", rem, plain))
    cache: dict[str, dict] = {}
    out: list[dict[str, Any]] = []
    for claim, a, b in pairs:
        for n in (a, b):
            if n not in cache:
                cache[n] = _records(by[n]["path"])
        for t in tasks:
            ra, rb = _aligned(cache[a], cache[b], t)
            if not ra:
                continue
            row = {"claim": claim, "a": by[a]["label"], "b": by[b]["label"], "task": t}
            for k in METRIC_KEYS:
                row[k] = paired_difference(ra, rb, k, draws)
            out.append(row)
    return {"pairs": out, "draws": draws}


def _curves(work: Path, evals: list[dict[str, Any]], png: Path) -> dict[str, Any]:
    """Per-step training curves of every SFT run with a metrics log, finished or not."""
    labels = {e["name"]: e["label"] for e in evals}
    runs = sorted(d for d in (work / "runs").glob("*") if (d / "metrics.jsonl").exists())
    if not runs:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    last: dict[str, Any] = {}
    for d in runs:
        lines = (d / "metrics.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines if x.strip()]
        if not recs:
            continue
        finished = (d / "done.json").exists()
        label = labels.get(d.name, d.name + ("" if finished else " (unfinished)"))
        steps = [r["step"] for r in recs]
        for ax, key in zip(axes, ("loss", "confidence", "accuracy")):
            ax.plot(steps, [r[key] for r in recs], label=label, lw=1.2)
        finite = [
            r for r in recs if r["loss"] == r["loss"] and r.get("grad_norm") == r.get("grad_norm")
        ]
        first_nan = next(
            (
                r["step"]
                for r in recs
                if not (r["loss"] == r["loss"] and r.get("grad_norm") == r.get("grad_norm"))
            ),
            None,
        )
        last[d.name] = {
            "finished": finished,
            "steps_logged": recs[-1]["step"],
            "first_nonfinite_step": first_nan,
            "last_finite": {k: finite[-1][k] for k in ("step", "loss", "confidence", "accuracy")}
            if finite
            else None,
            "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in recs])),
            "median_target_tokens_per_step": float(np.median([r["target_tokens"] for r in recs])),
        }
    for ax, title in zip(
        axes,
        ("training loss (with its eps/T/C)", "mean token confidence", "token accuracy"),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return last


def _tables_md(out: dict[str, Any]) -> str:
    from calibrated_lm.evaluation.report import markdown_table

    tasks = out["tasks"]
    lines = ["## Main table (seeds pooled: mean, with min-max over seeds when 2+)", ""]
    header = ["setting", "seeds"] + [f"{t} {METRIC_NAMES[k]}" for t in tasks for k in METRIC_KEYS]
    rows = []
    for s in out["settings"]:
        cells = [s["setting"], ",".join(str(x) for x in s["seeds"] if x is not None) or "-"]
        for t in tasks:
            for k in METRIC_KEYS:
                v = s.get(t, {}).get(k)
                if v is None:
                    cells.append("-")
                elif v["min"] != v["max"]:
                    cells.append(f"{v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})")
                else:
                    cells.append(f"{v['mean']:.3f}")
        rows.append(cells)
    lines += [markdown_table(header, rows), ""]

    for t in tasks:
        lines += [f"## {t}: every model, 95% bootstrap CIs, temperature fitted on validation", ""]
        header = ["model", "n", "accuracy", "ECE", "RMS-CE", "conf", "T", "ECE after T"]
        rows = []
        for m in out["models"]:
            e = m.get(t)
            if not e:
                continue
            rows.append([m["label"], str(e["n"]), *_metric_cells(e)])
        lines += [markdown_table(header, rows), ""]

    if out.get("acc_norm"):
        lines += [
            "## Length-normalised scores (acc_norm: log-likelihood / characters), same samples",
            "",
        ]
        header = ["task", "model", "accuracy", "ECE", "RMS-CE", "conf", "T", "ECE after T"]
        rows = []
        for t, runs in out["acc_norm"].items():
            for label, e in runs.items():
                rows.append([t, label, *_metric_cells(e)])
        lines += [markdown_table(header, rows), ""]

    pairs = out["claims"].get("pairs", [])
    if pairs:
        lines += [
            "## Paired differences (A - B on the same questions, paired bootstrap 95% CI; "
            "* = interval excludes 0)",
            "",
        ]
        header = ["claim", "task", "A", "d accuracy", "d ECE", "d RMS-CE"]
        rows = []
        for p in pairs:
            cells = [p["claim"], p["task"], p["a"]]
            for k in METRIC_KEYS:
                d = p[k]
                star = "*" if d["differs"] else ""
                cells.append(f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]{star}")
            rows.append(cells)
        lines += [markdown_table(header, rows), ""]

    sel = out.get("lr_selection")
    if sel:
        lines += [f"## Learning rate: {sel['lr']:g} ({sel['rule']})", ""]
        header = ["lr", "held-out NLL", "token acc", "mean conf", "conf - acc"]
        rows = [
            [
                f"{c['lr']:g}",
                _fmt(c["nll"], 4),
                _fmt(c["accuracy"]),
                _fmt(c["mean_confidence"]),
                f"{c['overconfidence']:+.3f}",
            ]
            for c in sel["candidates"]
        ]
        lines += [markdown_table(header, rows), ""]

    lines += [
        "## Held-out SFT responses (token level: plain cross-entropy, eps = 0)",
        "",
    ]
    header = ["model", "NLL", "token acc", "mean conf", "conf - acc", "SFT s", "eval s"]
    rows = []
    for m in out["models"]:
        h = m.get("heldout")
        if not h:
            continue
        rows.append(
            [
                m["label"],
                _fmt(h["nll"]),
                _fmt(h["accuracy"]),
                _fmt(h["mean_confidence"]),
                f"{h['overconfidence']:+.3f}",
                _fmt(m.get("train_s"), 1),
                _fmt(m.get("eval_s"), 1),
            ]
        )
    lines += [markdown_table(header, rows), ""]
    return "\n".join(lines)
