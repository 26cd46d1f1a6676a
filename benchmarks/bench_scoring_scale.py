"""Scoring rate against model size (issue 15, goal 3): ``eval``'s scoring phase, one process.

Each model scores the same questions through ``eval``'s own automatic batch plan, question
order, windows and out-of-memory back-off (``bench_scoring._score_all``), after a warm-up
window. Recorded per model: parameters, seconds, questions/s, real tokens/s (the packed rows'
tokens, ``plan_rows``), and on CUDA the peak memory.

Models: the two embedded ones with their real weights (``smollm2-135m-instruct``,
``gemma-3-270m``) and random bf16 weights of the Gemma 3 1B, 4B and 12B text stacks (scoring
time depends on shapes, not weights), with gemma-3-270m's tokenizer, which the family shares.
Their shapes are in ``SHAPES``; the script checks the parameter count of each against the one
Keras-Hub's Gemma 3 presets publish (999,885,952 / 3,880,099,328 / 11,765,788,416), to 0.1%.

    python benchmarks/bench_scoring_scale.py --device cuda --tasks hellaswag,arc_easy \\
        --limit 500 --out scale_h200.md --json scale_h200.json
    python benchmarks/bench_scoring_scale.py --tiny --device cpu --limit 4 \
        --models gemma3-1b --tokenizer DIR   # a CPU check

``--tiny`` shrinks every random model to 2 layers of width 64 (no parameter check), and with
``--tokenizer`` to that tokenizer's vocabulary, so the script runs on a CPU in seconds. Results are written after each model, so a time-out keeps
the models done.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

# The Gemma 3 text stacks: width, MLP width, layers, query heads, key-value heads (head_dim
# 256, vocabulary 262,144, every 6th layer global as in gemma-3-270m), and the parameter count
# that Keras-Hub's presets give for each.
SHAPES: dict[str, dict[str, Any]] = {
    "gemma3-1b": dict(hidden=1152, mlp=6912, layers=26, heads=4, kv=1, params=999_885_952),
    "gemma3-4b": dict(hidden=2560, mlp=10240, layers=34, heads=8, kv=4, params=3_880_099_328),
    "gemma3-12b": dict(hidden=3840, mlp=15360, layers=48, heads=16, kv=8, params=11_765_788_416),
}
EMBEDDED = ("smollm2-135m-instruct", "gemma-3-270m")
TINY = dict(hidden=64, mlp=128, layers=2, heads=2, kv=1)


def _random_gemma(name: str, device: str, tiny: bool, vocab: int | None = None) -> Any:
    """Random bf16 weights of ``SHAPES[name]`` on gemma-3-270m's config (``configs/``);
    ``vocab`` replaces its vocabulary size (a tiny run's tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {**SHAPES[name], **(TINY if tiny else {})}
    base = json.loads((Path(__file__).resolve().parent / "configs/gemma-3-270m.json").read_text())
    if vocab is not None:
        base["vocab_size"] = vocab
    layer_types = [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
        for i in range(shape["layers"])
    ]
    base.update(
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        head_dim=16 if tiny else 256,
        layer_types=layer_types,
    )
    base.pop("architectures", None)
    config = AutoConfig.for_model(**{k: v for k, v in base.items() if not k.startswith("_")})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    # Initialised on the device: a 12B model's random init on the host would take minutes.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    if not tiny and abs(n - shape["params"]) > 1e-3 * shape["params"]:
        raise SystemExit(f"error: {name} has {n:,} parameters, not ~{shape['params']:,}")
    return model.eval()


def _model(
    name: str, device: str, tiny: bool, tokenizer: Path | None = None
) -> tuple[Any, Any, bool]:
    """(model, tokenizer, random weights?). A random model takes gemma-3-270m's tokenizer, or
    ``tokenizer``'s (then, in a tiny run, its vocabulary size)."""
    from transformers import AutoTokenizer

    from calibrated_lm.models.loading import load_model, open_model

    if name in EMBEDDED:
        model, tok = load_model(name, dtype="auto", device=device)
        return model, tok, False
    if name not in SHAPES:
        raise SystemExit(f"error: unknown model {name!r}; choose from {EMBEDDED + tuple(SHAPES)}")
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        tok = open_model("gemma-3-270m").tokenizer
    vocab = len(tok) if tiny and tokenizer is not None else None
    return _random_gemma(name, device, tiny, vocab), tok, True


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from bench_scoring import _score_all

    from calibrated_lm.evaluation import scoring
    from calibrated_lm.evaluation.runner import _batch_plan, _row_chars
    from calibrated_lm.evaluation.tasks import build_items, parse_task_list

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, tok, random_weights = _model(name, args.device, args.tiny, args.tokenizer)
    load_s = time.perf_counter() - t0
    encoder = scoring.make_encoder(tok, model, chat=False)
    max_len = scoring.model_max_length(model, tok)
    items = []
    for task in parse_task_list(args.tasks):
        items += build_items(task, limit=args.limit, num_fewshot=0)
    packs = scoring.supports_packing(model)
    items.sort(key=lambda it: -_row_chars(it, packs))  # eval's order
    rows = scoring.plan_rows(
        encoder.encode_many([it.requests for it in items]), max_len, pack=packs
    )
    tokens = sum(len(r.tokens) for r in rows)
    plan = _batch_plan("auto", args.device)
    warm = items[: max(1, min(len(items), plan[2] // 16))]
    _score_all(scoring.score_items, model, encoder, warm, plan, max_len, args.device)
    r = _score_all(scoring.score_items, model, encoder, items, plan, max_len, args.device)
    res = {
        "model": name,
        "random_weights": random_weights,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "questions": len(items),
        "tokens": tokens,
        "load_s": round(load_s, 2),
        "seconds": round(r["seconds"], 3),
        "questions_per_s": round(r["qps"], 1),
        "tokens_per_s": round(tokens / r["seconds"], 1),
        "final_batch": r["final_batch"],
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    del model
    gc.collect()
    return res


def _write(results: list[dict[str, Any]], args: argparse.Namespace, device: str) -> None:
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                         "argv": sys.argv[1:], "models": results}, indent=1) + "\n")  # fmt: skip
    if args.out:
        lines = [
            f"# Scoring rate against model size ({device})",
            "",
            f"`python benchmarks/bench_scoring_scale.py {' '.join(sys.argv[1:])}`, torch "
            f"{torch.__version__}; one process, eval's batch plan, after a warm-up window.",
            "",
            "| model | weights | parameters | questions/s | tokens/s | seconds | peak GiB | final batch |",
            "|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in results:
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            lines.append(
                f"| {r['model']} | {'random' if r['random_weights'] else 'real'} | "
                f"{r['params'] / 1e6:,.0f}M | {r['questions_per_s']:,.1f} | "
                f"{r['tokens_per_s']:,.0f} | {r['seconds']:.2f} | {peak} | {r['final_batch']} |"
            )
        args.out.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join((*EMBEDDED, *SHAPES)))
    ap.add_argument("--tasks", default="hellaswag,arc_easy")
    ap.add_argument("--limit", type=int, default=500, help="questions per task")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="2-layer random models: a CPU check")
    ap.add_argument("--tokenizer", type=Path, default=None, help="for the random models")
    ap.add_argument("--out", type=Path, default=None, help="Markdown table")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    results, failed = [], []
    for name in args.models.split(","):
        try:
            r = measure(name, args)
        except (Exception, SystemExit) as exc:  # one model's failure keeps the others' rows
            print(f"{name}: failed: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
            gc.collect()
            continue
        print(json.dumps(r), flush=True)
        results.append(r)
        _write(results, args, device)
    if failed:
        print(f"error: no result for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
