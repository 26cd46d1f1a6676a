#!/usr/bin/env bash
# Stage the next claim-2 session's carry: a fresh work folder restored from the committed
# results (the control's base and eps-0 seed-1 units, then every finished claim-2 run), packed
# as done_units.tgz into the last of the pieces that experiments/sft_stage.sh cuts.
#
#   bash experiments/claim2_stage.sh [OUT_DIR=.carry/c2] [PIECES=8]
#
# Then carry OUT_DIR/c0 .. c{PIECES-1} one per call (experiments/results/sft_claim2/
# device_logs/commands.txt lists the calls).
set -euo pipefail
out=${1:-.carry/c2}
pieces=${2:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" "$ROOT/experiments/restore_units.py" --results "$ROOT/experiments/results/sft_control" \
    --units base sft_lr8e-05_ep3_eps0_s1 --work "$work/w"
# Every claim-2 run with at least one committed evaluation (records/evals/<run>__<format>;
# the training records of a run are not always committed, its evaluations always are).
runs=$(cd "$ROOT/experiments/results/sft_claim2/records/evals" 2>/dev/null &&
    ls -d sft_*__* | sed 's/__.*//' | sort -u || true)
if [ -n "$runs" ]; then
    # shellcheck disable=SC2086  # one word per run name
    "$PY" "$ROOT/experiments/restore_units.py" --results "$ROOT/experiments/results/sft_claim2" \
        --units $runs --work "$work/w"
fi
tar czf "$work/done_units.tgz" -C "$work/w" .
"$PY" "$ROOT/experiments/sft_calibration.py" run --profile claim2 --work "$work/w" --plan \
    --time-limit 555 >"$work/plan.txt"
grep -v ' done ' "$work/plan.txt" | head -12
# A run whose evaluations are committed must never be trained again on the device (session 6
# lost its device time that way: the runs above were not restored and were retrained).
for run in sft_lr8e-05_ep3_eps0_s1 $runs; do
    if grep -Eq "^train/$run +pending" "$work/plan.txt"; then
        echo "claim2_stage: error: train/$run is pending although its evaluations are" \
            "committed: the restore did not take; nothing staged" >&2
        exit 3
    fi
done
echo "claim2_stage: restored runs: sft_lr8e-05_ep3_eps0_s1 ${runs//$'\n'/ }"
echo "claim2_stage: first pending training units:"
grep -E '^train/.* pending' "$work/plan.txt" | head -4 | sed 's/^/  /'
bash "$ROOT/experiments/sft_stage.sh" "$out" "$pieces" "$work/done_units.tgz"
