"""``calibrated-lm capacity``: how confident can a model's output head make each token?"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from calibrated_lm.calibration.jsonfile import write_json
from calibrated_lm.errors import UserError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "capacity",
        help="over-confidence capacity of a model's output head (confidence ceiling, LS reach)",
        description=(
            "From the output head W and final norm gain g of MODEL, compute D, V, V/D, the "
            "confidence ceiling and entropy at it per sampled target token (exact convex "
            "optimisation over the normalised hidden state), closed-form bounds, and which "
            "tokens can reach the label-smoothing optimum for each eps. See docs/theory.md."
        ),
    )
    p.add_argument("--model", required=True, help="embedded name, .gguf file, folder or hub id")
    p.add_argument("--samples", type=int, default=128, help="target tokens sampled (default 128)")
    p.add_argument("--eps", default="0.05,0.1,0.2", help="label smoothing values, comma-separated")
    p.add_argument("--output", type=Path, default=None, help="folder (default runs/capacity/NAME)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=128, help="tokens optimised at once")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.set_defaults(run=run)


def _parse_eps(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--eps must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < e < 1 for e in values):
        raise UserError(f"--eps values must lie strictly between 0 and 1, got {text!r}")
    return values


def format_report(summary: dict[str, Any]) -> str:
    """Human-readable table of a :meth:`CapacityReport.summary`."""
    c, cf = summary["ceiling"], summary["closed_form"]
    lines = [
        f"V = {summary['vocab']}   D = {summary['dim']}   V/D = {summary['v_over_d']:.1f}",
        f"final norm: {summary['norm_type']}, max|g| = {summary['max_abs_gain']:.3g}; "
        f"||h|| <= sqrt(D) max|g| = {summary['ball_radius_sqrt_d_max_gain']:.3g}"
        + (f"; softcap {summary['softcap']:g}" if summary["softcap"] else ""),
        f"closed form (all tokens): logit range <= {cf['logit_range_bound']:.3g} nats, "
        f"max prob <= {cf['max_prob_bound']:.6g}, entropy >= {cf['entropy_floor_bound']:.3g} nats",
        f"sampled tokens: {summary['samples']}",
        f"confidence ceiling max_h p_y(h): min {c['min']:.6g}  p05 {c['p05']:.6g}  "
        f"median {c['median']:.6g}  max {c['max']:.6g}",
        "log10(1 - ceiling): median "
        f"{summary['log10_one_minus_ceiling']['median']:.3g} (max "
        f"{summary['log10_one_minus_ceiling']['max']:.3g})",
        f"entropy at the ceiling point: median {summary['entropy_at_ceiling']['median']:.3g} "
        f"nats; lowest found {summary['lowest_entropy_found'] + 0.0:.3g} nats",
        f"uniform margin max_h min_j (z_y - z_j): lower median "
        f"{summary['gap_lower']['median']:.3g}, upper median {summary['gap_upper']['median']:.3g}",
        f"can be argmax (certified): {summary['frac_can_be_argmax']:.1%}; "
        f"cannot beat all others by {summary['argmax_tolerance']:g} nats (certified): "
        f"{summary['frac_cannot_be_argmax']:.1%}",
        "",
        f"{'eps':>5} {'LS p_y':>9} {'LS gap':>7} {'reach p':>8} {'cannot p':>9} "
        f"{'reach gap':>10} {'cannot gap':>11}",
    ]
    for key, r in summary["reach_ls"].items():
        lines.append(
            f"{key:>5} {r['target_prob']:>9.6f} {r['target_gap']:>7.2f} "
            f"{r['frac_ceiling']:>8.1%} {r['frac_ceiling_impossible']:>9.1%} "
            f"{r['frac_gap']:>10.1%} {r['frac_gap_impossible']:>11.1%}"
        )
    lines.append(
        "reach p: ceiling >= 1-eps+eps/V (certified); reach gap: every other logit can be the LS "
        "gap below the target at once (certified); cannot: certified impossible."
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from calibrated_lm.models.loading import resolve_model
    from calibrated_lm.runlock import run_lock
    from calibrated_lm.training.config_checks import check_device

    # Every option, then the model's existence, before any folder is created or model loaded.
    eps = _parse_eps(args.eps)
    if args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    check_device(args.device)
    resolve_model(args.model)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(args.model)).name or str(args.model))
    out = Path(args.output or Path("runs") / "capacity" / name)
    _check_output(out, str(args.model))
    # Create the output folder first: an unwritable path fails before minutes of analysis.
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):  # one writer per output folder
        return _analyze(args, eps, out)


def _check_output(out: Path, model: str) -> None:
    """Refuse an --output that holds another command's run (:mod:`calibrated_lm.run_folders`)
    or another model's capacity results: they would be replaced. The same model's results
    are recomputed in place."""
    from calibrated_lm.run_folders import existing_summary, refuse_other_runs

    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder; give a folder for the results")
    refuse_other_runs(out, "capacity")
    old = existing_summary(out)
    if old is None:
        return
    if "reach_ls" not in old:
        raise UserError(
            f"--output {out} holds a summary.json that is not a capacity result; give another "
            "--output folder"
        )
    if old.get("model") != model:
        raise UserError(
            f"--output {out} holds the capacity results of model {old.get('model')}, which "
            f"this run of {model} would replace; give another --output folder"
        )


def _analyze(args: argparse.Namespace, eps: tuple[float, ...], out: Path) -> int:
    import torch

    from calibrated_lm.analysis.capacity import analyze_model
    from calibrated_lm.analysis.figure import plot_capacity
    from calibrated_lm.models.loading import load_model

    t0 = time.perf_counter()
    model, _ = load_model(args.model, dtype="float32", device=args.device)
    t1 = time.perf_counter()
    with torch.no_grad():
        report = analyze_model(
            model, samples=args.samples, eps=eps, seed=args.seed, batch=args.batch
        )
    timing = {"load_s": round(t1 - t0, 2), "analysis_s": round(time.perf_counter() - t1, 2)}
    summary = report.summary() | {"model": str(args.model), "seed": args.seed, "timing": timing}
    write_json(out / "summary.json", summary)
    per_token = {
        "token_ids": report.token_ids.tolist(),
        "log_ceiling": report.log_ceiling.tolist(),
        "log_ceiling_upper": report.log_ceiling_upper.tolist(),
        "log_one_minus_ceiling": report.log_one_minus_ceiling.tolist(),
        "entropy_at_ceiling": report.entropy_at_ceiling.tolist(),
        "gap_lower": report.gap_lower.tolist(),
        "gap_upper": report.gap_upper.tolist(),
    }
    write_json(out / "tokens.json", per_token, indent=None)
    paths = plot_capacity(
        report, out / "capacity", title=f"{args.model}: V={report.vocab}, D={report.dim}"
    )
    print(format_report(summary))
    if summary["samples"] < args.samples:
        print(
            f"note: --samples {args.samples} is more than the vocabulary's {summary['samples']} "
            "tokens, so every token was analysed once"
        )
    print(f"time: model load {timing['load_s']} s, analysis {timing['analysis_s']} s")
    print(f"wrote {out / 'summary.json'}, {out / 'tokens.json'}, {', '.join(map(str, paths))}")
    return 0
