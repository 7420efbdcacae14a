#!/usr/bin/env bash
# One prepared run on a GPU machine that has torch, transformers, peft, grpcio and protobuf but not
# this package: the GPU tests, then the benchmark on a random-weight Llama-3.2-1B-shaped model.
#
# Prepare here (needs PyPI), then carry .gpu/ with the working tree:
#   scripts/gpu_check.sh --prepare
# On the GPU machine:
#   OUT=/some/dir scripts/gpu_check.sh
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

# The detokenizer's property test needs hypothesis (a CPython-version-specific wheel) and no GPU: CI runs it.
$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine.py -k "not detokenizing" 2>&1 \
    | tee "$OUT/tests.txt"

# The issue's workload: batch 64, 64 input + 128 new tokens, 20 virtual tokens, 8 tasks.
$PY -m softprompt.benchmarks.cli --random-weights scripts/llama-3.2-1b-config.json --model "$ASSETS/tokenizer" \
    --device cuda --requests 64 --clients 64 --batch-size 64 --tasks 8 --virtual-tokens 20 --input-tokens 64 \
    --new-tokens 128 --skip a,f --json "$OUT/bench-1b.json" 2>"$OUT/bench-1b.log" | tee "$OUT/bench-1b.txt"
