"""Forward-pass benchmark: JAX (jit) vs PyTorch eager on the same weights and input.

    python bench/forward.py --batch 1 8          # every family, the README table
    python bench/forward.py --variants swinb_celeba_224 --runs 10

Each (framework, variant, batch) runs in a fresh subprocess so peak memory is its own: peak
resident memory (ru_maxrss) on CPU, peak device memory on GPU. Latency is the median of
``--runs`` calls after compilation/warm-up; the JAX process never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# one variant of every encoder family (plus the smallest Swin)
DEFAULT_VARIANTS = ["swinb_celeba_512", "swinb_celeba_224", "swinv2b_celeba_512",
                    "convnext_celeba_512", "mobilenet_celeba_512", "efficientnet_celeba_512",
                    "resnet_celeba_512"]


def _rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss survives exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _input(resolution: int, batch: int):
    import numpy as np

    from segface_jax.examples import sample_face

    _, x, lm = sample_face(resolution)
    return np.repeat(x, batch, 0), np.repeat(lm, batch, 0)


def worker_jax(ckpt: str, batch: int, runs: int, precision: str) -> dict:
    """Load the converted checkpoint, compile, time the forward."""
    import jax

    jax.config.update("jax_default_matmul_precision",
                      "highest" if precision == "highest" else "tensorfloat32")

    import segface_jax

    model = segface_jax.load(ckpt)
    x, lm = _input(model.resolution, batch)
    lm = lm if model.variant.needs_landmarks else None
    x = jax.device_put(x)
    t0 = time.perf_counter()
    model(x, landmarks=lm).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x, landmarks=lm).block_until_ready()
        times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    peak = stats["peak_bytes_in_use"] / 2**20 if stats else _rss_mb()
    median = statistics.median(times)
    return {"ms": 1000 * median, "compile_s": compile_s - median, "peak_mb": peak,
            "device": str(dev.device_kind)}


def worker_torch(release: str, variant: str, batch: int, runs: int, device: str,
                 precision: str, compiled: bool = False) -> dict:
    """Build the reference, load the same weights, time float32 inference: eager, or under
    ``torch.compile`` (inductor; the warm-up call compiles)."""
    import torch

    from segface_jax.convert import reference
    from segface_jax.convert.converter import load_state_dict
    from segface_jax.variants import get_variant

    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    v = get_variant(variant)
    model = reference.build_reference(v)
    model.load_state_dict({k: torch.from_numpy(a) for k, a in load_state_dict(release).items()})
    model = model.eval().to(device)
    if compiled:
        model = torch.compile(model)
    x, lm = _input(v.resolution, batch)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
    lm = torch.from_numpy(lm).to(device) if v.needs_landmarks else None
    times = []

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        model(x, lm)
        sync()
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x, lm)
            sync()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb()
    return {"ms": 1000 * statistics.median(times), "peak_mb": peak,
            "threads": torch.get_num_threads(), "device": device}


def _run_worker(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Prepare weights once, run every measurement in its own process, print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--torch-device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="highest", choices=["highest", "tf32"],
                   help="float32 matmul/conv mode for both frameworks on GPU (CPU is always full)")
    p.add_argument("--torch-compile", action="store_true",
                   help="add a torch.compile (inductor) column; compiling takes minutes")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, *rest = a.worker
        if kind == "jax":
            out = worker_jax(rest[0], int(rest[1]), int(rest[2]), rest[3])
        else:
            out = worker_torch(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4], rest[5],
                               compiled=kind == "torch-compile")
        print(json.dumps(out))
        return

    from segface_jax.convert.converter import convert_checkpoint
    from segface_jax.convert.parity import seeded_release
    from segface_jax.variants import get_variant

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="segface-bench-") as tmp:
        for name in a.variants:
            v = get_variant(name)
            release = seeded_release(v, tmp)
            ckpt = Path(tmp) / f"{name}-orbax"
            convert_checkpoint(release, ckpt, name)
            for b in a.batch:
                j = _run_worker(["--worker", "jax", str(ckpt), str(b), str(a.runs), a.precision])
                t = _run_worker(["--worker", "torch", str(release), name, str(b), str(a.runs),
                                 a.torch_device, a.precision])
                c = (_run_worker(["--worker", "torch-compile", str(release), name, str(b),
                                  str(a.runs), a.torch_device, a.precision])
                     if a.torch_compile else None)
                rows.append((name, b, j, t, c))
                print(f"done {name} batch {b}: jax {j['ms']:.0f} ms, torch {t['ms']:.0f} ms",
                      file=sys.stderr, flush=True)
            release.unlink()
    mem = "peak device MiB" if a.torch_device == "cuda" else "peak RSS MiB"
    print(f"\nJAX device: {rows[0][2]['device']}; torch: {rows[0][3]['device']}, "
          f"{rows[0][3]['threads']} threads; median of {a.runs} runs; "
          f"float32 matmul precision {a.precision}\n")
    compiled_head = "torch.compile ms | JAX vs compile | " if a.torch_compile else ""
    print(f"| variant | batch | JAX ms | torch ms | torch/JAX | {compiled_head}JAX img/s "
          f"| torch img/s | JAX compile s | JAX {mem} | torch {mem} |")
    print("|---|---:|---:|---:|---:|" + "---:|" * (5 + 2 * a.torch_compile))
    for name, b, j, t, c in rows:
        compiled_cells = f"{c['ms']:.1f} | {c['ms'] / j['ms']:.2f} | " if c else ""
        print(f"| {name} | {b} | {j['ms']:.1f} | {t['ms']:.1f} | {t['ms'] / j['ms']:.2f} | "
              f"{compiled_cells}{1000 * b / j['ms']:.2f} | {1000 * b / t['ms']:.2f} | "
              f"{j['compile_s']:.1f} | {j['peak_mb']:.0f} | {t['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
