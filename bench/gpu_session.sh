#!/usr/bin/env bash
# One short GPU session (about 8 minutes on an H200, capped below 10): the GPU tests, then the GPU benchmark.
# Everything lands in $OUT (default ./gpu_out): pytest_gpu.txt, gpu_offload.json (+ .log), decode_costs.json.
#
#     bash bench/gpu_session.sh
#     DEVICE=cpu SHAPE=tiny bash bench/gpu_session.sh     # a dry run of the script itself, anywhere
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-mixtral}
DTYPE=float16; [ "$DEVICE" = cpu ] && DTYPE=float32
start=$(date +%s)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
# 1. correctness on the GPU: CUDA vs CPU logits, placements, graphs vs eager, the benchmark at a tiny shape
timeout 170 "$PY" -m pytest -m gpu -q -x -p no:cacheprovider tests/ > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest -m gpu: exit $? after $(( $(date +%s) - start ))s" | tee -a "$OUT/pytest_gpu.txt"
# 2. decode costs on the GPU (round trips, dispatched ops per token), fp16, torch and fused kernels, on the
#    fully fusable tiny shape (docs/BENCHMARKS.md has the CPU counts of the same command)
timeout 150 "$PY" bench/decode_costs.py --device "$DEVICE" --dtype "$DTYPE" --kernel torch triton --shape tiny \
    > "$OUT/decode_costs.json" 2> "$OUT/decode_costs.log"
# 3. the benchmark at Mixtral-8x7B's shapes; variants stop starting after --budget-s, fused_kernels.py capped
left=$(( 560 - ($(date +%s) - start) ))
budget=$(( left - 120 )); [ "$budget" -lt 60 ] && budget=60
timeout "$left" "$PY" bench/gpu_offload.py --device "$DEVICE" --shape "$SHAPE" --tokens 32 --budget-s "$budget" \
    --kernels-timeout-s 60 > "$OUT/gpu_offload.json" 2> "$OUT/gpu_offload.log"
rc=$?
tail -n 1 "$OUT/gpu_offload.log"
echo "gpu_offload: exit $rc after $(( $(date +%s) - start ))s" | tee -a "$OUT/gpu_offload.log"
