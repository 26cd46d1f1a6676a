#!/usr/bin/env bash
# The four start-up probes of session 18 on the device (benchmarks/results/session18/
# startup_probes_h100.txt), run after `experiments/sft_device.sh prep gemma-3-270m` on the same
# machine. Committed after the run: each probe is the command sent then, verbatim, as one
# function. Usage: bash benchmarks/device_startup_probes.sh 1|2|3|4
set -u
export PYTHONPATH=$HOME/sft_site:$PWD/src CALIBRATED_LM_CACHE=$HOME/clm_cache HF_HUB_OFFLINE=1

probe1() {  # each step of open_model timed, the image's defaults (no bytecode written)
    ls -la $HOME/clm_cache $HOME/clm_cache/tokenizers 2>&1 | head
    python3 -c "
import time,cProfile,pstats
t=time.perf_counter()
import torch; print('torch',round(time.perf_counter()-t,2))
t=time.perf_counter(); torch.zeros(1,device='cuda'); print('cuda init',round(time.perf_counter()-t,2))
t=time.perf_counter(); import transformers; print('transformers',round(time.perf_counter()-t,2))
from calibrated_lm.models import loading as L
t=time.perf_counter(); r=L.resolve_model('gemma-3-270m'); print('resolve',round(time.perf_counter()-t,2))
t=time.perf_counter(); c=L.convert_gguf(r); print('convert (cached)',round(time.perf_counter()-t,2))
for i in range(2):
  t=time.perf_counter(); L._load_tokenizer(c, False); print('tokenizer',i,round(time.perf_counter()-t,2))
pr=cProfile.Profile(); pr.enable(); t=time.perf_counter(); o=L.open_model('gemma-3-270m'); print('open_model',round(time.perf_counter()-t,2)); pr.disable()
pstats.Stats(pr).sort_stats('cumulative').print_stats(14)
t=time.perf_counter(); m=L.load_weights(o); torch.cuda.synchronize(); print('weights',round(time.perf_counter()-t,2))
" 2>&1 | grep -v Warning | head -60
}

probe2() {  # cProfile of resolve_model + convert_gguf (cached) after importing torch, transformers
    ls -la $HOME/clm_cache/gguf $HOME/clm_cache/converted/*
    python3 -c "
import time,cProfile,pstats
import torch, transformers
from calibrated_lm.models import loading as L
pr=cProfile.Profile(); pr.enable()
t=time.perf_counter(); r=L.resolve_model('gemma-3-270m'); print('resolve',round(time.perf_counter()-t,2))
t=time.perf_counter(); c=L.convert_gguf(r); print('convert (cached)',round(time.perf_counter()-t,2))
pr.disable()
pstats.Stats(pr).sort_stats('cumulative').print_stats(22)
" 2>&1 | grep -v Warning | head -70
}

probe3() {  # the same eval three times with a bytecode cache (PYTHONPYCACHEPREFIX)
    echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}"
    python3 -c "import sys; print('dont_write', sys.dont_write_bytecode)"
    ls /opt/torch/.venv/lib/python3.12/site-packages/transformers/__pycache__ 2>&1 | head -2
    touch /opt/torch/.venv/lib/python3.12/site-packages/transformers/.w && echo writable
    unset PYTHONDONTWRITEBYTECODE
    export PYTHONPYCACHEPREFIX=$HOME/pyc
    for i in 1 2 3; do
        rm -rf $HOME/ev$i
        python3 -m calibrated_lm.cli eval --model gemma-3-270m --tasks hellaswag --split validation \
            --limit 2000 --chat-template off --device cuda --dtype bfloat16 --no-progress \
            --output $HOME/ev$i >/dev/null 2>&1
        python3 -c "import json;t=json.load(open('$HOME/ev$i/summary.json'))['protocol']['timing'];print($i, {k:t[k] for k in ('process_start_to_eval_s','tasks_read_s','model_load_s','weights_load_s','to_scoring_start_s','process_to_first_batch_s','scoring_s','questions_per_s')})"
    done
}

probe4() {  # -X importtime with the bytecode cache warm (after probe 3), and sklearn alone
    unset PYTHONDONTWRITEBYTECODE
    export PYTHONPYCACHEPREFIX=$HOME/pyc
    python3 -X importtime -c "
import torch, transformers
from calibrated_lm.models import loading as L
o=L.open_model('gemma-3-270m'); m=L.load_weights(o)
" 2>$OUT/importtime_h100_warm_pyc.txt
    sort -t'|' -k2 -n -r $OUT/importtime_h100_warm_pyc.txt | head -25
    python3 -c "
import time; t=time.perf_counter(); import sklearn; print('sklearn', round(time.perf_counter()-t,2))"
}

case "${1:-}" in
1 | 2 | 3 | 4) "probe$1" ;;
*) echo "usage: $0 1|2|3|4" >&2; exit 2 ;;
esac
