#!/usr/bin/env bash
# The GPU benchmarks of issues 13 and 15 in one device call, for the device time a claim-2
# session leaves over (its runs come first).
#
#   bash benchmarks/device_benches.sh stage [OUT_DIR=.carry/bench]   # here: the wheels
#   bash benchmarks/device_benches.sh run [SECONDS=540]               # there, carry OUT_DIR
#   bash benchmarks/device_benches.sh trl [SECONDS=200]               # there: issue 13's check
#   bash benchmarks/device_benches.sh eval [SECONDS=300]              # there: issue 15's eval
#   bash benchmarks/device_benches.sh pipeline                        # there: eval's host ceiling
#   bash benchmarks/device_benches.sh scale [SECONDS=300]             # there: rate vs model size
#   bash benchmarks/device_benches.sh gradw [SECONDS=240] [crossover] # there: grad_W update
#   bash benchmarks/device_benches.sh loss [SECONDS=300] [SHAPE ...]  # there: bench_loss.py
#
# `stage` downloads (no dependencies: the device image has the rest, see the device tool's
# KINDS.md) TRL and what it needs beyond the image (datasets, dill, multiprocess for the
# device's Python 3.12), Liger-Kernel and Cut Cross-Entropy. `run` installs them into
# $HOME/bench_site and runs, within SECONDS in all, writing under $OUT:
#   trl_step_h200.{md,json}  benchmarks/bench_trl_step.py (issue 13: a TRL SFT step of the
#                            gemma-3-270m shape at 8 x 1024 tokens, TRL's NLL vs the patched
#                            smoothed loss; written after each variant)
#   trl_step_profiles.txt    per variant, what is alive at one step's memory peak
#                            (bench_trl_step.py --memory), then the profiler's top operators
#   loss_h200.{md,json}      benchmarks/bench_loss.py: the rows of issue 15's table, the ones
#                            not yet measured first (written after each shape, so a time-out
#                            keeps them); the gemma3-270m head and its breakdown ran in
#                            session 13
#   gpu.txt, trl_step_log.txt, loss_log.txt: the GPU and image versions, the two logs
# (8 files: as many as one call brings back.)
set -u
cmd=${1:-}
# The carried wheels into $HOME/bench_site, and the environment the benchmarks run in.
install_wheels() {
    local carry=${CARRY:-.carry/bench} site=$HOME/bench_site
    (cd "$carry" && sha256sum -c --quiet SHA256SUMS) || exit 3
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$carry"/*.whl \
        || exit 3
    export PYTHONPATH="$site:$PWD/src" TQDM_MININTERVAL=15 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
}
case "$cmd" in
stage)
    out=${2:-.carry/bench}
    rm -rf "$out" && mkdir -p "$out"
    pip=(.venv/bin/python -m pip download -q --no-deps -d "$out")
    "${pip[@]}" trl==1.16.0 datasets==5.2.0 dill==0.4.1 liger-kernel==0.8.5 \
        cut-cross-entropy==25.1.1 || exit 3
    "${pip[@]}" --only-binary=:all: --python-version 3.12 multiprocess==0.70.19 || exit 3
    # lm-evaluation-harness 0.4.13 and what it needs beyond the image (all pure Python; the
    # three sdists built into wheels here), for `eval`. pytz: typepy imports it when lm-eval
    # prints its results table (session 17: lm-eval exited 1 there, after writing its samples).
    "${pip[@]}" lm-eval==0.4.13 evaluate==0.4.6 pytablewriter==1.2.1 dataproperty==1.1.1 \
        mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 \
        chardet==6.0.0.post1 more-itertools==11.2.1 nltk==3.10.4 pytz==2025.2 || exit 3
    .venv/bin/python -m pip wheel -q --no-deps -w "$out" sqlitedict==2.1.0 word2number==1.1 \
        rouge-score==0.1.2 || exit 3
    rm -f "$out"/*.tar.gz "$out"/*.zip
    # The scorer before the output-layer gather (session 15), for `eval`'s A-B comparison.
    git show 4691b5d:src/calibrated_lm/evaluation/scoring.py >"$out/scoring_4691b5d.py" || exit 3
    # This checkout's src with session 16's tokenising-ahead patch, for `pipeline`'s A-B.
    ahead=$(mktemp -d)
    git archive HEAD src | tar -x -C "$ahead" || exit 3
    patch -s -p1 -d "$ahead" <benchmarks/results/session16/tokenize_ahead.patch || exit 3
    tar -czf "$out/src_tokenize_ahead.tgz" -C "$ahead" src && rm -rf "$ahead"
    (cd "$out" && sha256sum -- *.whl *.py *.tgz >SHA256SUMS)
    du -sh "$out" && ls "$out"
    ;;
trl)
    # Issue 13's memory check alone (session 14's predictions, benchmarks/results/session14/):
    # the GPU test that repeated loss calls do not grow memory, then the TRL step without
    # trl_ls, with the memory record. 6 files under $OUT; ~100 s on a warm machine.
    limit=${2:-200}
    install_wheels
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_loss_triton.py \
        -k repeated_calls >"$OUT/stream_test.txt" 2>&1
    test_rc=$?
    tail -n 1 "$OUT/stream_test.txt"
    prof=$(mktemp -d)
    # 15 timed steps (TRL_STEPS): session 18's five left the H100's host noise bigger than
    # the differences between variants.
    timeout "$limit" python3 benchmarks/bench_trl_step.py --profile "$prof" --memory "$prof" \
        --steps "${TRL_STEPS:-15}" \
        --variants trl_nll,calibrated,calibrated_rows512,calibrated_rows512_onestream \
        --out "$OUT/trl_step_h200.md" --json "$OUT/trl_step_h200.json" >"$OUT/trl_step_log.txt" 2>&1
    bench_rc=$?
    echo "bench_trl_step: exit $bench_rc"
    cat "$prof"/trl_step_memory_*.txt "$prof"/trl_step_profile_*.txt >"$OUT/trl_step_profiles.txt" 2>/dev/null
    tail -n 4 "$OUT/trl_step_log.txt"
    # Non-zero when the test or the benchmark failed (the files above are kept either way).
    [ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
    ;;
eval)
    # Issue 15, goal 2, on the model and task data a claim session's `sft_device.sh prep`
    # left in $HOME (sft_site, clm_cache). First the scorer before and after the output-layer
    # gather (session 15), A-B-B-A in one process on gemma-3-270m: its speed-up on the GPU
    # and whether any score moves there (bit-identical on the CPU); ~60 s. Then all of
    # HellaSwag validation, lm-eval's HF backend (batch auto) and `calibrated-lm eval`,
    # bf16. 5 files under $OUT.
    # `eval LIMIT float32`: only the HellaSwag comparison, both sides in fp32 (whether the
    # differing predictions of the bf16 run are rounding), into eval_hellaswag_GPU_float32.md,
    # after compare_hellaswag_tokens.py (hellaswag_tokens_GPU.md). 4 files under $OUT.
    limit=${2:-300}
    dtype=${3:-bfloat16}
    install_wheels
    export PYTHONPATH="$HOME/sft_site:$PYTHONPATH" CALIBRATED_LM_CACHE="$HOME/clm_cache"
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | awk '{print tolower($2)}')
    if [ "$dtype" != bfloat16 ]; then
        # Session 23: first, both tools' token ids on this machine's tokenizer and converted
        # model (no weights read, ~30 s): whether the GPU run's differences start there.
        start=$(date +%s)
        timeout 120 python3 benchmarks/compare_hellaswag_tokens.py --lm-eval-path "$HOME/bench_site" \
            --out "$OUT/hellaswag_tokens_$gpu.md" >"$OUT/tokens_log.txt" 2>&1
        echo "compare_hellaswag_tokens: exit $? after $(($(date +%s) - start)) s"
        limit=$((limit - ($(date +%s) - start)))
        timeout "$limit" python3 benchmarks/bench_eval_vs_lm_eval.py --lm-eval-path "$HOME/bench_site" \
            --task hellaswag --limit 0 --device cuda --dtype "$dtype" --batch-size auto \
            --model gemma-3-270m --out "$OUT/eval_hellaswag_${gpu}_$dtype.md" >"$OUT/eval_log_$dtype.txt" 2>&1
        rc=$?
        tail -n 12 "$OUT/eval_log_$dtype.txt"
        exit $rc
    fi
    start=$(date +%s)
    timeout 150 python3 benchmarks/bench_scoring.py --before "${CARRY:-.carry/bench}/scoring_4691b5d.py" \
        --before-label 4691b5d --model gemma-3-270m --device cuda --limit 300 \
        --tasks arc_easy,arc_challenge,piqa,sciq,openbookqa,hellaswag \
        --out "$OUT/scoring_h200_head_gather.md" --json "$OUT/scoring_h200_head_gather.json" \
        >"$OUT/scoring_log.txt" 2>&1
    echo "bench_scoring: exit $? after $(($(date +%s) - start)) s"
    tail -n 3 "$OUT/scoring_h200_head_gather.md" 2>/dev/null
    limit=$((limit - ($(date +%s) - start)))
    timeout "$limit" python3 benchmarks/bench_eval_vs_lm_eval.py --lm-eval-path "$HOME/bench_site" \
        --task hellaswag --limit 0 --device cuda --dtype bfloat16 --batch-size auto \
        --model gemma-3-270m --out "$OUT/eval_hellaswag_h200.md" >"$OUT/eval_log.txt" 2>&1
    rc=$?
    tail -n 12 "$OUT/eval_log.txt"
    exit $rc
    ;;
pipeline)
    # Issue 15, goal 2: the host's work alone (bench_eval_pipeline.py: the real eval on all of
    # HellaSwag with a free model, GPU batch plan, on this machine's CPUs), this checkout
    # against it with the next window tokenised in a thread (session 16: slower on 2 cores;
    # the device has 16). A-B-A, 2 runs each, ~3 min. 3 files under $OUT.
    install_wheels
    export PYTHONPATH="$HOME/sft_site:$PYTHONPATH" CALIBRATED_LM_CACHE="$HOME/clm_cache"
    ahead=$(mktemp -d)
    tar -xzf "${CARRY:-.carry/bench}/src_tokenize_ahead.tgz" -C "$ahead" || exit 3
    for tag in head_a ahead head_b; do
        src=()
        [ "$tag" = ahead ] && src=(--src "$ahead/src")
        timeout 200 python3 benchmarks/bench_eval_pipeline.py --model gemma-3-270m --repeat 2 --plan gpu "${src[@]}" \
            --json "$OUT/pipeline_h200_host_$tag.json" 2>&1 | tail -n 1
    done
    ;;
scale)
    # Issue 15, goal 3: the scoring rate against model size (bench_scoring_scale.py: the
    # embedded 135M and 270M with real weights, random Gemma 3 1B/4B/12B text stacks), 500
    # HellaSwag + 500 ARC-Easy questions each, bf16, one process; on the gemma-3-270m that a
    # claim session's `prep` converted. The cost growth of the loss against N is `run`'s
    # gemma2-2b N8192..N65536 rows. 2 files under $OUT.
    limit=${2:-300}
    export PYTHONPATH="$HOME/sft_site:$PWD/src" CALIBRATED_LM_CACHE="$HOME/clm_cache" HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    timeout "$limit" python3 benchmarks/bench_scoring_scale.py --device cuda \
        --tasks hellaswag,arc_easy --limit 500 \
        --out "$OUT/scoring_scale_h200.md" --json "$OUT/scoring_scale_h200.json" 2>&1 | tail -n 6
    ;;
gradw)
    # Issue 15, goal 1: the weight-gradient update, cuBLAS addmm against the Triton kernel that
    # reads the old tile while its products run, and the vocabulary-outer order
    # (bench_grad_weight.py), then the GPU tests of both. `gradw SECONDS crossover`: only the
    # default against the vocabulary-outer order at D 640..2,304 (where it stops paying).
    # The bench comes first (session 20: the tests took the whole of a 150 s timeout).
    # Needs nothing carried. 4 files under $OUT.
    limit=${2:-240}
    mode=()
    [ "${3:-}" = crossover ] && mode=(--crossover)
    export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    timeout "$limit" python3 benchmarks/bench_grad_weight.py --out "$OUT" "${mode[@]}" 2>&1 | tail -n 30
    timeout "${GRADW_TEST_S:-300}" python3 -m pytest -q -x -p no:cacheprovider tests/test_loss_triton.py \
        -k "grad_weight or weight_update or low_precision or float64_oracle" >"$OUT/gradw_tests.txt" 2>&1
    echo "GPU tests: exit $?"
    tail -n 1 "$OUT/gradw_tests.txt"
    ;;
loss)
    # Issue 15, goal 1: bench_loss.py at the named shapes (all when none), against the peers,
    # with the environment's settings of ours (e.g. CALIBRATED_LM_LCE_GRAD_W=triton), which
    # the table states. 2 files under $OUT.
    limit=${2:-300}
    shift 2 2>/dev/null || shift $#
    shapes=()
    [ $# -gt 0 ] && shapes=(--shapes "$@")
    install_wheels
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    timeout "$limit" python3 benchmarks/bench_loss.py --out "$OUT/loss_h200" \
        "${shapes[@]}" >"$OUT/loss_log.txt" 2>&1
    echo "bench_loss: exit $?"
    tail -n 12 "$OUT/loss_log.txt"
    ;;
run)
    limit=${2:-540}
    install_wheels
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    # datasets 5.2 wants pyarrow >= 24 and fsspec <= 2026.9: the image's versions, on record.
    python3 -m pip show pyarrow fsspec 2>/dev/null | grep -E '^(Name|Version)' | tee -a "$OUT/gpu.txt"
    start=$(date +%s)
    # TRL first (half the time: session 9 gave it a third and its third variant did not run);
    # the loss table fills the rest.
    prof=$(mktemp -d)
    # trl_ls last: session 10 measured it, and it is the slowest.
    timeout $((limit / 2)) python3 benchmarks/bench_trl_step.py --profile "$prof" --memory "$prof" \
        --variants trl_nll,calibrated,calibrated_rows512,trl_ls \
        --out "$OUT/trl_step_h200.md" --json "$OUT/trl_step_h200.json" >"$OUT/trl_step_log.txt" 2>&1
    echo "bench_trl_step: exit $? after $(($(date +%s) - start)) s"
    cat "$prof"/trl_step_memory_*.txt "$prof"/trl_step_profile_*.txt >"$OUT/trl_step_profiles.txt" 2>/dev/null
    left=$((limit - ($(date +%s) - start) - 10))
    # Session 13 measured gemma3-270m (with the breakdown), llama3-8b, mistral-7b and gemma2-2b
    # N65536 (benchmarks/results/session13/): the rows it did not reach come first.
    timeout "$left" python3 benchmarks/bench_loss.py --out "$OUT/loss_h200" \
        --shapes "gemma2-2b" "gemma2-2b softcap30" "gemma2-2b N16384" "gemma2-2b N32768" \
        "gemma2-2b N65536" "llama3-8b" "mistral-7b" >"$OUT/loss_log.txt" 2>&1
    echo "bench_loss: exit $? after $(($(date +%s) - start)) s"
    tail -n 3 "$OUT/trl_step_log.txt" "$OUT/loss_log.txt"
    ;;
*)
    echo "usage: device_benches.sh stage [OUT_DIR] | run [SECONDS] | trl [SECONDS] | eval [SECONDS] | pipeline | scale [SECONDS]" >&2
    exit 2
    ;;
esac
