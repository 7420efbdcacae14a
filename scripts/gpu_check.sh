#!/usr/bin/env bash
# One prepared run on a GPU machine whose image has torch, transformers, peft, grpcio (1.84), protobuf (7.36) and
# safetensors with their own dependencies, but not this package nor its other dependencies, and no network: the
# GPU tests, the benchmark on a random-weight Llama-3.2-1B-shaped model, then issue 12's serving-core workload on
# an 8B-shaped Llama and a Gemma-3-shaped model.
#
# Prepare here (needs PyPI and, for the tokenizer, the default model), then carry .gpu/ with the working tree:
#   scripts/gpu_check.sh --prepare [wheels] [tokenizer]      (default both)
# On the GPU machine (STAGES: any of tests, bench-1b, serving; default all three, in that order):
#   OUT=/some/dir scripts/gpu_check.sh [STAGES...]
# The same stages on this CPU, on tiny versions of the configs, a few tokens each, the tests collected but not run
# (tests/test_gpu_check.py runs this in an environment holding only the image's packages):
#   PY=IMAGE_ENV/bin/python scripts/gpu_check.sh --dry-run [STAGES...]
# ASSETS (default .gpu) names the prepared folder, PY (default python3) the image's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=${ASSETS:-.gpu}
PY=${PY:-python3}
# All the run needs beyond the image. Pure-Python wheels only, so one download serves the image's Python 3.12 and
# the dry run's: health and reflection at the image's grpcio (their stubs need protobuf >= 7.35.1, the image has
# 7.36), pytest and its dependencies. Not here, as the run never imports them: the HTTP API's stack (fastapi,
# uvicorn, sse-starlette, pydantic; the bench's (i) is skipped), prometheus-client (no --metrics-port), boto3 (no
# s3:// store), gguf (only the default model's conversion, done here by --prepare tokenizer), matplotlib (training's
# loss plot) and hypothesis (the detokenizer's property test stays on CI).
WHEELS=(grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0
        pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0)

if [[ "${1:-}" == "--prepare" ]]; then
    shift
    parts=" ${*:-wheels tokenizer} "
    for part in $parts; do
        [[ "$part" == wheels || "$part" == tokenizer ]] || { echo "unknown part to prepare: $part" >&2; exit 2; }
    done
    mkdir -p "$ASSETS"
    if [[ "$parts" == *" wheels "* ]]; then
        rm -rf "$ASSETS/wheels"
        .venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d "$ASSETS/wheels" \
            "${WHEELS[@]}"
    fi
    if [[ "$parts" == *" tokenizer "* ]]; then
        # The default model's tokenizer, so the random-weight models tokenize like the real one.
        rm -rf "$ASSETS/tokenizer"
        .venv/bin/python - "$ASSETS/tokenizer" <<'PY'
import sys
from softprompt.server.app.loading import default_cache_dir, resolve_model_path
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(resolve_model_path(None, default_cache_dir())[0]).save_pretrained(sys.argv[1])
PY
    fi
    du -sh "$ASSETS"
    exit 0
fi

dry=false
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=true
    shift
fi
stages=("${@:-tests bench-1b serving}")
stages=" ${stages[*]} "
for stage in $stages; do
    [[ "$stage" =~ ^(tests|bench-1b|serving)$ ]] || { echo "unknown stage: $stage" >&2; exit 2; }
