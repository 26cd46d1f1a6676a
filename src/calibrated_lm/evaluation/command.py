"""``calibrated-lm eval``: calibration of a causal LM on multiple-choice benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score multiple-choice benchmarks with a causal LM and report its calibration",
        description="Score each choice's log-likelihood (lm-evaluation-harness prompts and "
        "conventions), write samples.jsonl, summary.json, reliability diagrams and report.md. "
        "Rerunning the same command resumes where it stopped.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="smollm2-135m-instruct, gemma-3-270m, a .gguf file, a model folder or a hub id",
    )
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated: mmlu, arc_easy, arc_challenge, hellaswag, piqa, sciq, "
        "openbookqa, winogrande, boolq, commonsense_qa, social_iqa, or FILE.jsonl",
    )
    p.add_argument("--output", type=Path, default=None, help="run folder (default runs/<model>)")
    p.add_argument(
        "--split",
        default=None,
        help="score this split instead of each task's default (test where shipped), "
        "e.g. validation",
    )
    p.add_argument("--limit", type=int, default=None, help="first N questions per task/subject")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument(
        "--chat-template",
        default="auto",
        metavar="auto|on|off|FILE",
        help="render prompts with the tokenizer's chat template (auto: if it has one), or "
        "with the Jinja template in FILE (e.g. the one `train` saved with a fine-tuned model)",
    )
    p.add_argument(
        "--normalization",
        choices=["none", "chars", "tokens"],
        default="none",
        help="choice scores: summed log-likelihood (none, the harness' acc), per character "
        "(chars, its acc_norm) or per continuation token (tokens)",
    )
    p.add_argument("--n-bins", type=int, default=15)
    p.add_argument("--binning", choices=["width", "mass"], default="width")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for the CIs")
    p.add_argument("--batch-size", default="auto", help="auto or rows per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--fit-split",
        action="store_true",
        help="also score each task's validation split (samples_validation.jsonl) so that "
        "`calibrated-lm compare` can fit a temperature on it",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from calibrated_lm.evaluation.distributed import dist_info
    from calibrated_lm.evaluation.runner import EvalConfig, run_eval

    output = args.output or Path("runs") / Path(str(args.model)).name.replace(".gguf", "")
    cfg = EvalConfig(
        model=args.model,
        tasks=[args.tasks],
        output=output,
        limit=args.limit,
        split=args.split,
        num_fewshot=args.num_fewshot,
        chat_template=args.chat_template,
        normalization=args.normalization,
        n_bins=args.n_bins,
        binning=args.binning,
        bootstrap=args.bootstrap,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        fit_split=args.fit_split,
        progress=not args.no_progress,
    )
    summary = run_eval(cfg)
    if not dist_info().is_main:
        return 0
    timing = summary["protocol"]["timing"]
    print()
    print(summary["_table"])
    print()
    chat = summary["protocol"]["chat_template_used"]
    print(f"chat template: {'used' if chat else 'not used'} (--chat-template {args.chat_template})")
    qps = timing["questions_per_s"]
    print(
        f"scored {timing['questions_scored_this_run']} questions in {timing['scoring_s']} s"
        + (f" ({qps} questions/s)" if qps else "")
        + f"; total {timing['total_s']} s"
    )
    for paths in summary["_diagrams"].values():
        png = [p for p in paths if p.endswith(".png")][0]
        print(f"reliability diagram: {png}")
    print(f"report: {output / 'report.md'}  summary: {output / 'summary.json'}")
    return 0
