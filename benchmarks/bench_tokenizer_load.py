"""Tokenizer load times of one model folder, each in a fresh interpreter (issue 15, goal 2).

Three ways to get the tokenizer of gemma-3-270m's converted folder (or --model's):
``AutoTokenizer.from_pretrained`` (transformers 5 parses tokenizer.json in Python), the
Rust ``tokenizers.Tokenizer.from_file`` alone (the floor of any load through tokenizer.json)
and ``calibrated_lm.models.loading._load_tokenizer`` with its pickle cache warm. Median of
``--repeat`` fresh processes each; imports are outside the timed part.

    python benchmarks/bench_tokenizer_load.py --out benchmarks/results/session18/tokenizer_load_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, time
from pathlib import Path
folder, how = Path(sys.argv[1]), sys.argv[2]
import transformers, tokenizers
from calibrated_lm.models import loading
t = time.perf_counter()
if how == "auto":
    transformers.AutoTokenizer.from_pretrained(str(folder))
elif how == "rust_from_file":
    tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
else:
    loading._load_tokenizer(folder, False)
print(time.perf_counter() - t)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from calibrated_lm.models import loading

    folder = Path(loading.open_model(args.model, device="cpu").path)  # converted, cache warm
    res: dict = {"model": args.model, "folder": folder.name, "load_at_start": os.getloadavg()}
    for how in ("auto", "rust_from_file", "pickle_cache"):
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(folder), how],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs.append(round(float(out.stdout.strip().splitlines()[-1]), 3))
        res[how] = {"median_s": statistics.median(runs), "runs_s": runs}
    import tokenizers
    import transformers

    res["versions"] = {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
