#!/usr/bin/env bash
# The GPU benchmark as one device call. On the GPU machine, from the repository root,
# with the wheels of bench/gpu_wheels.sh in .whl/ and a source shard (both carried; the
# bench repeats a shard's samples to make N and 10N):
#
#     bash bench/gpu.sh            # figures to $OUT (or bench/) as results-gpu.json + log
#
# It installs the wheels beside the image's torch and transformers, builds the papers'
# model shapes with random weights (curate.tiny_models --size paper, ~1 min), and runs
# bench/run.py on bench/gpu.yaml: model-only ceiling, the pipeline on N and 10N samples,
# the naive one-image loop, GPU utilisation. Extra arguments go to bench/run.py (for
# tuning: --set captioner.batch_size=128).
set -euo pipefail
OUT=${OUT:-bench}
SAMPLES=${SAMPLES:-128}
INPUT=${INPUT:-data/openclipart/00000.tar}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
test -f out/paper-models/clip/model.safetensors || python3 -m curate.tiny_models out/paper-models --size paper
python3 bench/run.py --pipeline bench/gpu.yaml --input "$INPUT" \
    --samples "$SAMPLES" --per-shard 64 --model-samples "$SAMPLES" --naive-samples 32 \
    --json "$OUT/results-gpu.json" "$@" 2>&1 | tee "$OUT/bench-gpu.log"
