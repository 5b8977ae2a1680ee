#!/usr/bin/env bash
# The GPU benchmark as one device call. On the GPU machine, from the repository root,
# with the wheels of bench/gpu_wheels.sh in .whl/ and a source shard (both carried; the
# bench repeats a shard's samples to make N and 10N):
#
#     bash bench/gpu.sh            # figures to $OUT (or bench/): results/<gpu>.json + bench-gpu.log
#
# <gpu> is the device's name as bench/flops.py's peak table spells it (h200, h100-sxm, ...):
# commit results/<gpu>.json as bench/results/<gpu>.json, next to bench/RESULTS.md.
# It installs the wheels beside the image's torch and transformers, builds the papers'
# model shapes with random weights (bench/paper_models.py, ~1 min), and runs
# bench/run.py on bench/gpu.yaml: pipeline on N and 10N samples, model-only ceiling, the
# naive one-image loop, GPU utilisation, FLOPs per sample and MFU against the device's
# dense bf16 peak (or --peak-tflops, passed through). Then, while the time budget (BUDGET_S, counted
# from the start) allows, it measures the pipeline alone under each tuning variant in
# TUNE (one per line, each a list of --set overrides) as results-tune-K.json. Extra
# arguments go to every bench/run.py call.
set -euo pipefail
START=$SECONDS
OUT=${OUT:-bench}
SAMPLES=${SAMPLES:-256}
NAIVE=${NAIVE:-32}
INPUT=${INPUT:-data/openclipart/00000.tar}
BUDGET_S=${BUDGET_S:-480}
# the first variant is the captioner on transformers' generate() (fast_decoding off): the before figure
TUNE=${TUNE-"--set captioner.fast_decoding=false
--set captioner.resources.concurrency=3 --set captioner.resources.num_gpus=0.25 --set filter.resources.num_gpus=0.125 --set ranker.resources.num_gpus=0.125
--set captioner.resources.batch_size=128"}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
LOG="$OUT/bench-gpu.log"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
GPU=$(python3 -m bench.flops --slug "${GPU_NAME:-gpu}")
mkdir -p "$OUT/results"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c 'import sys, torch, transformers, ray, pyarrow, numpy
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "ray", ray.__version__, "pyarrow", pyarrow.__version__, "numpy", numpy.__version__)'
    t=$SECONDS
    test -f out/paper-models/clip/model.safetensors || python3 -m bench.paper_models out/paper-models
    echo "gpu.sh: models ready in $((SECONDS - t)) s"
} 2>&1 | tee "$LOG"
status=0
python3 bench/run.py --pipeline bench/gpu.yaml --input "$INPUT" \
    --samples "$SAMPLES" --per-shard 64 --model-samples "$SAMPLES" --naive-samples "$NAIVE" \
    --json "$OUT/results/$GPU.json" "$@" 2>&1 | tee -a "$LOG" || status=1
k=0
while IFS= read -r variant; do
    [ -n "$variant" ] || continue
    k=$((k + 1))
    left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -lt 90 ]; then
        echo "gpu.sh: tuning variant $k ($variant) skipped: ${left} s of the budget left" | tee -a "$LOG"
        continue
    fi
    echo "gpu.sh: tuning variant $k: $variant (${left} s left)" | tee -a "$LOG"
    # shellcheck disable=SC2086  # a variant is a list of arguments
    timeout "$left" python3 bench/run.py --pipeline bench/gpu.yaml --input "$INPUT" \
        --samples "$SAMPLES" --per-shard 64 --parts pipeline $variant \
        --json "$OUT/results-tune-$k.json" "$@" 2>&1 | tee -a "$LOG" || status=1
done <<<"$TUNE"
echo "gpu.sh: done in $((SECONDS - START)) s" | tee -a "$LOG"
exit $status