done
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The package lives in top-level folders mapped to softprompt.*; link them under one import root.
mkdir -p "$work/src/softprompt"
for part in server client protos prompts benchmarks; do ln -s "$PWD/$part" "$work/src/softprompt/$part"; done
# Offline, all at once: a wheel that does not install stops the run here, not minutes later at an import.
$PY -m pip install --quiet --no-index --no-deps --target "$work/deps" "$ASSETS"/wheels/*.whl
export PYTHONPATH="$work/src:$work/deps${PYTHONPATH:+:$PYTHONPATH}"

# What differs in a dry run: the CPU, float32, tiny shapes, a few tokens; appended to each bench command line, where
# the last of a repeated flag wins, so the GPU run's command lines are the ones that run.
if $dry; then
    tiny=(--device cpu --dtype float32 --requests 2 --clients 2 --batch-size 2 --tasks 2 --virtual-tokens 4
          --input-tokens 8 --new-tokens 4 --warmup 0)
    batches=(2)
    bw=1  # GB/s: only so the summary runs
    echo "dry run on the CPU" | tee "$OUT/gpu.txt"
else
    tiny=()
    batches=(64 256)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

# A model config: the GPU run's own, or in a dry run the same family and settings at a tiny width and depth.
config() {
    if ! $dry; then
        echo "scripts/$1-config.json"
        return
    fi
    $PY - "scripts/$1-config.json" "$work/$1-config.json" <<'PY'
import json, sys
values = json.load(open(sys.argv[1]))
values.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)
json.dump(values, open(sys.argv[2], "w"))
PY
    echo "$work/$1-config.json"
}

tests_failed=false
if [[ "$stages" == *" tests "* ]]; then
    # The detokenizer's property test needs hypothesis and no GPU: CI runs it. A dry run collects the tests (every
    # import they make at module level); CI runs them on the CPU anyway.
    collect=()
    if $dry; then collect=(--collect-only); fi
    # A failing test does not stop the run: the benchmark's minutes are worth having anyway; the exit status says.
    if ! $PY -m pytest -q -p no:cacheprovider "${collect[@]}" tests/test_gpu.py tests/test_engine.py \
            tests/test_kv_pool.py -k "not detokenizing" 2>&1 | tee "$OUT/tests.txt"; then
        tests_failed=true
    fi
fi

if [[ "$stages" == *" bench-1b "* ]]; then
    # The issue's workload: batch 64, 64 input + 128 new tokens, 20 virtual tokens, 8 tasks. Not (i): the HTTP API's
    # packages are not on the image, and what HTTP costs against gRPC is measured on CPU (BENCHMARKS.md).
    $PY -m softprompt.benchmarks.cli --random-weights "$(config llama-3.2-1b)" --model "$ASSETS/tokenizer" \
        --device cuda --requests 64 --clients 64 --batch-size 64 --tasks 8 --virtual-tokens 20 --input-tokens 64 \
        --new-tokens 128 --skip a,f,i "${tiny[@]}" --json "$OUT/bench-1b.json" 2>"$OUT/bench-1b.log" \
        | tee "$OUT/bench-1b.txt"
fi

if [[ "$stages" == *" serving "* ]]; then
    # Issue 12: bf16, batch 64 and 256, 128 input + 128 new tokens, 20 virtual tokens, 8 tasks; our engine (d)
    # against HF static-cache generate of the bare model (g) and PEFT per task (c), graphs against eager,
    # and as a fraction of the memory-bandwidth bound (scripts/gpu_summary.py).
    if ! $dry; then
        case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
            *H200*) bw=4800 ;; *H100*) bw=3350 ;; *A100*) bw=2039 ;; *L40S*) bw=864 ;;
            *) bw=${BW_GBS:?set BW_GBS to the GPU memory bandwidth in GB/s} ;;
        esac
    fi
    for model in llama-3.1-8b gemma-3-4b; do
        model_config=$(config "$model")
        for batch in "${batches[@]}"; do
            run="$OUT/$model-b$batch"
            common=(--random-weights "$model_config" --model "$ASSETS/tokenizer" --device cuda
                    --dtype bfloat16 --requests "$batch" --clients "$batch" --batch-size "$batch" --tasks 8
                    --virtual-tokens 20 --input-tokens 128 --new-tokens 128 "${tiny[@]}")
            $PY -m softprompt.benchmarks.cli "${common[@]}" --skip a,b,e,f,h,i --json "$run.json" \
                2>"$run.log" | tee "$run.txt"
            $PY -m softprompt.benchmarks.cli "${common[@]}" --no-cuda-graphs --skip a,b,c,e,f,g,h,i \
                --json "$run-eager.json" 2>>"$run.log" | tee -a "$run.txt"
            $PY scripts/gpu_summary.py --bandwidth-gbs "$bw" "$model_config" "$run.json" "$run-eager.json" \
                | tee -a "$OUT/summary.txt"
        done
    done
fi
if $tests_failed; then
    echo "the tests failed: $OUT/tests.txt" >&2
    exit 1
fi
