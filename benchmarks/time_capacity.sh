#!/usr/bin/env bash
# Wall time and peak memory of `calibrated-lm capacity` on both embedded models (docs/results.md,
# the capacity table). Converted models are read from the user cache; a first run also converts.
# Usage: bash benchmarks/time_capacity.sh OUT_FILE
set -euo pipefail
out=${1:?usage: bash benchmarks/time_capacity.sh OUT_FILE}
bin=${BIN:-.venv/bin}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
    echo "# calibrated-lm capacity, wall time and peak RSS ($(git rev-parse --short HEAD), $(nproc) cores)"
    for model in smollm2-135m-instruct gemma-3-270m; do
        echo "## $model; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
        /usr/bin/time -f "wall_s %e
max_rss_kb %M" "$bin/calibrated-lm" capacity --model "$model" --output "$tmp/$model" \
            > "$tmp/$model.log" 2> "$tmp/$model.time" || { cat "$tmp/$model.time"; exit 1; }
        grep -E '^(wall_s|max_rss_kb) ' "$tmp/$model.time"
        echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
    done
} | tee "$out"
