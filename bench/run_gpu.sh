#!/usr/bin/env bash
# One prepared run for a lent GPU machine (its image has JAX, Flax, Orbax, optax, torch and
# torchvision): installs this repo and segment-anything (carried as a wheel in .gpu/) without
# dependencies, then runs three lanes side by side within BUDGET_S seconds, writing into $OUT:
#   env.txt          device, driver, versions
#   lane_jax.txt     JAX training steps (bench/train_step.py): Swin-B 512 bfloat16 with a
#                    profiler trace (jax_trace.json.gz, jax_hlo.txt.gz), then float32, then
#                    MobileNetV3 512
#   lane_torch.txt   the same steps in torch eager (with torch_profile.txt) and torch.compile
#   memory.txt       XLA's memory analysis of the Swin-B 512 step per device batch, remat and
#                    dtype (bench/memory.py; compiled with autotuning off, nothing executed)
# Steps (and JAX's compilation, whose autotuning times kernels on the device) are timed under
# one file lock, so no two lanes time at once; compilation of the other lanes still runs.
# Read the profile here, at no device time: python bench/profile_step.py --from-dir OUT.
# Before the call, here: echo /.gpu/ >> .git/info/exclude; python3 -m pip download --no-deps
# segment-anything==1.0 -d .gpu; then device run "bash bench/run_gpu.sh" with carry [".gpu"].
# MFU is against the H200's dense peak (NVIDIA datasheet: bf16 989.4 TFLOP/s; float32 runs as
# TF32 under JAX's default matmul precision and torch's "high", 494.7 TFLOP/s).
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SEGFACE_BENCH_DEVICE_LOCK=/tmp/segface-device.lock
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
  CKPT=/tmp/segface-gpu-ckpt
  mkdir -p $CKPT
  # the seeded checkpoints, once, before the lanes share them
  JAX_PLATFORMS=cpu python3 -c "import sys; sys.path.insert(0, 'bench'); \
from train_step import _checkpoints; from pathlib import Path; \
[_checkpoints(n, Path('$CKPT')) for n in ('swinb_celeba_512', 'mobilenet_celeba_512')]"
  echo "checkpoints ready at $(( $(date +%s) - START )) s"
} > "$OUT/env.txt" 2>&1
TRAIN="python3 bench/train_step.py --torch-device cuda --runs 10 --checkpoints /tmp/segface-gpu-ckpt"
BF16="--dtype bfloat16 --peak-tflops 989.4"
F32="--dtype float32 --peak-tflops 494.7"
SWIN="--variants swinb_celeba_512 --batch 16"
MOBILE="--variants mobilenet_celeba_512 --batch 16"
lane_jax() {
  local f="$OUT/lane_jax.txt"
  export XLA_PYTHON_CLIENT_MEM_FRACTION=.45  # the torch lane shares the device
  run 300 "$f" $TRAIN --skip torch $BF16 $SWIN --profile-dir "$OUT"
  run 260 "$f" $TRAIN --skip torch $F32 $SWIN
  run 200 "$f" $TRAIN --skip torch $BF16 $MOBILE
}
lane_torch() {
  local f="$OUT/lane_torch.txt"
  run 120 "$f" $TRAIN --skip jax $BF16 $SWIN --profile-dir "$OUT"
  run 360 "$f" $TRAIN --skip jax torch --torch-compile $BF16 $SWIN
  run 100 "$f" $TRAIN --skip jax $F32 $SWIN
  run 100 "$f" $TRAIN --skip jax $BF16 $MOBILE
}
lane_memory() {
  # compile only, autotuning off: this lane times no kernels on the device and runs no step
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 \
    run 520 "$OUT/memory.txt" python3 bench/memory.py --no-torch --torch-device cpu \
    --variants swinb_celeba_512 --batch 8 16 4 2 1 --remat none block --dtype bfloat16 float32
}
lane_jax & lane_torch & lane_memory &
wait
echo "done at $(( $(date +%s) - START )) s" >> "$OUT/env.txt"
