"""Claim 1 on official checkpoints: Llama-3.1-70B base vs Instruct on MMLU (CPU, seconds).

Reads the published 5-shot MMLU letter logits of both models
(``../shared/data/public_logits/``; source and licence in its README) with
:mod:`calibrated_lm.calibration.letter_logits`, pairs the 14,042 questions, and reports
accuracy, ECE, RMS-CE, Brier, NLL and mean confidence of each model with the paired bootstrap
difference Instruct - base (:func:`calibrated_lm.calibration.paired.paired_bootstrap`, 1,000
draws), overall and per subject, the overlaid reliability diagrams, and the claims records
(``claims.json``, source ``claim1``). The criterion was pre-registered in
``docs/issue12_plan.md``.

    python experiments/claim1_public_logits.py [--logits ../shared/data/public_logits]
        [--results experiments/results/claim1_llama31_70b]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "ece", "rms_ce", "brier", "nll", "mean_confidence")


def probabilities(records: list) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4) softmax of the letter logits (SampleRecords), gold indices."""
    z = np.array([r.choice_logprobs for r in records], dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True), np.array([r.label for r in records])


def pair(base: list, inst: list, base_dir: Path, inst_dir: Path) -> tuple:
    """Both models' records in one question order; a question missing on one side, or a gold
    letter that differs, is an error naming it."""
    from calibrated_lm.errors import UserError

    bi = {r.id: r for r in base}
    ii = {r.id: r for r in inst}
    only = sorted(set(bi) ^ set(ii))
    if only:
        side = base_dir if only[0] in bi else inst_dir
        raise UserError(
            f"{len(only)} questions are in one folder only (first: {only[0]} in {side})"
        )
    keys = sorted(bi)
    for k in keys:
        if bi[k].label != ii[k].label:
            raise UserError(f"question {k}: gold letter differs between {base_dir} and {inst_dir}")
    return [bi[k] for k in keys], [ii[k] for k in keys]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--logits", type=Path, default=ROOT.parent / "shared/data/public_logits")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments/results/claim1_llama31_70b")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--claims", type=Path, default=C.CLAIMS)
    args = ap.parse_args(argv)

    from calibrated_lm.calibration import reliability_diagram
    from calibrated_lm.calibration.letter_logits import read_letter_logits
    from calibrated_lm.calibration.paired import paired_bootstrap
    from calibrated_lm.errors import UserError

    t0 = time.perf_counter()
    try:
        base_dir, inst_dir = args.logits / "llama31_70b_base", args.logits / "llama31_70b"
        base, inst = pair(
            read_letter_logits(base_dir), read_letter_logits(inst_dir), base_dir, inst_dir
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pa, y = probabilities(base)
    pb, _ = probabilities(inst)
    print(f"{len(y):,} paired MMLU questions; bootstrapping ({args.bootstrap} draws) ...")
    overall = paired_bootstrap(pa, pb, y, draws=args.bootstrap, seed=0)
    subjects = sorted({r.subject for r in base})
    per_subject = {}
    for s in subjects:
        idx = np.array([i for i, r in enumerate(base) if r.subject == s])
        per_subject[s] = paired_bootstrap(pa[idx], pb[idx], y[idx], draws=args.bootstrap, seed=0)

    setting = "Llama-3.1-70B -> Llama-3.1-70B-Instruct (MMLU 5-shot letters)"
    recs = [
        C.record(
            "1",
            setting,
            "mmlu",
            m,
            overall[m]["a"],
            overall[m]["b"],
            overall[m]["ci95"],
            headline=True,
        )  # fmt: skip
        for m in METRICS
    ]
    ece, rms = overall["ece"], overall["rms_ce"]
    if ece["ci95"][0] > 0 and rms["ci95"][0] > 0:
        verdict = "reproduced"
    elif ece["ci95"][1] <= 0 or rms["ci95"][1] <= 0:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    n_up = sum(per_subject[s]["ece"]["ci95"][0] > 0 for s in subjects)
    n_down = sum(per_subject[s]["ece"]["ci95"][1] < 0 for s in subjects)

    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    conf_a, corr_a = pa.max(1), (pa.argmax(1) == y).astype(float)
    conf_b, corr_b = pb.max(1), (pb.argmax(1) == y).astype(float)
    reliability_diagram(
        {"Llama-3.1-70B (base)": (conf_a, corr_a), "Llama-3.1-70B-Instruct": (conf_b, corr_b)},
        out / "reliability_mmlu",
        title="MMLU 5-shot, published letter logits",  # the diagram adds n itself
    )
    summary = {
        "claim": "1",
        "criterion": "docs/issue12_plan.md: Instruct - base ECE and RMS-CE both > 0 with paired "
        "95% intervals excluding 0",
        "verdict": verdict,
        "n": int(len(y)),
        "overall": overall,
        "subjects_ece_higher": int(n_up),
        "subjects_ece_lower": int(n_down),
        "per_subject": per_subject,
        "source": {
            "base": str(base_dir.relative_to(args.logits.parent.parent)),
            "instruct": str(inst_dir.relative_to(args.logits.parent.parent)),
        },
        "bootstrap": args.bootstrap,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    lines = [
        "# Claim 1 on official checkpoints: Llama-3.1-70B base vs Instruct, MMLU",
        "",
        f"Generated by `experiments/claim1_public_logits.py` from the published 5-shot letter "
        f"logits ({len(y):,} paired questions; `../shared/data/public_logits/`). Paired "
        f"bootstrap, {args.bootstrap} draws over questions; ECE/RMS-CE with 15 equal-width "
        "bins.",
        "",
        C.table(recs),
        "",
        f"Verdict (pre-registered criterion): **{verdict}**. Per subject, Instruct's ECE is "
        f"higher with an interval excluding 0 in {n_up} of {len(subjects)} subjects and lower "
        f"in {n_down}.",
        "",
        "![reliability](reliability_mmlu.png)",
        "",
    ]
    (out / "tables.md").write_text("\n".join(lines), encoding="utf-8")
    C.update(recs, source="claim1", path=args.claims)
    print(C.table(recs))
    print(f"verdict: {verdict}; per subject ECE higher in {n_up}, lower in {n_down}")
    print(f"wrote {out} and {args.claims} in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
