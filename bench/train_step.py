"""Training-step benchmark: the JAX step (jit, donated) vs upstream's PyTorch step, same batch.

    python bench/train_step.py                       # mobilenet_celeba_512 and swinb_celeba_224
    python bench/train_step.py --batch 2 --runs 3 --variants swinb_celeba_224

One step = forward, 0.5 CE + 0.5 Dice, backward, AdamW (lr 1e-4, wd 1e-5), in training mode
(BatchNorm batch statistics; stochastic depth as torchvision's default). Both start from the
same seeded release-format weights. Each (framework, variant) runs in its own process; we
report the median step after two warm-up steps (compilation for JAX, and for torch.compile
with ``--torch-compile``), images/s, the step's FLOPs from XLA's cost analysis and the
GFLOP/s each side reaches (against ``--peak-tflops``), and on a GPU peak device memory.
Memory like for like on any device: bench/memory.py.
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

    from segface_jax.runtime import load
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
    compiled = lowered.compile()  # timed below as it is: nothing compiles twice
    flops = (compiled.cost_analysis() or {}).get("flops")
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        state, metrics = compiled(state, b)
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    peak = stats["peak_bytes_in_use"] / 2**20 if stats else None
    return {"s": statistics.median(times), "peak_mb": peak, "flops": flops,
            "device": str(dev.device_kind)}


def torch_step(variant: str, batch: int, device: str, pt: str | None = None,
               compiled: bool = False):
    """Upstream's training step on the PyTorch reference (``pt``'s weights, or torch's random
    init), ready to call: forward (eager, or the model under ``torch.compile``), 0.5 CE +
    0.5 Dice, backward, ``torch.optim.AdamW``."""
    import numpy as np
    import torch

    from segface_jax.convert import reference
    from segface_jax.variants import get_variant

    v = get_variant(variant)
    model = reference.build_reference(v)
    if pt is not None:
        model.load_state_dict(torch.load(pt, weights_only=True)["state_dict_backbone"])
    model = model.to(device).train()
    forward = torch.compile(model) if compiled else model
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

    def step() -> None:
        opt.zero_grad()
        logits = forward(x, lm)
        loss = 0.5 * torch.nn.functional.cross_entropy(logits, y) + 0.5 * dice(logits)
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    return step


def worker_torch(pt: str, variant: str, batch: int, runs: int, device: str,
                 compiled: bool = False) -> dict:
    """Time upstream's step (``torch_step``), eager or under ``torch.compile`` (inductor; the
    warm-up steps compile)."""
    import torch

    step = torch_step(variant, batch, device, pt, compiled)
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None
    return {"s": statistics.median(times), "peak_mb": peak}


def run_worker(script: str, args: list[str]) -> dict:
    """Run ``script --worker ...`` in a fresh process; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(args: list[str]) -> dict:
    return run_worker(__file__, args)


def main() -> None:
    """Prepare seeded checkpoints, run every measurement in its own process, print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--torch-device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="JAX compute dtype (parameters stay float32; torch runs float32)")
    p.add_argument("--torch-compile", action="store_true",
                   help="add a torch.compile (inductor) column; compiling takes minutes")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak at --dtype (CPU: e.g. 0.157 for 2 AVX2 cores), "
                        "for the share of peak each side reaches")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "jax":
            out = worker_jax(rest[0], int(rest[1]), int(rest[2]), rest[3])
        else:
            out = worker_torch(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4],
                               compiled=kind == "torch-compile")
        print(json.dumps(out))
        return

    from segface_jax.convert.converter import convert_checkpoint
    from segface_jax.convert.parity import seeded_release
    from segface_jax.variants import get_variant

    torch_kinds = ["torch", "torch-compile"] if args.torch_compile else ["torch"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="segface-bench-train-") as tmp:
        for name in args.variants:
            v = get_variant(name)
            pt = seeded_release(v, tmp)
            convert_checkpoint(pt, Path(tmp) / name, name, overwrite=True)
            j = _run(["--worker", "jax", str(Path(tmp) / name), str(args.batch),
                      str(args.runs), args.dtype])
            t = [_run(["--worker", kind, str(pt), name, str(args.batch), str(args.runs),
                       args.torch_device]) for kind in torch_kinds]
            rows.append((name, j, t))
            print(f"{name}: JAX {j['s']:.2f} s/step, "
                  + ", ".join(f"{k} {r['s']:.2f} s/step" for k, r in zip(torch_kinds, t)),
                  flush=True)
    print(f"\nJAX computes in {args.dtype}, torch in float32; {j['device']}; GFLOP/s is the "
          "step's FLOPs (XLA cost analysis) per second of each side")
    compile_head = " torch.compile s/step | JAX vs compile |" if args.torch_compile else ""
    peak_head = " JAX % of peak | torch % of peak |" if args.peak_tflops else ""
    gpu = args.torch_device != "cpu"
    mem_head = " JAX peak MiB | torch peak MiB |" if gpu else ""
    print(f"\n| variant | batch | JAX s/step | torch eager s/step | JAX speed vs eager |"
          f"{compile_head} JAX img/s | GFLOP/step | JAX GFLOP/s | torch GFLOP/s |"
          f"{peak_head}{mem_head}")
    print("|---|---:" + "|---:" * (7 + 2 * args.torch_compile + 2 * bool(args.peak_tflops)
                                   + 2 * gpu) + "|")
    for name, j, t in rows:
        flops = j["flops"] or float("nan")
        cells = [name, args.batch, f"{j['s']:.2f}", f"{t[0]['s']:.2f}",
                 f"{t[0]['s'] / j['s']:.2f}x"]
        if args.torch_compile:
            cells += [f"{t[1]['s']:.2f}", f"{t[1]['s'] / j['s']:.2f}x"]
        cells += [f"{args.batch / j['s']:.2f}", f"{flops / 1e9:.0f}",
                  f"{flops / j['s'] / 1e9:.0f}", f"{flops / t[0]['s'] / 1e9:.0f}"]
        if args.peak_tflops:
            cells += [f"{100 * flops / s / (args.peak_tflops * 1e12):.0f}%"
                      for s in (j["s"], t[0]["s"])]
        if gpu:
            cells += [f"{j['peak_mb']:.0f}", f"{t[0]['peak_mb']:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
