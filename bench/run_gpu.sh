#!/usr/bin/env bash
# One prepared run for a lent GPU machine (its image has JAX, Flax, Orbax, torch, torchvision):
# installs this repo and segment-anything (carried as a wheel in .gpu/) without dependencies,
# then prints the GPU forward table and a GPU parity check into $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps .gpu/segment_anything-*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1
HF_HUB_OFFLINE=1 segface-jax parity --variant swinb_celeba_512 --out "$OUT/parity_gpu.png" > "$OUT/parity_gpu.txt" 2>&1 || true
python3 bench/forward.py --torch-device cuda --batch 1 8 --runs 20 \
  --variants swinb_celeba_512 swinb_celeba_224 convnext_celeba_512 > "$OUT/bench_gpu.txt" 2>&1
# Training step (bench/train_step.py, one GPU, so the batch is the per-device batch): the JAX
# step at float32 and bfloat16 against torch eager (float32) on the same seeded weights and
# batch, per-device batch 4, 8 and 16; s/step, images/s, peak device memory, XLA GFLOP/step
# and MFU against the H200's dense peak (NVIDIA datasheet: bf16 989.4 TFLOP/s; float32 runs as
# TF32 under JAX's default matmul precision, 494.7 TFLOP/s).
for dtype in float32 bfloat16; do
  peak=$([ "$dtype" = bfloat16 ] && echo 989.4 || echo 494.7)
  for batch in 4 8 16; do
    # torch runs float32 in both passes: its torch.compile column is taken once, with float32
    compiled=$([ "$dtype" = float32 ] && echo --torch-compile || true)
    python3 bench/train_step.py --torch-device cuda --dtype "$dtype" --peak-tflops "$peak" \
      --batch "$batch" --runs 10 --variants swinb_celeba_512 mobilenet_celeba_512 $compiled \
      >> "$OUT/bench_train_gpu.txt" 2>&1 || echo "train_step $dtype batch $batch failed" \
      >> "$OUT/bench_train_gpu.txt"
  done
done
# Per-device memory of the training step, like for like: XLA's memory analysis and the measured
# peak_bytes_in_use (JAX) against torch.cuda.max_memory_allocated (torch, float32).
python3 bench/memory.py --torch-device cuda --batch 1 2 4 8 > "$OUT/bench_memory_gpu.txt" 2>&1 \
  || echo "memory benchmark failed" >> "$OUT/bench_memory_gpu.txt"
