#!/usr/bin/env bash
# Stage the next session's carry for issue 12's claim 2 or claim 3: a fresh work folder
# restored from the committed results (the control's base units, for claim 2 also its eps-0
# seed-1 run, then every finished run of the claim's own results folder), packed as
# done_units.tgz inside the tar that experiments/sft_stage.sh cuts into pieces.
#
#   bash experiments/claim_stage.sh claim2|claim3 [OUT_DIR=.carry/c2|.carry/c3] [PIECES=auto]
#
# Then carry OUT_DIR/c0, c1, ... one per call, back to back (the claim's device_logs/commands.txt
# lists the calls). Exits 3, staging nothing, if a run whose evaluations are committed would
# be trained again. STAGE_PLAN_ONLY=1 stops after the plan and its checks. STAGE_DONE_ONLY=1
# writes only OUT_DIR/done_units_PROFILE.tgz (the finished units, no pieces): the second
# profile of `sft_device.sh pair`, carried beside one of the first profile's pieces.
set -euo pipefail
profile=${1:?usage: claim_stage.sh claim2|claim3 [OUT_DIR] [PIECES]}
case $profile in
claim2) control_units="base sft_lr8e-05_ep3_eps0_s1" ;;
claim3) control_units="base" ;;
*)
    echo "claim_stage: error: the profile must be claim2 or claim3, not $profile" >&2
    exit 2
    ;;
esac
out=${2:-.carry/${profile/claim/c}}
pieces=${3:-auto}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
results=$ROOT/experiments/results/sft_$profile
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck disable=SC2086  # one word per unit name
"$PY" "$ROOT/experiments/restore_units.py" --results "$ROOT/experiments/results/sft_control" \
    --units $control_units --work "$work/w"
# Every run of this claim with at least one committed evaluation (records/evals/<run>__<fmt>;
# the training records of a run are not always committed, its evaluations always are). The
# base's restricted-head evaluations (claim 3's base_V<V'>) are restored the same way.
runs=$(cd "$results/records/evals" 2>/dev/null && ls -d *__* | sed 's/__.*//' | sort -u || true)
if [ -n "$runs" ]; then
    # shellcheck disable=SC2086
    "$PY" "$ROOT/experiments/restore_units.py" --results "$results" --units $runs --work "$work/w"
fi
tar czf "$work/done_units.tgz" -C "$work/w" .
"$PY" "$ROOT/experiments/sft_calibration.py" run --profile "$profile" --work "$work/w" --plan \
    --time-limit 555 >"$work/plan.txt"
{ grep -v ' done ' "$work/plan.txt" || true; } | sed -n '1,12p'  # sed reads to the end: head's early exit is a SIGPIPE under pipefail
# A run whose evaluations are committed must never be trained again on the device (session 6
# lost its device time that way: the runs were not restored and were retrained).
restored_runs=$(echo "$control_units $runs" | tr ' ' '\n' | grep '^sft_' || true)
for run in $restored_runs; do
    if grep -Eq "^train/$run +pending" "$work/plan.txt"; then
        echo "claim_stage: error: train/$run is pending although its evaluations are" \
            "committed: the restore did not take; nothing staged" >&2
        exit 3
    fi
done
echo "claim_stage: restored runs: ${restored_runs//$'\n'/ }"
echo "claim_stage: first pending training units:"
{ grep -E '^train/.* pending' "$work/plan.txt" || true; } | sed -n '1,4s/^/  /p'
# STAGE_PLAN_ONLY=1: the checks above only (tests/test_experiments_stage.py), nothing packed.
if [ "${STAGE_PLAN_ONLY:-0}" = 1 ]; then
    exit 0
fi
if [ "${STAGE_DONE_ONLY:-0}" = 1 ]; then
    mkdir -p "$out" && cp "$work/done_units.tgz" "$out/done_units_$profile.tgz"
    echo "claim_stage: wrote $out/done_units_$profile.tgz ($(du -h "$out/done_units_$profile.tgz" | cut -f1))"
    exit 0
fi
bash "$ROOT/experiments/sft_stage.sh" "$out" "$pieces" "$work/done_units.tgz"
