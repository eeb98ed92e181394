"""Training-step benchmark: the JAX step (jit, donated) vs upstream's PyTorch step, same batch.

    python bench/train_step.py                       # mobilenet_celeba_512 and swinb_celeba_224
    python bench/train_step.py --batch 2 --runs 3 --variants swinb_celeba_224

One step = forward, 0.5 CE + 0.5 Dice, backward, AdamW (lr 1e-4, wd 1e-5), in training mode
(BatchNorm batch statistics; stochastic depth as torchvision's default). Both start from the
same seeded release-format weights. Each (framework, variant) runs in its own process; we
report the median step after two warm-up steps (compilation for JAX), images/s, and peak
resident memory (peak device memory and model FLOPs utilisation on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import _rss_mb  # noqa: E402

DEFAULT_VARIANTS = ["mobilenet_celeba_512", "swinb_celeba_224"]


def _batch(resolution: int, batch: int, classes: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8),
            rng.integers(0, classes, (batch, resolution, resolution)).astype(np.uint8))


def worker_jax(ckpt: str, batch: int, runs: int, dtype: str = "float32") -> dict:
    """Time the jitted, donated training step of the converted checkpoint, computing in
    ``dtype`` (parameters and optimizer state stay float32)."""
    import jax
    import numpy as np

    from segface_jax.checkpoint import load
    from segface_jax.train import optim, step
    from segface_jax.train.mesh import data_mesh

    model = load(ckpt, dtype=None if dtype == "float32" else dtype)
    v = model.variant
    images, labels = _batch(v.resolution, batch, v.num_classes)
    tx = optim.adamw(1e-4, 1e-5)
    graphdef, state = step.init_state(model.module, tx)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,)) if batch < \
        jax.device_count() else data_mesh()
    train = step.make_train_step(graphdef, tx, mesh, dice_group=None,
                                 needs_landmarks=v.needs_landmarks)
    b = {"image": images, "label": labels, "landmarks": np.zeros((batch, 5, 2), np.float32)}
    lowered = train.lower(state, b)
    flops = (lowered.compile().cost_analysis() or {}).get("flops")
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        state, metrics = train(state, b)
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    peak = stats["peak_bytes_in_use"] / 2**20 if stats else _rss_mb()
    return {"s": statistics.median(times), "peak_mb": peak, "flops": flops,
            "device": str(dev.device_kind)}


def worker_torch(pt: str, variant: str, batch: int, runs: int, device: str) -> dict:
    """Time upstream's step on the PyTorch reference (torch.optim.AdamW)."""
    import numpy as np
    import torch

    from segface_jax.convert import reference
    from segface_jax.variants import get_variant

    v = get_variant(variant)
    model = reference.build_reference(v)
    model.load_state_dict(torch.load(pt, weights_only=True)["state_dict_backbone"])
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    images, labels = _batch(v.resolution, batch, v.num_classes)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    x = torch.from_numpy(((images / np.float32(255) - mean) / std).astype(np.float32))
    x = x.permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    lm = torch.zeros(batch, 5, 2, device=device) if v.needs_landmarks else None

    def dice(logits):
        p = logits.softmax(1)
        t = torch.nn.functional.one_hot(y, v.num_classes).permute(0, 3, 1, 2).float()
        inter = (p * t).sum((0, 2, 3))
        d = (2 * inter + 1e-5) / ((p * p).sum((0, 2, 3)) + (t * t).sum((0, 2, 3)) + 1e-5)
        return (1 - d).mean()

    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        opt.zero_grad()
        logits = model(x, lm)
        loss = 0.5 * torch.nn.functional.cross_entropy(logits, y) + 0.5 * dice(logits)
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else _rss_mb()
    return {"s": statistics.median(times), "peak_mb": peak}


def _run(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Prepare seeded checkpoints, run every measurement in its own process, print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--torch-device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="JAX compute dtype (parameters stay float32; torch runs float32)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="accelerator peak at --dtype for model FLOPs utilisation")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "jax":
            out = worker_jax(rest[0], int(rest[1]), int(rest[2]), rest[3])
        else:
            out = worker_torch(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4])
        print(json.dumps(out))
        return

    from segface_jax.convert.converter import convert_checkpoint
    from segface_jax.convert.parity import seeded_release
    from segface_jax.variants import get_variant

    rows = []
    with tempfile.TemporaryDirectory(prefix="segface-bench-train-") as tmp:
        for name in args.variants:
            v = get_variant(name)
            pt = seeded_release(v, tmp)
            convert_checkpoint(pt, Path(tmp) / name, name, overwrite=True)
            j = _run(["--worker", "jax", str(Path(tmp) / name), str(args.batch),
                      str(args.runs), args.dtype])
            t = _run(["--worker", "torch", str(pt), name, str(args.batch), str(args.runs),
                      args.torch_device])
            rows.append((name, j, t))
            print(f"{name}: JAX {j['s']:.2f} s/step, torch {t['s']:.2f} s/step", flush=True)
    print(f"\nJAX computes in {args.dtype}; torch in float32")
    print("\n| variant | batch | JAX s/step | torch s/step | torch/JAX | JAX img/s | torch img/s"
          " | JAX peak MiB | torch peak MiB | JAX GFLOP/step | MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, j, t in rows:
        gflop = f"{j['flops'] / 1e9:.0f}" if j["flops"] else "-"
        mfu = (f"{100 * j['flops'] / j['s'] / (args.peak_tflops * 1e12):.1f}%"
               if j["flops"] and args.peak_tflops else "-")
        print(f"| {name} | {args.batch} | {j['s']:.2f} | {t['s']:.2f} | {t['s'] / j['s']:.2f} "
              f"| {args.batch / j['s']:.2f} | {args.batch / t['s']:.2f} | {j['peak_mb']:.0f} "
              f"| {t['peak_mb']:.0f} | {gflop} | {mfu} |")


if __name__ == "__main__":
    main()
