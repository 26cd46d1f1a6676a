"""Two measurements behind the CPU's automatic batch plan (``runner._batch_plan``).

1. Padded tokens: the rows ``plan_rows`` makes for a task's questions, batched as
   ``score_rows`` batches them (rows sorted by length, at most R rows and 4,096 padded tokens
   a batch), for each question order (by the longest request, or by the packed row) and each
   (window, rows) plan. Fewer padded tokens for the same real ones is less forward work.
2. Forward cost per token of the model body (no output layer) at several (rows, width)
   shapes, and the output layer's extra cost at ``logits_to_keep`` = K against a body-only
   forward: whether smaller batches cost more per token on this machine.

    python benchmarks/eval_cpu_shapes.py --model smollm2-135m-instruct --task arc_easy \
        --limit 200 > benchmarks/results/session15/eval_cpu_shapes.txt
"""

from __future__ import annotations

import argparse
import time

import torch

from calibrated_lm.evaluation.runner import _row_chars
from calibrated_lm.evaluation.scoring import _batches, make_encoder, plan_rows
from calibrated_lm.evaluation.tasks import build_items, parse_task_list
from calibrated_lm.models.loading import load_model

PLANS = ((16, 32), (16, 8), (64, 32), (64, 16), (64, 8), (256, 8))  # (window, rows)
SHAPES = ((4, 50), (8, 50), (16, 50), (32, 50), (8, 100), (16, 100))


def padded(items, enc, window: int, rows: int) -> tuple[int, int, int]:
    real = pad = batches = 0
    for s in range(0, len(items), window):
        chunk = items[s : s + window]
        planned = plan_rows(enc.encode_many([i.requests for i in chunk]), 2048, pack=True)
        for b in _batches(sorted(planned, key=lambda r: -len(r.tokens)), rows, 4096):
            pad += max(len(r.tokens) for r in b) * len(b)
            real += sum(len(r.tokens) for r in b)
            batches += 1
    return real, pad, batches


def best_of(f, n: int = 3) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--limit", type=int, default=200)
    args = ap.parse_args()
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    items = build_items(parse_task_list(args.task)[0], split=args.split, limit=args.limit)
    enc = make_encoder(tok, model, chat=False)
    print(f"# {args.model}, {args.task} {args.split}, {len(items)} questions, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("order    window rows  real   padded batches")
    orders = {
        "longest": lambda it: -max(len(c) + len(k) for c, k in it.requests),
        "packed": lambda it: -_row_chars(it, True),
    }
    for name, key in orders.items():
        ordered = sorted(items, key=key)
        for window, rows in PLANS:
            real, pad, nb = padded(ordered, enc, window, rows)
            print(f"{name:8s} {window:6d} {rows:4d} {real:6d} {pad:8d} {nb:7d}")
    print("\nbody forward (no output layer), best of 3")
    print("rows width   ms  ms/token")
    with torch.inference_mode():
        for b, t in SHAPES:
            ids = torch.randint(100, 40000, (b, t))
            sec = best_of(lambda ids=ids: model.model(input_ids=ids))
            print(f"{b:4d} {t:5d} {sec * 1e3:5.0f} {sec / (b * t) * 1e3:8.3f}")
        ids = torch.randint(100, 40000, (16, 126))
        body = best_of(lambda: model.model(input_ids=ids))
        for keep in (1, 85, 126):
            full = best_of(lambda k=keep: model(input_ids=ids, logits_to_keep=k))
            print(f"(16, 126) logits_to_keep={keep}: {full:.2f} s vs body {body:.2f} s "
                  f"(output layer +{full - body:.2f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
