"""Training-step memory, like for like: XLA's buffer assignment vs torch's allocator peak.

    python bench/memory.py                                  # the README table (CPU)
    python bench/memory.py --variants swinb_celeba_512 --batch 1 2 --remat none block
    python bench/memory.py --torch-device cuda              # on a GPU: both frameworks' peaks

JAX: the step (forward, 0.5 CE + 0.5 Dice, backward, AdamW; donated state) is lowered and
compiled for one device from abstract shapes, nothing is allocated, and
``compiled.memory_analysis()`` gives its arguments (parameters, optimizer state, batch),
outputs, the outputs aliased onto donated arguments, and temporaries (activations kept for
the backward pass, gradients, workspace). Peak per device = arguments + outputs - aliased +
temporaries. On a GPU the JAX column is also measured: ``peak_bytes_in_use`` after one step.

torch: upstream's step on the PyTorch reference (training mode), float32. On a GPU,
``torch.cuda.max_memory_allocated``. On a CPU, torch keeps no allocator statistics, so the
profiler records every allocation and free (``profile_memory=True``) from before the model
is built until after the second step; the running sum of their sizes is the live tensor
memory, and its maximum the peak. Neither side counts the process's code, the XLA compiler
or Python objects: process RSS does, which is why it is not used here.

Each measurement runs in its own process; one table row per setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import _batch, run_worker, torch_step, xla_memory  # noqa: E402

DEFAULT_VARIANTS = ["swinb_celeba_512", "mobilenet_celeba_512"]


def worker_jax(variant: str, batch: int, remat: str, dtype: str, run: bool) -> dict:
    """XLA's memory analysis of the compiled step (and the measured peak when ``run``)."""
    import jax
    import numpy as np
    from flax import nnx

    from segface_jax.models import SegFace, SegFaceConfig
    from segface_jax.models.layers import set_remat
    from segface_jax.train import optim, step
    from segface_jax.variants import get_variant

    v = get_variant(variant)
    tx = optim.adamw(1e-4, 1e-5)
    graphdef = {}

    def state():
        model = SegFace(SegFaceConfig.from_variant(v), rngs=nnx.Rngs(0),
                        dtype=None if dtype == "float32" else dtype)
        set_remat(model, remat)
        graphdef["g"], s = step.init_state(model, tx)
        return s

    abstract = jax.eval_shape(state)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    train = step.make_train_step(graphdef["g"], tx, mesh, dice_group=None,
                                 needs_landmarks=v.needs_landmarks)
    r = v.resolution
    spec = {"image": jax.ShapeDtypeStruct((batch, r, r, 3), np.uint8),
            "label": jax.ShapeDtypeStruct((batch, r, r), np.uint8),
            "landmarks": jax.ShapeDtypeStruct((batch, 5, 2), np.float32)}
    lowered = train.lower(abstract, spec)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    out = xla_memory(compiled)
    dev = jax.devices()[0]
    out["device"], out["compile_s"] = dev.device_kind, compile_s
    if run and dev.platform != "cpu":
        images, labels = _batch(r, batch, v.num_classes)
        data = {"image": images, "label": labels,
                "landmarks": np.zeros((batch, 5, 2), np.float32)}
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        s = jax.jit(state, out_shardings=replicated)()
        s, metrics = compiled(s, data)
        jax.block_until_ready(metrics)
        out["measured_peak"] = dev.memory_stats()["peak_bytes_in_use"]
    return out


def worker_torch(variant: str, batch: int, device: str) -> dict:
    """Peak tensor memory of upstream's float32 step (the allocator's, not the process's)."""
    import torch

    def run() -> None:
        step = torch_step(variant, batch, device)
        step()
        step()  # the second step also holds the first step's optimizer state

    if device != "cpu":
        run()
        return {"peak": torch.cuda.max_memory_allocated()}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"peak": peak}


def _run(args: list[str]) -> dict:
    return run_worker(__file__, args)


def main() -> None:
    """Run every (variant, batch, remat, dtype) in its own process; print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4, 8],
                   help="per-device batch sizes")
    p.add_argument("--remat", nargs="+", default=["none", "block"],
                   choices=["none", "block", "encoder"])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"])
    p.add_argument("--torch-device", default="cpu")
    p.add_argument("--no-torch", action="store_true", help="JAX rows only")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "jax":
            out = worker_jax(rest[0], int(rest[1]), rest[2], rest[3], rest[4] == "run")
        else:
            out = worker_torch(rest[0], int(rest[1]), rest[2])
        print(json.dumps(out))
        return

    gib = 2.0**30
    run = "run" if args.torch_device != "cpu" else "compile"

    print("| variant | batch/device | remat | dtype | arguments | temporaries | outputs - aliased"
          " | JAX peak (XLA) | JAX peak (measured) | torch peak (float32, no remat)"
          " | JAX compile s |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.variants:
        for batch in args.batch:
            t = (None if args.no_torch
                 else _run(["--worker", "torch", name, str(batch), args.torch_device]))
            for remat in args.remat:
                for dtype in args.dtype:
                    j = _run(["--worker", "jax", name, str(batch), remat, dtype, run])
                    measured = (f"{j['measured_peak'] / gib:.2f}" if "measured_peak" in j
                                else "-")
                    torch_peak = (f"{t['peak'] / gib:.2f}"
                                  if t and remat == "none" and dtype == "float32" else "")
                    print(f"| {name} | {batch} | {remat} | {dtype} "
                          f"| {j['arguments'] / gib:.2f} | {j['temporaries'] / gib:.2f} "
                          f"| {(j['outputs'] - j['aliased']) / gib:.2f} "
                          f"| {j['peak'] / gib:.2f} | {measured} | {torch_peak} "
                          f"| {j['compile_s']:.0f} |",
                          flush=True)
    print("\nGiB per device; JAX from XLA's memory analysis of the compiled step on "
          f"{j['device']}.")


if __name__ == "__main__":
    main()
