"""The CPU-side ceiling of ``calibrated-lm eval``'s scoring rate: everything but the model.

Issue 15 asks for >= 1,000 questions/s scoring on a GPU. Whatever the GPU does, the host
must tokenise, plan rows, build batches and masks, gather targets, sum scores and write the
journal for every question, in the same process and, today, between the GPU's forward
passes. This benchmark measures that host work alone: the real CLI (``calibrated-lm eval``)
on a real task with the real tokenizer, but with the model's forward returning a
zero-cost logits view and the log-softmax of the targets replaced by constants, so no
vocabulary-sized work is left. The free forward calls the output layer (itself free), so the
pre-hook that hands it only the target positions (session 15) runs as in a real forward. Its questions/s is an upper bound on the end-to-end rate at
any GPU speed (the CLI's own summary line, "scored N questions in S s").

The model is a 1-layer, width-16 random model with the tokenizer and vocabulary of
``--model`` (an embedded name or a folder): only the tokenizer and the config's type matter,
and the forward is replaced anyway.

    python benchmarks/bench_eval_pipeline.py [--model smollm2-135m-instruct] \\
        [--tasks hellaswag] [--split validation] [--repeat 3] [--src DIR] [--json OUT] \\
        [--plan cpu|gpu]

``--src DIR`` runs another checkout's ``src`` (PYTHONPATH) in the child processes, for a
before/after comparison in one machine state. Each repetition is a fresh process; the
median is reported with every value and the 1-minute load average before each run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import os, sys, types, torch, transformers
import calibrated_lm.evaluation.scoring as scoring
from calibrated_lm.cli import main

def free_targets(logits, b_idx, p_idx, t_idx, kept=None, transform=None):
    return torch.full((b_idx.numel(),), -1.0, dtype=torch.float64)

def free_target_list(*args, **kwargs):  # the name before the scores stayed on the device
    return free_targets(*args, **kwargs).tolist()

def free_linear(self, x):  # only the output layer runs (the body is skipped below)
    return torch.zeros(1, 1, 1).expand(*x.shape[:-1], self.out_features)

def free_forward(self, input_ids=None, logits_to_keep=0, **kwargs):
    # Through the output layer, so the scorer's pre-hook on it (the target positions' gather)
    # does its host work as in a real forward.
    b, w = input_ids.shape
    keep = logits_to_keep or w
    hidden = torch.zeros(1, 1, self.config.hidden_size).expand(b, keep, -1)
    return types.SimpleNamespace(logits=self.get_output_embeddings()(hidden))

if hasattr(scoring, "_target_logprobs_on_device"):
    scoring._target_logprobs_on_device = free_targets
else:  # an older checkout (--src)
    scoring._target_logprobs = free_target_list
cls = transformers.AutoModelForCausalLM.from_config(
    transformers.AutoConfig.from_pretrained(sys.argv[1])).__class__
cls.forward = free_forward
torch.nn.Linear.forward = free_linear
if os.environ.get("BENCH_GPU_PLAN") == "1":
    # The GPU's batch plan (rows, tokens, window) on the CPU: the host work of GPU batches.
    import calibrated_lm.evaluation.runner as runner
    plan = runner._batch_plan
    runner._batch_plan = lambda batch_size, device: plan(batch_size, "cuda")
sys.exit(main(["eval", "--model", sys.argv[1], *sys.argv[2:]]))
"""


def tiny_model(model: str, folder: Path) -> Path:
    """A 1-layer, width-16 random model with ``model``'s tokenizer and vocabulary."""
    import torch
    import transformers

    from calibrated_lm.models.loading import load_model

    real, tok = load_model(model, device="cpu")
    cfg = copy.deepcopy(real.config)
    del real
    for key, value in dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    ).items():
        setattr(cfg, key, value)
    if getattr(cfg, "layer_types", None):  # Gemma 3: one attention type per layer
        cfg.layer_types = cfg.layer_types[:1]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default="hellaswag")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--src", type=Path, default=None, help="another checkout's src/")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--plan", choices=["cpu", "gpu"], default="cpu",
        help="the automatic batch plan used: the CPU's (default) or the GPU's (256 rows, "
        "65,536 tokens, windows of 512), still on this CPU",
    )  # fmt: skip
    ap.add_argument(
        "--profile", type=Path, default=None,
        help="one more run, under cProfile and not timed: its top 25 by own time, here",
    )  # fmt: skip
    args = ap.parse_args()
    env = dict(os.environ)
    env["BENCH_GPU_PLAN"] = "1" if args.plan == "gpu" else "0"
    if args.src is not None:
        env["PYTHONPATH"] = f"{args.src.resolve()}{os.pathsep}{env.get('PYTHONPATH', '')}"
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(args.model, Path(tmp) / "model")
        profiled = args.repeat if args.profile is not None else -1
        for i in range(args.repeat + (profiled >= 0)):
            load = _load()
            out = Path(tmp) / f"run{i}"
            child = Path(tmp) / "child.py"
            child.write_text(CHILD)
            prof = Path(tmp) / "child.prof"
            run = [sys.executable, str(child)]
            if i == profiled:
                run = [sys.executable, "-m", "cProfile", "-o", str(prof), str(child)]
            cmd = [*run, str(model), "--tasks", args.tasks,
                   "--split", args.split, "--device", "cpu", "--no-progress",
                   "--bootstrap", "20", "--output", str(out)]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            m = re.search(r"scored (\d+) questions in ([\d.]+) s", proc.stdout)
            if proc.returncode != 0 or m is None:
                print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
                return 1
            n, secs = int(m.group(1)), float(m.group(2))
            if i == profiled:
                import io
                import pstats

                text = io.StringIO()
                pstats.Stats(str(prof), stream=text).sort_stats("tottime").print_stats(25)
                args.profile.write_text(f"# {' '.join(cmd[3:])}\n{text.getvalue()}")
                continue
            runs.append({"questions": n, "scoring_s": secs, "wall_s": round(wall, 2),
                         "load_before": load})  # fmt: skip
            print(json.dumps(runs[-1]), flush=True)
    med = statistics.median(r["scoring_s"] for r in runs)
    res = {
        "what": "eval scoring with a free model forward and log-softmax (host work only)",
        "model_tokenizer": args.model,
        "tasks": args.tasks,
        "split": args.split,
        "src": str(args.src) if args.src else "this checkout",
        "plan": args.plan,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "runs": runs,
        "median_scoring_s": med,
        "median_questions_per_s": round(runs[0]["questions"] / med, 1),
    }
    print(json.dumps({k: res[k] for k in ("median_scoring_s", "median_questions_per_s")}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
