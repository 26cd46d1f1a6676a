"""Two measurements behind the CPU's automatic batch plan (``runner._batch_plan``).

1. Padded tokens: the rows ``plan_rows`` makes for a task's questions, batched as
   ``score_rows`` batches them (rows sorted by length, at most R rows and 4,096 padded tokens
   a batch), for each question order (by the longest request, or by the packed row) and each
   (window, rows) plan. Fewer padded tokens for the same real ones is less forward work.
2. Forward cost per token of the model body (no output layer) at several (rows, width)
   shapes, and the output layer's extra cost at ``logits_to_keep`` = K against a body-only
   forward: whether smaller batches cost more per token on this machine.
3. The roofline (``--only roofline``): the body's multiply-adds per token, counted from its
   linear layers (2 x in x out each) plus attention's two products (4 x context x width per
   layer at the mean causal context), against the rate of a plain fp32 matrix product at the
   body's own product shapes on this machine. The body's rate over that rate is how much of
   the machine's fp32 matrix throughput a forward uses (bf16 products are timed beside it).
   It also counts the tokens the task's questions cost: as the harness feeds them (each
   request's context + continuation, less the last token) and as our packed rows hold them
   (a question's context once, its continuations after it).

    python benchmarks/eval_cpu_shapes.py --model smollm2-135m-instruct --task arc_easy \
        --limit 200 > benchmarks/results/session15/eval_cpu_shapes.txt
    python benchmarks/eval_cpu_shapes.py --only roofline \
        > benchmarks/results/session16/eval_cpu_roofline.txt
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


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    """Best-of-3 rate of an (m x k) @ (k x n) product, in GFLOP/s (2 m k n operations)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    reps = max(1, int(2e9 / (2 * m * k * n)))  # about a second of work a measurement
    sec = best_of(lambda: [a @ b for _ in range(reps)]) / reps
    return 2 * m * k * n / sec / 1e9


def roofline(model, tokens: int = 400) -> None:
    body = model.model
    linear = [mod for mod in body.modules() if isinstance(mod, torch.nn.Linear)]
    lin_flops = sum(2 * mod.in_features * mod.out_features for mod in linear)
    cfg = model.config
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    shapes = sorted({(mod.in_features, mod.out_features) for mod in linear})
    print(f"# roofline, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"body: {layers} layers, {len(linear)} linear layers, "
          f"{lin_flops / 1e6:.1f} MFLOP a token in them")  # fmt: skip
    print(f"fp32 / bf16 product rate at the body's shapes, {tokens} token rows (GFLOP/s)")
    share = {}
    for k, n in shapes:
        count = sum(1 for mod in linear if (mod.in_features, mod.out_features) == (k, n))
        share[(k, n)] = (count * 2 * k * n, matmul_gflops(tokens, k, n, torch.float32))
        bf16 = matmul_gflops(tokens, k, n, torch.bfloat16)
        print(f"  {tokens} x {k} @ {k} x {n} (x{count}): fp32 {share[(k, n)][1]:6.1f}  "
              f"bf16 {bf16:6.1f}")  # fmt: skip
    # The time the linear layers would take at those rates, per token: the products' floor.
    floor_ms = sum(f / (r * 1e9) for f, r in share.values()) * 1e3
    print(f"floor of the linear layers at those fp32 rates: {floor_ms:.3f} ms a token")
    print("rows width  ms/token  MFLOP/token  GFLOP/s  share of the fp32 product rate")
    with torch.inference_mode():
        for b, t in SHAPES:
            ids = torch.randint(100, 40000, (b, t))
            sec = best_of(lambda ids=ids: body(input_ids=ids)) / (b * t)
            flops = lin_flops + 4 * (t / 2) * heads * head_dim * layers
            print(f"{b:4d} {t:5d} {sec * 1e3:9.3f} {flops / 1e6:12.1f} {flops / sec / 1e9:8.1f}"
                  f"  {floor_ms / (sec * 1e3):.2f} (floor / measured)")  # fmt: skip


def token_counts(items, enc) -> tuple[int, int, int]:
    """(requests, harness tokens, packed-row tokens) of ``items``."""
    groups = enc.encode_many([it.requests for it in items])
    harness = sum(len(c) + len(k) - 1 for q in groups for c, k in q)
    packed = sum(len(q[0][0]) + sum(len(k) for _, k in q) for q in groups)
    return sum(len(q) for q in groups), harness, packed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--only", choices=["all", "roofline"], default="all")
    args = ap.parse_args()
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    items = build_items(parse_task_list(args.task)[0], split=args.split, limit=args.limit)
    enc = make_encoder(tok, model, chat=False)
    if args.only == "roofline":
        n_req, harness, packed = token_counts(items, enc)
        print(f"# {args.model}, {args.task} {args.split}, {len(items)} questions: {n_req} "
              f"requests, {harness} tokens as the harness feeds them, {packed} in packed rows "
              f"({harness / packed:.2f}x fewer)")  # fmt: skip
        roofline(model)
        return 0
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
