#!/usr/bin/env bash
# What of this checkout travels with each device call, and how to send less of it.
#
#   bash experiments/device_tree.sh bytes [now|slim]    # bytes that travel now / after `slim`
#   bash experiments/device_tree.sh slim                # leave the committed results behind
#   bash experiments/device_tree.sh full                # bring them back
#
# Every call carries the working tree (tracked and untracked-not-ignored files) plus what it
# names in carry, 64 MiB in all. The committed results (experiments/results: per-question
# samples, records, device logs) are most of the tree, ~2 MB more with every claim run, and
# nothing on the device reads them (finished units travel inside the staged tar as
# done_units.tgz) except claim 3's head subsets. Left in, they shrink each staging piece
# (more calls per session) and, before claim 3 ends, would pass 64 MiB on their own.
#
# `slim` uses git's sparse checkout to take those files out of the working tree (they stay
# committed and in the index; `git status` stays clean; a modified file is kept, with git's
# warning). Untracked files there still travel. Run `full` before anything that reads or
# writes experiments/results here (unbundle, the reports, commits of results): `git add` of a
# path outside the sparse set is refused.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# The folders under experiments/results that the device needs.
KEEP=(claim3_subsets)

# Paths that travel: with "now", the tracked and untracked-not-ignored ones; with "slim",
# what would travel after `slim`: tracked files outside experiments/results (but KEEP), plus
# those inside it that are modified (the sparse checkout keeps them), plus every untracked,
# not ignored file (a sparse checkout leaves those alone).
_paths() {
    local mode=$1
    if [ "$mode" = slim ]; then
        local keep
        keep=$(printf '%s|' "${KEEP[@]}")
        {
            # grep -z: NUL-separated records in and out.
            git ls-files -z --cached | grep -zEv "^experiments/results/" || true
            git ls-files -z --cached | grep -zE "^experiments/results/(${keep%|})/" || true
            git ls-files -z --modified
            git ls-files -z --others --exclude-standard
        } | sort -zu
    else
        git ls-files -z --cached --others --exclude-standard
    fi
}

_bytes() {
    # stat of each existing file (a sparse-checkout-removed one is skipped: it does not travel).
    # xargs exits 123 when any stat fails: expected here, not an error.
    _paths "$1" | { xargs -0 -r stat -c %s -- 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}'
}

case ${1:-} in
bytes)
    mode=${2:-now}
    case $mode in
    now | slim) _bytes "$mode" ;;
    *)
        echo "device_tree: error: bytes takes now or slim, not $mode" >&2
        exit 2
        ;;
    esac
    ;;
slim)
    patterns=('/*' '!/experiments/results/*')
    for k in "${KEEP[@]}"; do patterns+=("/experiments/results/$k/"); done
    git sparse-checkout set --no-cone "${patterns[@]}"
    echo "device_tree: slim: $(_bytes now) bytes now travel (run 'device_tree.sh full' after the device calls)"
    ;;
full)
    git sparse-checkout disable
    echo "device_tree: full: $(_bytes now) bytes travel"
    ;;
*)
    echo "usage: device_tree.sh bytes [now|slim] | slim | full" >&2
    exit 2
    ;;
esac
