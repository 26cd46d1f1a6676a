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
        "Rerunning the same command resumes where it stopped; a rerun with another model, "
        "dtype, chat template, few-shot count or split is refused (see --overwrite).",
    )
    p.add_argument(
        "--model",
        default=None,
        help="smollm2-135m-instruct, gemma-3-270m, a .gguf file, a model folder or a hub id",
    )
    p.add_argument(
        "--model_args",
        "--model-args",
        default=None,
        metavar="pretrained=M,dtype=D",
        help="lm-evaluation-harness spelling: pretrained= (the model) and dtype= are read, "
        "other keys are refused",
    )
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated: mmlu (or one subject, e.g. mmlu_anatomy), arc_easy, "
        "arc_challenge, hellaswag, piqa, sciq, openbookqa, winogrande, boolq, commonsense_qa, "
        "social_iqa (the task files of calibrated_lm/evaluation/tasks/), a task file "
        "FILE.yaml, a FILE.jsonl of {context, choices, label} lines, or a BIG-bench FILE.json",
    )
    p.add_argument(
        "--output",
        "--output_path",
        "--output-path",
        type=Path,
        default=None,
        help="run folder (default runs/<model>)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="score this split instead of each task's default (test where shipped), "
        "e.g. validation",
    )
    p.add_argument(
        "--limit",
        type=_limit,
        default=None,
        help="first N questions per task/subject; below 1, that fraction of them (as the "
        "harness' --limit 0.1)",
    )
    p.add_argument("--num-fewshot", "--num_fewshot", type=int, default=0)
    p.add_argument(
        "--chat-template",
        default="off",
        metavar="off|on|auto|FILE",
        help="off (default, as lm-evaluation-harness): the plain harness prompt; on: the "
        "tokenizer's chat template; auto: it if the tokenizer has one; FILE: the Jinja "
        "template in FILE (e.g. the one `train` saved with a fine-tuned model)",
    )
    p.add_argument(
        "--apply-chat-template",
        "--apply_chat_template",
        dest="chat_template",
        action="store_const",
        const="on",
        help="lm-evaluation-harness spelling of --chat-template on",
    )
    p.add_argument(
        "--log_samples",
        "--log-samples",
        action="store_true",
        help="accepted for lm-evaluation-harness compatibility: samples.jsonl is always written",
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
    p.add_argument(
        "--batch-size", "--batch_size", default="auto", help="auto or rows per forward pass"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    # None (auto) unless given, so that a --model_args dtype= that differs can be refused.
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(chat_template="off")
    p.add_argument(
        "--fit-split",
        action="store_true",
        help="also score each task's whole validation split (samples_validation.jsonl; "
        "--limit does not apply to it) so that `calibrated-lm compare` can fit a temperature "
        "on it (a task without a validation split gets none)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start the run folder over: once the model is loaded, its earlier samples, "
        "summary and report are removed (instead of refusing a run whose model or protocol "
        "differs from theirs)",
    )
    p.add_argument(
        "--head-subset",
        default=None,
        metavar="FILE",
        help="head_subset.json (or a folder holding one): each score is a log-softmax over "
        "its V' kept tokens only (a choice token outside it is refused). Default: the model "
        "folder's own head_subset.json, which `calibrated-lm train --head-subset` saves; "
        "give it to score a base model with the same restriction",
    )
    p.add_argument(
        "--uncovered",
        choices=["error", "skip"],
        default="error",
        help="with a head subset, a question with a choice token outside it: error (default) "
        "refuses the run before scoring; skip leaves it out, counted per task in the summary "
        "and report (a task with no question left is refused)",
    )
    p.add_argument(
        "--logit-softcap",
        type=float,
        default=None,
        metavar="C",
        help="score log-softmax(C tanh(z / C)) (then any --logit-temperature), e.g. a model "
        "trained with --softcap C scored with it applied; z are the model's logits, already "
        "capped by its own final_logit_softcapping if its config has one (Gemma 2/3), and "
        "restricted to the head subset if any",
    )
    p.add_argument(
        "--logit-temperature",
        type=float,
        default=None,
        metavar="T",
        help="score log-softmax(z / T), e.g. a model trained with --temperature T scored with "
        "it applied (after --logit-softcap)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)


def _limit(text: str) -> int | float:
    """``--limit``: a whole count, or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    if value < 1:
        return value
    if value != int(value):
        raise argparse.ArgumentTypeError(f"a count of at least 1 must be whole, got {text}")
    return int(value)


def model_from_args(model: str | None, model_args: str | None) -> tuple[str, str | None]:
    """(model, dtype or None) from ``--model`` and/or the harness' ``--model_args``."""
    from calibrated_lm.errors import UserError

    dtype = None
    if model_args:
        keys = {}
        for part in model_args.split(","):
            if not part.strip():
                continue
            k, sep, v = part.partition("=")
            if not sep:
                raise UserError(f"--model_args: {part!r} is not KEY=VALUE")
            keys[k.strip()] = v.strip()
        unknown = sorted(set(keys) - {"pretrained", "dtype"})
        if unknown:
            raise UserError(
                f"--model_args: {', '.join(unknown)} not supported (pretrained= and dtype= are)"
            )
        if "pretrained" in keys:
            if model and model != keys["pretrained"]:
                raise UserError("--model and --model_args pretrained= name different models")
            model = keys["pretrained"]
        dtype = keys.get("dtype")
        if dtype == "auto":
            dtype = None
        if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"--model_args dtype={dtype}: choose auto, float32, bfloat16, float16")
    if not model:
        raise UserError("give the model: --model M (or --model_args pretrained=M)")
    return model, dtype


def run(args: argparse.Namespace) -> int:
    from calibrated_lm.errors import UserError
    from calibrated_lm.evaluation.distributed import dist_info
    from calibrated_lm.evaluation.runner import EvalConfig, run_eval

    # The harness' `--model hf --model_args pretrained=X`: "hf" names its backend, not a model.
    model_arg = None if args.model == "hf" and args.model_args else args.model
    model, dtype = model_from_args(model_arg, args.model_args)
    if dtype is not None:
        if args.dtype not in (None, dtype):
            raise UserError(
                f"--dtype {args.dtype} and --model_args dtype={dtype} differ; give one of them"
            )
        args.dtype = dtype
    args.dtype = args.dtype or "auto"
    output = args.output or Path("runs") / Path(str(model)).name.replace(".gguf", "")
    cfg = EvalConfig(
        model=model,
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
        overwrite=args.overwrite,
        head_subset=args.head_subset,
        uncovered=args.uncovered,
        logit_softcap=args.logit_softcap,
        logit_temperature=args.logit_temperature,
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
    subset = summary["protocol"].get("head_subset")
    if subset:
        print(
            f"head subset: softmax over V' = {subset['size']} of {subset['vocab_size']} tokens "
            f"({subset['path']}, sha256 {subset['sha256'][:12]}...)"
        )
    from calibrated_lm.evaluation.report import scoring_notes

    for note in scoring_notes(summary["protocol"]):
        print(note)
    qps = timing["questions_per_s"]
    print(
        f"scored {timing['questions_scored_this_run']} questions in {timing['scoring_s']} s"
        + (f" ({qps} questions/s)" if qps else "")
        + f"; total {timing['total_s']} s"
    )
    if timing.get("questions_rescored_after_a_change"):
        n = timing["questions_rescored_after_a_change"]
        print(f"of which {n} re-scored because their question changed since it was scored")
    for paths in summary["_diagrams"].values():
        png = [p for p in paths if p.endswith(".png")][0]
        print(f"reliability diagram: {png}")
    print(f"report: {output / 'report.md'}  summary: {output / 'summary.json'}")
    return 0
