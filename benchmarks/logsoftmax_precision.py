"""Where the log-likelihood gap to lm-evaluation-harness comes from: fp32 log-softmax rounding.

Our scorer takes ``z[t] - logsumexp(z)`` in fp32 at the target positions
(``evaluation/scoring.py:_target_logprobs_on_device``); lm-eval's HF backend takes
``log_softmax(z)[t]`` in fp32. Both are compared here with the float64 value of the same fp32
logits, on the embedded SmolLM2-135M-Instruct's logits of the first ARC-Easy validation
questions (each question with its gold answer, every token a target) and on random logits.

    python benchmarks/logsoftmax_precision.py [--questions 40]

Prints a markdown table: per-token max error and per-sequence max error of the sum.
"""

from __future__ import annotations

import argparse
import sys

import torch


def _errors(z: torch.Tensor, targets: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Max per-token and whole-sequence errors of both fp32 formulas against float64."""
    rows = torch.arange(len(targets))
    truth = z.double()[rows, targets] - torch.logsumexp(z.double(), dim=-1)
    ours = (z[rows, targets] - torch.logsumexp(z, dim=-1)).double()
    lm_eval_way = torch.log_softmax(z, dim=-1)[rows, targets].double()
    return {
        name: ((v - truth).abs().max().item(), abs(v.sum().item() - truth.sum().item()))
        for name, v in (("z[t] - logsumexp(z)", ours), ("log_softmax(z)[t]", lm_eval_way))
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=40)
    args = ap.parse_args()

    from calibrated_lm.evaluation.tasks import build_items
    from calibrated_lm.models.loading import load_model

    model, tok = load_model("smollm2-135m-instruct", device="cpu")
    items = build_items("arc_easy", split="validation", limit=args.questions)
    worst: dict[str, list[float]] = {}
    for item in items:
        context, continuation = item.requests[item.label]
        text = context + continuation
        ids = tok(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            z = model(ids).logits[0, :-1].float()
        for name, (tok_err, seq_err) in _errors(z, ids[0, 1:]).items():
            w = worst.setdefault(name, [0.0, 0.0])
            w[0], w[1] = max(w[0], tok_err), max(w[1], seq_err)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 49152, generator=gen) * 3 + torch.randn(64, 1, generator=gen) * 5
    rand = _errors(z.float(), torch.randint(0, 49152, (64,), generator=gen))

    print(f"torch {torch.__version__}, fp32 on CPU; errors against float64 of the same logits\n")
    print(
        f"| formula | SmolLM2-135M, {len(items)} ARC-Easy questions: max token error | "
        "max sequence-sum error | random logits (64 x 49,152): max token error |"
    )
    print("|---|---|---|---|")
    for name, (tok_err, seq_err) in worst.items():
        print(f"| `{name}` | {tok_err:.2e} | {seq_err:.2e} | {rand[name][0]:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
