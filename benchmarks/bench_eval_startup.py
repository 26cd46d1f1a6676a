"""Start-up of ``calibrated-lm eval``: the phases before the first scored batch, and resume no-ops.

Issue 15 (goal 2) asks for <= 5 s from process start to the first scored batch of HellaSwag
validation (10,042 questions) on a GPU. Most of that time is CPU work, measured here without
scoring the whole task: each run is the real CLI in a fresh interpreter (``--child``), stopped
by ``EvalConfig.on_first_batch`` once its first window of questions is on disk, which hands
over the summary's timing phases (``process_start_to_eval_s`` ... ``process_to_first_batch_s``).

    python benchmarks/bench_eval_startup.py --label before    # writes results/eval_startup_cpu_before.json

Measured, each ``--repeat`` times (fresh output folder each, median and all values kept):

* ``first_batch_full``: the full task, to its first scored batch;
* ``first_batch_limit500``: the same with ``--limit 500`` (less to prepare);
* ``resume_noop_limit200``: a ``--limit 200`` folder scored once, then rerun (nothing to
  score): wall time of the rerun and its phases;
* ``resume_noop_full``: the full task over a folder whose journal holds a record for every
  question: the 200 really scored above plus 9,842 with synthetic scores (correct request
  hashes, so every one is reused; the scores only feed the summary, which is what a no-op
  rerun computes);
* ``imports``: fresh-interpreter wall time of the imports the eval path needs;
* ``docs`` (not by default): building HellaSwag validation's questions from its rows in this
  process, with the task files' fast paths and with Jinja only.

The load average is recorded beside every number (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
TASK = ["--tasks", "hellaswag", "--split", "validation"]
BASE = ["--model", MODEL, *TASK, "--device", "cpu", "--no-progress"]


class _Stop(Exception):
    """Raised by the first-batch hook to end the child run there."""


def child(argv: list[str], phases_out: Path) -> int:
    """The CLI in this (fresh) process, stopped at its first scored batch."""
    from calibrated_lm import cli
    from calibrated_lm.evaluation import runner

    real = runner.run_eval

    def hook(phases: dict) -> None:
        phases_out.write_text(json.dumps(phases))
        raise _Stop

    def run_eval(cfg):  # type: ignore[no-untyped-def]
        cfg.on_first_batch = hook
        return real(cfg)

    runner.run_eval = run_eval
    try:
        return cli.main(["eval", *argv])
    except _Stop:
        return 0


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _first_batch(args: list[str], out: Path) -> dict:
    phases = out.with_suffix(".phases.json")
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", str(phases), "--", *args, "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not phases.exists():
        raise SystemExit(proc.stderr[-3000:])
    return {"wall_s": round(wall, 2), **json.loads(phases.read_text())}


def _cli(args: list[str]) -> dict:
    out = Path(args[args.index("--output") + 1])
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "calibrated_lm.cli", "eval", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    timing = json.loads((out / "summary.json").read_text())["protocol"]["timing"]
    keep = ("process_start_to_eval_s", "tasks_read_s", "model_load_s", "prepare_s",
            "to_scoring_start_s", "scoring_s", "questions_scored_this_run", "total_s")  # fmt: skip
    return {"wall_s": round(wall, 2), **{k: timing.get(k) for k in keep}}


def _repeat(n: int, fn) -> dict:  # type: ignore[no-untyped-def]
    runs = []
    for i in range(n):
        before = _load()
        r = fn(i)
        r["load_before"] = before
        runs.append(r)
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    median = {k: round(statistics.median(r[k] for r in runs if r[k] is not None), 2) for k in keys}
    return {"median": median, "runs": runs}


def _synthetic_full_journal(folder: Path) -> int:
    """Append a record with synthetic scores for every HellaSwag validation question the
    folder's journal lacks; return how many were added."""
    import random

    from calibrated_lm.evaluation.runner import SAMPLES, _record
    from calibrated_lm.evaluation.samples_file import SamplesWriter, read_records
    from calibrated_lm.evaluation.tasks import build_items

    have = {r.key for r in read_records(folder / SAMPLES)}
    rng = random.Random(0)
    new = [
        it for it in build_items("hellaswag", split="validation") if (it.task, it.id) not in have
    ]
    recs = []
    for it in new:
        scores = [-rng.uniform(5.0, 60.0) for _ in it.requests]
        recs.append(_record(it, scores, [max(1, len(k) // 4) for _, k in it.requests]))
    with SamplesWriter(folder / SAMPLES) as w:
        w.write(recs)
    return len(new)


def _imports(n: int) -> dict:
    stmts = {
        "cli_parser": "from calibrated_lm.cli import build_parser; build_parser()",
        "eval_runner": "import calibrated_lm.evaluation.runner",
        "eval_path": "import calibrated_lm.evaluation.runner, calibrated_lm.evaluation.tasks, "
        "calibrated_lm.evaluation.scoring, calibrated_lm.models.loading, torch, transformers",
        "torch": "import torch",
        "transformers_auto": "import torch; from transformers import AutoModelForCausalLM, "
        "AutoTokenizer",
    }
    res = {}
    for name, code in stmts.items():
        walls = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            walls.append(round(time.perf_counter() - t0, 2))
        res[name] = {"median_s": statistics.median(walls), "runs_s": walls, "code": code}
    return res


def _docs(n: int) -> dict:
    """In this process (imports done): HellaSwag validation's 10,042 questions built from its
    rows, with the task files' fast paths and with every template through Jinja."""
    from calibrated_lm.evaluation import taskfile
    from calibrated_lm.evaluation.tasks import Task

    res = {}
    for fast in (True, False):
        taskfile.FAST_PATHS = fast
        walls = []
        for _ in range(n):
            definition = taskfile.read_task_file(
                taskfile.BUILTIN_DIR / "hellaswag.yaml", builtin=True
            )
            task = Task(definition, "hellaswag")
            task._read("validation")  # the Arrow read apart: only the building is timed
            t0 = time.perf_counter()
            task.docs("validation")
            walls.append(round(time.perf_counter() - t0, 3))
        res["fast_paths" if fast else "jinja_only"] = {
            "median_s": statistics.median(walls), "runs_s": walls, "load_after": _load()
        }  # fmt: skip
    taskfile.FAST_PATHS = True
    return res


def importtime_top(raw: Path, depth: int = 0, rows: int = 15) -> str:
    """The top-level modules of a ``python -X importtime`` log (its stderr), by cumulative
    import time: one line per module, ``cumulative_s self_s name``."""
    found = []
    for line in raw.read_text().splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        self_us, cum_us, name = line.split(":", 1)[1].split("|")
        if (len(name) - len(name.lstrip()) - 1) // 2 <= depth:
            found.append((int(cum_us) / 1e6, int(self_us) / 1e6, name.strip()))
    found.sort(reverse=True)
    return "\n".join(f"{c:6.2f} {s:6.2f} {n}" for c, s, n in found[:rows])


def main() -> None:
    global BASE, MODEL
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[4:], Path(sys.argv[2])))
    if len(sys.argv) > 2 and sys.argv[1] == "--importtime-top":
        print(importtime_top(Path(sys.argv[2])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", required=True, help="names the result file (before, after, ...)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--only", default="imports,first_batch_full,first_batch_limit500,resume",
        help="comma-separated parts to run",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the eval's --device")
    ap.add_argument("--model", default=MODEL, help=f"the eval's --model (default {MODEL})")
    args = ap.parse_args()
    MODEL = args.model
    BASE = ["--model", MODEL, *TASK, "--device", args.device, "--no-progress"]
    parts = set(args.only.split(","))
    from calibrated_lm.models.loading import load_model

    load_model(MODEL, device="cpu")  # the GGUF conversion cache is warm before any timing
    res: dict = {
        "label": args.label,
        "model": MODEL,
        "device": args.device,
        "load_at_start": _load(),
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "docs" in parts:
            res["docs_hellaswag_validation"] = _docs(args.repeat)
        if "imports" in parts:
            res["imports"] = _imports(args.repeat)
        if "first_batch_full" in parts:
            res["first_batch_full"] = _repeat(
                args.repeat, lambda i: _first_batch(BASE, tmp / f"full{i}")
            )
        if "first_batch_limit500" in parts:
            res["first_batch_limit500"] = _repeat(
                args.repeat, lambda i: _first_batch([*BASE, "--limit", "500"], tmp / f"l500_{i}")
            )
        if "resume" in parts:
            folder = tmp / "resume200"
            small = [*BASE, "--limit", "200", "--output", str(folder)]
            res["resume_scored_limit200"] = _cli(small)
            res["resume_noop_limit200"] = _repeat(args.repeat, lambda i: _cli(small))
            full = tmp / "resume_full"
            shutil.copytree(folder, full)
            res["resume_full_synthetic_records"] = _synthetic_full_journal(full)
            res["resume_noop_full"] = _repeat(
                args.repeat, lambda i: _cli([*BASE, "--output", str(full)])
            )
    res["load_at_end"] = _load()
    import torch
    import transformers

    res["host"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    out = args.out or Path(__file__).parent / "results" / f"eval_startup_cpu_{args.label}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
