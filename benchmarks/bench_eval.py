"""Questions per second of ``calibrated-lm eval``, end to end and in the scoring phase.

CPU (default): the anchor of issue 4 — lm-evaluation-harness 0.4.13, HF backend, batch 8, fp32,
SmolLM2-135M-Instruct, first 200 ARC-Easy validation questions, no chat template: 64 s end to end
(3.1 questions/s), 4.45 questions/s in its scoring phase, accuracy 0.500. We run the same
questions the same way (fp32, --chat-template off) through the CLI in a fresh process and report
the same two rates, plus packed vs unpacked scoring on the same questions. The machine is
shared: the load average is recorded next to every timing.

GPU (``--device cuda``): full MMLU test (14,042 questions, 57 subjects, 0-shot) with the same
model in bf16 and fp32, reporting questions/s and how far bf16 moves the scores.

    python benchmarks/bench_eval.py                       # CPU, writes results/eval_cpu.md
    python benchmarks/bench_eval.py --device cuda --out benchmarks/results/eval_h100.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ANCHOR = {"end_to_end_qps": 3.1, "scoring_qps": 4.45, "accuracy": 0.500, "seconds": 64}


def _cli(args: list[str]) -> tuple[float, dict]:
    """Run the CLI in a fresh interpreter (start-up counted, as for the anchor)."""
    out = Path(args[args.index("--output") + 1])
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "calibrated_lm.cli", "eval", *args],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    print(proc.stdout)
    return wall, json.loads((out / "summary.json").read_text())


def _records(folder: Path) -> dict:
    lines = (folder / "samples.jsonl").read_text().split("\n")[:-1]
    return {(r["task"], r["id"]): r for r in map(json.loads, lines)}


def cpu(model: str, limit: int, tmp: Path) -> dict:
    import torch

    res: dict = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    # Warm the GGUF conversion cache so neither run below pays for it.
    from calibrated_lm.models.loading import load_model

    load_model(model, device="cpu")
    common = ["--model", model, "--tasks", "arc_easy", "--split", "validation"]
    common += ["--limit", str(limit), "--chat-template", "off", "--dtype", "float32"]
    common += ["--device", "cpu", "--no-progress"]
    wall, summary = _cli([*common, "--output", str(tmp / "auto")])
    t = summary["protocol"]["timing"]
    res["end_to_end_s"] = round(wall, 2)
    res["end_to_end_qps"] = round(limit / wall, 3)
    res["scoring_s"] = t["scoring_s"]
    res["scoring_qps"] = t["questions_per_s"]
    res["model_load_s"] = t["model_load_s"]
    res["before_first_batch"] = _phases(t)
    res["accuracy"] = summary["tasks"]["arc_easy"]["accuracy"]
    res["ece"] = summary["tasks"]["arc_easy"]["ece"]
    res["load_after_auto"] = os.getloadavg()

    # Packed (one row per question) vs unpacked (one row per choice) scoring, same questions.
    from calibrated_lm.evaluation.scoring import make_encoder, model_max_length, score_items
    from calibrated_lm.evaluation.tasks import build_items

    m, tok = load_model(model, device="cpu", dtype="float32")
    items = build_items("arc_easy", split="validation", limit=min(limit, 100))
    enc = make_encoder(tok, m, chat=False)
    for pack in (False, True):
        t0 = time.perf_counter()
        scores = score_items(
            m, enc, items, batch_size=8, max_len=model_max_length(m, tok), pack=pack
        )
        dt = time.perf_counter() - t0
        res[f"scoring_qps_batch8_{'packed' if pack else 'unpacked'}"] = round(len(items) / dt, 3)
        res.setdefault("_scores", []).append(scores)
    a, b = res.pop("_scores")
    res["packed_vs_unpacked_max_abs_diff"] = max(
        abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)
    )
    res["load_after"] = os.getloadavg()
    return res


def _phases(timing: dict) -> dict:
    """The eval summary's breakdown of the time before its first scored batch (issue 15's
    start-to-first-batch target); absent keys (older versions) left out."""
    keys = ("process_start_to_eval_s", "tasks_read_s", "model_load_s", "prepare_s",
            "to_scoring_start_s", "to_first_batch_s", "process_to_first_batch_s")  # fmt: skip
    return {k: timing[k] for k in keys if k in timing}


def gpu(model: str, tmp: Path, limit: int | None) -> dict:
    import torch

    res: dict = {"gpu": torch.cuda.get_device_name(0)}
    from calibrated_lm.models.loading import load_model

    t0 = time.perf_counter()
    load_model(model, device="cpu")  # converts the GGUF once (cache)
    res["gguf_conversion_s"] = round(time.perf_counter() - t0, 2)
    runs = {}
    for dtype in ("bfloat16", "float32"):
        args = ["--model", model, "--tasks", "mmlu", "--chat-template", "off", "--dtype", dtype]
        args += ["--device", "cuda", "--no-progress", "--output", str(tmp / dtype)]
        if limit:
            args += ["--limit", str(limit)]
        wall, summary = _cli(args)
        t = summary["protocol"]["timing"]
        e = summary["tasks"]["mmlu"]
        runs[dtype] = {
            "questions": e["n"],
            "end_to_end_s": round(wall, 2),
            "end_to_end_qps": round(e["n"] / wall, 1),
            "scoring_s": t["scoring_s"],
            "scoring_qps": t["questions_per_s"],
            "model_load_s": t["model_load_s"],
            "before_first_batch": _phases(t),
            "batch_size": t["batch_size"],
            "accuracy": e["accuracy"],
            "ece": e["ece"],
            "ece_ci95": e["ece_ci95"],
            "rms_ce": e["rms_ce"],
        }
    a, b = _records(tmp / "bfloat16"), _records(tmp / "float32")
    diffs = [
        abs(x - y) for k in a for x, y in zip(a[k]["choice_logprobs"], b[k]["choice_logprobs"])
    ]
    res["bf16_vs_fp32_max_abs_logprob_diff"] = max(diffs)
    res["bf16_vs_fp32_mean_abs_logprob_diff"] = sum(diffs) / len(diffs)
    res["runs"] = runs
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=None, help="CPU: 200 (the anchor); GPU: all")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if args.device == "cpu":
            res = cpu(args.model, args.limit or 200, Path(d))
        else:
            res = gpu(args.model, Path(d), args.limit)
    res["host"] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    import torch
    import transformers

    res["host"].update(torch=torch.__version__, transformers=transformers.__version__)
    out = args.out or Path(__file__).parent / "results" / f"eval_{args.device}.md"
    lines = [f"# eval speed ({args.device})", "", "Produced by `python benchmarks/bench_eval.py"]
    lines[-1] += f" --device {args.device}`."
    if args.device == "cpu":
        lines += ["", f"Anchor (issue 4, lm-evaluation-harness 0.4.13 on this CPU): {ANCHOR}"]
    lines += ["", "```json", json.dumps(res, indent=1), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
