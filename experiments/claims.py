"""``experiments/results/claims.json``: every tested claim as one checkable record, and the
tables generated from it.

A record is ``{"claim": "1"|"2"|"3"|"control", "setting": str, "task": str, "metric": str,
"a": float, "b": float, "delta": float, "ci95": [lo, hi], "verdict": str}``: ``b`` is the
treatment (instruct model, SFT dose, label smoothing), ``a`` its reference, ``delta = b - a``
with a paired bootstrap 95% interval. Each experiment's report replaces its own records
(``source``) and leaves the others'. ``render`` writes the markdown tables that the README
and ``docs/results.md`` show, between ``<!-- claims:KEY:start -->`` and ``<!-- claims:KEY:end
-->`` markers, so no number there is typed by hand.

    python experiments/claims.py render [--readme README.md] [--docs docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "experiments" / "results" / "claims.json"
FIELDS = ("claim", "setting", "task", "metric", "a", "b", "delta", "ci95", "verdict")
CLAIM_NAMES = ("1", "2", "3", "control")
METRIC_LABELS = {
    "accuracy": "accuracy",
    "ece": "ECE",
    "rms_ce": "RMS-CE",
    "brier": "Brier",
    "nll": "NLL",
    "mean_confidence": "mean confidence",
    "token_gap": "held-out token gap (conf - acc)",
    "token_nll": "held-out token NLL",
    # Claim 3: a and b are the smoothing effects D = ECE(eps 0.1) - ECE(eps 0) of two arms.
    "d_ece_contrast": "D = ECE(eps 0.1) - ECE(eps 0)",
}


def verdict_of(delta: float, ci: Sequence[float]) -> str:
    """``higher`` / ``lower`` when the 95% interval excludes 0, else ``no clear change``."""
    lo, hi = ci
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "no clear change"


def record(
    claim: str,
    setting: str,
    task: str,
    metric: str,
    a: float,
    b: float,
    ci95: Sequence[float],
    verdict: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One claims record (``delta`` = b - a; ``verdict`` from the interval unless given)."""
    if claim not in CLAIM_NAMES:
        raise ValueError(f"claim must be one of {CLAIM_NAMES}, not {claim!r}")
    out = {
        "claim": claim,
        "setting": setting,
        "task": task,
        "metric": metric,
        "a": float(a),
        "b": float(b),
        "delta": float(b) - float(a),
        "ci95": [float(ci95[0]), float(ci95[1])],
        "verdict": verdict or verdict_of(float(b) - float(a), ci95),
    }
    out.update(extra)
    return out


def check_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate records (fields, types, finite numbers); a problem names the record."""
    out = []
    for i, r in enumerate(records):
        missing = [f for f in FIELDS if f not in r]
        if missing:
            raise ValueError(f"claims record {i}: missing {', '.join(missing)}")
        for f in ("a", "b", "delta"):
            if not isinstance(r[f], int | float) or not math.isfinite(r[f]):
                raise ValueError(f"claims record {i}: {f} must be a finite number, got {r[f]!r}")
        if not (isinstance(r["ci95"], list) and len(r["ci95"]) == 2):
            raise ValueError(f"claims record {i}: ci95 must be [lo, hi]")
        out.append(r)
    return out


def update(records: list[dict[str, Any]], source: str, path: Path = CLAIMS) -> Path:
    """Replace the records of ``source`` in ``path`` by ``records`` (validated)."""
    check_records(records)
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    kept = [r for r in old if r.get("source") != source]
    new = kept + [{**r, "source": source} for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(new, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _ci(r: dict[str, Any], digits: int = 3) -> str:
    lo, hi = r["ci95"]
    return f"{r['delta']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def table(records: Sequence[dict[str, Any]], digits: int = 3) -> str:
    """Markdown: setting, task, metric, a, b, delta [95% CI], verdict."""
    lines = [
        "| setting | task | metric | a | b | b - a [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['setting']} | {r['task']} | {METRIC_LABELS.get(r['metric'], r['metric'])} | "
            f"{r['a']:.{digits}f} | {r['b']:.{digits}f} | {_ci(r, digits)} | {r['verdict']} |"
        )
    return "\n".join(lines)


def blocks(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The generated markdown blocks, by marker key."""
    out: dict[str, str] = {}
    c1 = [r for r in records if r["claim"] == "1"]
    if c1:
        out["claim1"] = table(c1)
    ctl = [r for r in records if r["claim"] == "control" and r.get("headline")]
    if ctl:
        out["control"] = table(ctl)
    full = [r for r in records if r["claim"] == "control"]
    if full:
        out["control_full"] = table(full)
    c2 = [r for r in records if r["claim"] == "2" and r.get("headline")]
    if c2:
        out["claim2"] = table(c2)
    # Every claim-3 test, not only the headline: the README's claim-3 section shows the
    # primary test beside the 65,536 dose point and the remedies (six rows at most).
    c3 = [r for r in records if r["claim"] == "3"]
    if c3:
        out["claim3"] = table(c3)
    return out


def render_into(path: Path, generated: dict[str, str]) -> list[str]:
    """Replace each ``<!-- claims:KEY:start -->...<!-- claims:KEY:end -->`` block in ``path``;
    returns the keys replaced."""
    text = path.read_text(encoding="utf-8")
    done = []
    for key, body in generated.items():
        k = re.escape(key)
        pat = re.compile(rf"(<!-- claims:{k}:start -->).*?(<!-- claims:{k}:end -->)", re.S)
        if pat.search(text):
            text = pat.sub(lambda m, b=body: f"{m.group(1)}\n{b}\n{m.group(2)}", text)
            done.append(key)
    path.write_text(text, encoding="utf-8")
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="write the tables generated from claims.json")
    r.add_argument("--claims", type=Path, default=CLAIMS)
    r.add_argument("--readme", type=Path, default=ROOT / "README.md")
    r.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args(argv)
    records = check_records(json.loads(args.claims.read_text(encoding="utf-8")))
    gen = blocks(records)
    md = args.claims.with_suffix(".md")
    md.write_text(
        "# Claims (generated from claims.json by experiments/claims.py)\n\n"
        + "\n\n".join(f"## {k}\n\n{v}" for k, v in gen.items())
        + "\n",
        encoding="utf-8",
    )
    for p in (args.readme, args.docs):
        if p.exists():
            print(f"{p}: replaced {', '.join(render_into(p, gen)) or 'nothing'}")
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
