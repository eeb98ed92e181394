#!/usr/bin/env bash
# One prepared run for a lent GPU machine (its image has JAX, Flax, Orbax, optax, torch and
# torchvision): installs this repo and segment-anything (carried as a wheel in .gpu/) without
# dependencies, then writes into $OUT, most important first, each section under a share of
# BUDGET_S seconds so that whatever finished comes back:
#   env.txt               device, driver, versions
#   parity_gpu.txt        JAX on the GPU (matmul precision highest) against torch, seeded weights
#   bench_train_gpu.txt   the training step, JAX vs torch eager vs torch.compile, bf16 and float32
#   bench_memory_gpu.txt  per-device memory of the step (XLA's analysis and both measured peaks)
#   bench_gpu.txt         forward pass, JAX vs torch eager
# Before the call, here: echo /.gpu/ >> .git/info/exclude; python3 -m pip download --no-deps
# segment-anything==1.0 -d .gpu; then device run "bash bench/run_gpu.sh" with carry [".gpu"].
# MFU is against the H200's dense peak (NVIDIA datasheet: bf16 989.4 TFLOP/s; float32 runs as
# TF32 under JAX's default matmul precision and torch's "high", 494.7 TFLOP/s).
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# run SECONDS_AT_MOST FILE COMMAND...: append COMMAND's output to FILE, cut at the budget
run() {
  local cap=$1 file=$2; shift 2
  local t; t=$(left); [ "$cap" -lt "$t" ] && t=$cap
  if [ "$t" -lt 20 ]; then echo "skipped (time budget): $*" >> "$file"; return; fi
  echo "\$ $* (at $(( $(date +%s) - START )) s, at most $t s)" >> "$file"
  timeout "$t" "$@" >> "$file" 2>&1 || echo "exit status $? (124: over $t s)" >> "$file"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -m pip install -q --no-deps .gpu/segment_anything-*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e .
  python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, torchvision as tv; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'torch', torch.__version__, 'torchvision', tv.__version__, jax.devices())"
  lscpu | grep -E 'Model name|^CPU\(s\)'
} > "$OUT/env.txt" 2>&1
CKPT=/tmp/segface-gpu-ckpt
TRAIN="python3 bench/train_step.py --torch-device cuda --runs 10 --checkpoints $CKPT"
T="$OUT/bench_train_gpu.txt"
# Seen on the H200 (2026-11-29): compiling Swin-B 512's training step took JAX 100-150 s
# (bfloat16; float32 did not finish in 100 s) and torch.compile more than 150 s, so each
# measurement gets 240 s and the sections run most important first.
# the headline: Swin-B 512 in bfloat16 at per-device batch 16, JAX against torch eager
run 300 "$T" $TRAIN --timeout 240 --dtype bfloat16 --peak-tflops 989.4 --batch 16 \
  --variants swinb_celeba_512
run 240 "$OUT/parity_gpu.txt" python3 -c "import sys; from segface_jax.cli import main; \
sys.exit(main())" parity --variant swinb_celeba_512 --out "$OUT/parity_gpu.png"
run 300 "$T" $TRAIN --timeout 280 --dtype bfloat16 --peak-tflops 989.4 --batch 16 \
  --torch-compile --skip jax torch --variants swinb_celeba_512
run 300 "$T" $TRAIN --timeout 240 --dtype float32 --peak-tflops 494.7 --batch 16 \
  --variants swinb_celeba_512
run 300 "$T" $TRAIN --timeout 240 --dtype bfloat16 --peak-tflops 989.4 --batch 16 \
  --variants mobilenet_celeba_512
run 300 "$T" $TRAIN --timeout 240 --dtype bfloat16 --peak-tflops 989.4 --batch 8 4 \
  --variants swinb_celeba_512
run 300 "$OUT/bench_memory_gpu.txt" python3 bench/memory.py --torch-device cuda \
  --variants swinb_celeba_512 --batch 8 --remat none block --dtype bfloat16
run 300 "$OUT/bench_gpu.txt" python3 bench/forward.py --torch-device cuda --batch 1 8 \
  --precision tf32 --runs 20 --variants swinb_celeba_512
echo "done at $(( $(date +%s) - START )) s" >> "$OUT/env.txt"
