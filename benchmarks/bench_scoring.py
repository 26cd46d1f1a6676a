"""The scoring phase of ``calibrated-lm eval``: this checkout against an earlier ``scoring.py``.

Both implementations score the same questions with the same model in one process, one after
the other, through the same automatic batch plan and out-of-memory back-off as
``calibrated-lm eval``: the rows, padded-token budget and windows of ``runner._batch_plan``,
eval's question order, and its window ramp (``runner.window_bounds``). Each version runs
twice, in A-B-B-A order, and keeps its faster run; the report gives each one's seconds and
questions/s, their ratio, the final batch size, and the largest difference between their
scores.

The model is a real one (``--model``) or, with ``--random-config DIR --tokenizer DIR``,
a randomly initialised model of that configuration in bf16: scoring time depends on shapes
(vocabulary, width, depth, sequence lengths), not on the weights, so a config and a tokenizer
are enough to time the experiment's model where its weights are not at hand.

    python benchmarks/bench_scoring.py --before old_scoring.py --random-config cfg.json \\
        --tokenizer toks/gemma-3-270m --tasks mmlu,arc_easy,hellaswag --device cuda \\
        --out benchmarks/results/scoring_h100.md --json scoring_h100.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("scoring_before", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.random_config:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if not args.tokenizer:
            raise SystemExit("error: --random-config needs --tokenizer DIR")
        cfg = AutoConfig.from_pretrained(args.random_config)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        return model.to(args.device).eval(), AutoTokenizer.from_pretrained(args.tokenizer)
    from calibrated_lm.models.loading import load_model

    return load_model(args.model, dtype="auto", device=args.device)


def _score_all(score_items, model, encoder, items, plan, max_len, device) -> dict[str, Any]:
    """Every window through ``score_items``, halving an automatic batch on OOM as eval does."""
    from calibrated_lm.evaluation.runner import _score_with_backoff, window_bounds

    rows, tokens, window_n, _ = plan
    state = {"batch": rows, "tokens": tokens, "auto": True}
    scores: list[list[float]] = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start, end in window_bounds(len(items), window_n):  # eval's own windows
        window = items[start:end]
        scores += _score_with_backoff(model, encoder, window, state, max_len, score_items)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    return {"seconds": sec, "qps": len(items) / sec, "final_batch": state["batch"], "s": scores}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="an earlier scoring.py")
    ap.add_argument("--before-label", default="before")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--random-config", type=Path, default=None, help="folder with config.json")
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--tasks", default="mmlu,arc_easy,hellaswag")
    ap.add_argument("--limit", type=int, default=None, help="questions per task (MMLU: subject)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="Markdown report")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from calibrated_lm.evaluation import scoring as after
    from calibrated_lm.evaluation.runner import _batch_plan, _row_chars
    from calibrated_lm.evaluation.tasks import build_items, parse_task_list

    before = _load_module(args.before)
    model, tok = _model(args)
    encoder = after.make_encoder(tok, model, chat=False)
    max_len = after.model_max_length(model, tok)
    items = []
    for task in parse_task_list(args.tasks):
        items += build_items(task, limit=args.limit, num_fewshot=0)
    packs = after.supports_packing(model)
    items.sort(key=lambda it: -_row_chars(it, packs))  # eval's order
    plan = _batch_plan("auto", args.device)
    print(f"{len(items)} questions, batch plan {plan[:3]}, device {args.device}", flush=True)

    # A-B-B-A: each version is timed once in the first half and once in the second, so warm-up
    # (allocator, kernels, caches), which the first run pays, is shared evenly; per version the
    # report keeps the faster of its two runs.
    impls = {args.before_label: before, "this checkout": after}
    runs: dict[str, dict[str, Any]] = {}
    for label in (args.before_label, "this checkout", "this checkout", args.before_label):
        r = _score_all(impls[label].score_items, model, encoder, items, plan, max_len, args.device)
        print(f"{label}: {r['seconds']:.2f} s, {r['qps']:.1f} q/s", flush=True)
        if label not in runs or r["seconds"] < runs[label]["seconds"]:
            runs[label] = r
    a, b = runs[args.before_label], runs["this checkout"]
    diff = max(abs(x - y) for sa, sb in zip(a["s"], b["s"]) for x, y in zip(sa, sb))
    same_argmax = sum(
        max(range(len(sa)), key=sa.__getitem__) == max(range(len(sb)), key=sb.__getitem__)
        for sa, sb in zip(a["s"], b["s"])
    )
    gpu = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {platform.machine()}"
    )
    res = {
        "device": gpu,
        "torch": torch.__version__,
        "model": str(args.random_config or args.model),
        "random_weights": bool(args.random_config),
        "tasks": args.tasks,
        "limit": args.limit,
        "questions": len(items),
        "runs": {
            k: {kk: v[kk] for kk in ("seconds", "qps", "final_batch")} for k, v in runs.items()
        },
        "speedup": a["seconds"] / b["seconds"],
        "max_abs_score_diff": diff,
        "same_prediction": same_argmax,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    if args.out:
        lines = [
            f"# Scoring phase: this checkout vs {args.before_label} ({gpu})",
            "",
            f"`python benchmarks/bench_scoring.py {' '.join(sys.argv[1:])}`, model `{res['model']}`"
            + (" (random bf16 weights of that configuration)" if res["random_weights"] else "")
            + f", {len(items)} questions, torch {torch.__version__}.",
            "",
            "| code | seconds | questions/s | final batch |",
            "|---|---|---|---|",
        ]
        for k, v in res["runs"].items():
            lines.append(f"| {k} | {v['seconds']:.2f} | {v['qps']:.1f} | {v['final_batch']} |")
        lines += [
            "",
            f"Speed-up: {res['speedup']:.2f}x. Largest score difference: {diff:.2e} nats; the "
            f"same predicted choice on {same_argmax} of {len(items)} questions.",
            "",
        ]
        args.out.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
