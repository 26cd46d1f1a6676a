#!/usr/bin/env bash
# A-B-B-A of `calibrated-lm eval` on the CPU: this checkout's src against OLD_SRC (another
# checkout's src/, e.g. a `git worktree`), SmolLM2-135M-Instruct, fp32, --bootstrap 0. Prints
# per run: process start to first batch, scoring phase, total (the summary's timing, s), then
# the largest score difference between the last old and new run and how many predictions agree.
#   bash benchmarks/eval_cpu_ab.sh /tmp/oldtree/src "arc_easy 200" "hellaswag 300"
set -eu
old=$1; shift
py=${PYTHON:-$PWD/.venv/bin/python}
tmp=$(mktemp -d)
run() {  # label src task limit
    rm -rf "$tmp/out"
    PYTHONPATH=$2 "$py" -m calibrated_lm.cli eval --model smollm2-135m-instruct --tasks "$3" \
        --split validation --limit "$4" --device cpu --dtype float32 --no-progress \
        --bootstrap 0 --output "$tmp/out" >/dev/null 2>&1
    "$py" -c "import json; t = json.load(open('$tmp/out/summary.json'))['protocol']['timing']
print('$1 $3', t['process_to_first_batch_s'], round(t['scoring_s'], 2), t['total_s'])"
    cp "$tmp/out/samples.jsonl" "$tmp/$1.jsonl"
}
for case in "$@"; do
    set -- $case
    run new "$PWD/src" "$1" "$2"; run old "$old" "$1" "$2"
    run old "$old" "$1" "$2"; run new "$PWD/src" "$1" "$2"
    "$py" - "$tmp/old.jsonl" "$tmp/new.jsonl" <<'PY'
import json, sys
a, b = ({r["id"]: r for r in map(json.loads, open(p))} for p in sys.argv[1:])
diff = max(abs(x - y) for k in a for x, y in zip(a[k]["choice_logprobs"], b[k]["choice_logprobs"]))
def pred(r):
    s = r["choice_logprobs"]
    return s.index(max(s))
same = sum(pred(a[k]) == pred(b[k]) for k in a)
print(f"{len(a)} questions: largest score difference {diff:.2e}, same prediction {same}/{len(a)}")
PY
done
rm -rf "$tmp"
