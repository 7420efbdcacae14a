#!/usr/bin/env bash
# One prepared run on a GPU machine that has torch, transformers, peft, grpcio and protobuf but not
# this package: the GPU tests, the benchmark on a random-weight Llama-3.2-1B-shaped model, then
# issue 12's serving-core workload on an 8B-shaped Llama and a Gemma-3-shaped model.
#
# Prepare here (needs PyPI), then carry .gpu/ with the working tree:
#   scripts/gpu_check.sh --prepare
# On the GPU machine (STAGES: any of tests, bench-1b, serving; default all three, in that order):
#   OUT=/some/dir scripts/gpu_check.sh [STAGES...]
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=.gpu
PY=${PY:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
    rm -rf "$ASSETS" && mkdir -p "$ASSETS/wheels" "$ASSETS/tokenizer"
    # What the GPU image lacks; grpcio itself stays the image's (1.84).
    .venv/bin/pip download --quiet --no-deps -d "$ASSETS/wheels" grpcio-health-checking==1.84.0 \
        grpcio-reflection==1.84.0 pytest pluggy iniconfig prometheus-client tqdm
    # The default model's tokenizer, so the random-weight model tokenizes like the real one.
    .venv/bin/python - "$ASSETS/tokenizer" <<'PY'
import sys
from softprompt.server.app.loading import default_cache_dir, resolve_model_path
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(resolve_model_path(None, default_cache_dir())[0]).save_pretrained(sys.argv[1])
PY
    du -sh "$ASSETS"
    exit 0
fi

OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
work=$(mktemp -d)
# The package lives in top-level folders mapped to softprompt.*; link them under one import root.
mkdir -p "$work/src/softprompt"
for part in server client protos prompts benchmarks; do ln -s "$PWD/$part" "$work/src/softprompt/$part"; done
for wheel in "$ASSETS"/wheels/*.whl; do
    $PY -m pip install --quiet --no-index --no-deps --target "$work/deps" "$wheel" || echo "not installed: $wheel"
done
export PYTHONPATH="$work/src:$work/deps${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

stages=("${@:-tests bench-1b serving}")
stages=" ${stages[*]} "
if [[ "$stages" == *" tests "* ]]; then
# The detokenizer's property test needs hypothesis (a CPython-version-specific wheel) and no GPU: CI runs it.
$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine.py tests/test_kv_pool.py \
    -k "not detokenizing" 2>&1 | tee "$OUT/tests.txt"
fi

if [[ "$stages" == *" bench-1b "* ]]; then
# The issue's workload: batch 64, 64 input + 128 new tokens, 20 virtual tokens, 8 tasks.
$PY -m softprompt.benchmarks.cli --random-weights scripts/llama-3.2-1b-config.json --model "$ASSETS/tokenizer" \
    --device cuda --requests 64 --clients 64 --batch-size 64 --tasks 8 --virtual-tokens 20 --input-tokens 64 \
    --new-tokens 128 --skip a,f --json "$OUT/bench-1b.json" 2>"$OUT/bench-1b.log" | tee "$OUT/bench-1b.txt"
fi

if [[ "$stages" == *" serving "* ]]; then
# Issue 12: bf16, batch 64 and 256, 128 input + 128 new tokens, 20 virtual tokens, 8 tasks; our engine (d)
# against HF static-cache generate of the bare model (g) and PEFT per task (c), graphs against eager,
# and as a fraction of the memory-bandwidth bound (scripts/gpu_summary.py).
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
    *H200*) bw=4800 ;; *H100*) bw=3350 ;; *A100*) bw=2039 ;; *L40S*) bw=864 ;; *) bw=${BW_GBS:?set BW_GBS to the GPU memory bandwidth in GB/s} ;;
esac
for model in llama-3.1-8b gemma-3-4b; do
    for batch in 64 256; do
        run="$OUT/$model-b$batch"
        common=(--random-weights "scripts/$model-config.json" --model "$ASSETS/tokenizer" --device cuda
                --dtype bfloat16 --requests "$batch" --clients "$batch" --batch-size "$batch" --tasks 8
                --virtual-tokens 20 --input-tokens 128 --new-tokens 128)
        $PY -m softprompt.benchmarks.cli "${common[@]}" --skip a,b,e,f,h --json "$run.json" \
            2>"$run.log" | tee "$run.txt"
        $PY -m softprompt.benchmarks.cli "${common[@]}" --no-cuda-graphs --skip a,b,c,e,f,g,h \
            --json "$run-eager.json" 2>>"$run.log" | tee -a "$run.txt"
        $PY scripts/gpu_summary.py --bandwidth-gbs "$bw" "scripts/$model-config.json" "$run.json" "$run-eager.json" \
            | tee -a "$OUT/summary.txt"
    done
done
fi
