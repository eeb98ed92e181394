"""Training-step benchmark: the JAX step (jit, donated) vs upstream's PyTorch step, same batch.

    python bench/train_step.py                       # mobilenet_celeba_512 and swinb_celeba_224
    python bench/train_step.py --batch 2 --runs 3 --variants swinb_celeba_224

One step = forward, 0.5 CE + 0.5 Dice, backward, AdamW (lr 1e-4, wd 1e-5), in training mode
(BatchNorm batch statistics; stochastic depth as torchvision's default). Both start from the
same seeded release-format weights. Each (framework, variant) runs in its own process; we
report the median step after two warm-up steps (compilation for JAX, and for torch.compile
with ``--torch-compile``), images/s, the step's FLOPs as the trainer counts them
(train/perf.py) and the GFLOP/s each side reaches (against ``--peak-tflops``), and on a GPU
peak device memory. On a GPU torch computes float32 matmuls and convolutions in TF32, as JAX's
default precision does there. Beside each row: compile or warm-up time, the timed steps'
range and XLA's memory analysis. Memory like for like on any device: bench/memory.py.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import json
import os
import shutil
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


@contextlib.contextmanager
def exclusive_device():
    """Hold the file lock named by $SEGFACE_BENCH_DEVICE_LOCK (if set) for the block, so that
    benchmarks running side by side on one GPU time their steps one at a time."""
    path = os.environ.get("SEGFACE_BENCH_DEVICE_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def xla_memory(compiled) -> dict[str, int]:
    """XLA's memory analysis of a compiled step for one device, in bytes: arguments, outputs,
    outputs aliased onto donated arguments, temporaries, and the peak they add up to."""
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def worker_jax(ckpt: str, batch: int, runs: int, dtype: str = "float32",
               profile_dir: str = "") -> dict:
    """Time the jitted, donated training step of the converted checkpoint, computing in
    ``dtype`` (parameters and optimizer state stay float32); with ``profile_dir``, also trace
    one more step there (``jax_trace.json.gz``) beside the compiled HLO (``jax_hlo.txt.gz``)."""
    import jax
    import numpy as np

    from segface_jax.runtime import load
    from segface_jax.train import optim, perf, step
    from segface_jax.train.mesh import data_mesh

    if profile_dir:
        from profile_step import name_module_scopes  # each op's op_name names its module

        name_module_scopes()
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
    traced = train.trace(state, b)
    lowered = traced.lower()
    flops = perf.step_flops(traced, lowered)  # the trainer's count, for its MFU
    with exclusive_device():  # XLA:GPU's autotuning times kernels on the device
        t0 = time.perf_counter()
        compiled = lowered.compile()  # timed below as it is: nothing compiles twice
        compile_s = time.perf_counter() - t0
    memory = xla_memory(compiled)
    times = []
    with exclusive_device():
        for i in range(runs + 2):
            t0 = time.perf_counter()
            state, metrics = compiled(state, b)
            jax.block_until_ready(metrics["loss"])
            if i >= 2:
                times.append(time.perf_counter() - t0)
        if profile_dir:
            with tempfile.TemporaryDirectory(prefix="segface-trace-") as tmp:
                with jax.profiler.trace(tmp):
                    state, metrics = compiled(state, b)
                    jax.block_until_ready(metrics["loss"])
                trace = sorted(Path(tmp).glob("**/*.trace.json.gz"))[-1]
                shutil.copy(trace, Path(profile_dir) / "jax_trace.json.gz")
            with gzip.open(Path(profile_dir) / "jax_hlo.txt.gz", "wt") as f:
                f.write(compiled.as_text())
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    peak = stats["peak_bytes_in_use"] / 2**20 if stats else None
    return {"s": statistics.median(times), "spread": [min(times), max(times)],
            "peak_mb": peak, "flops": flops, "device": str(dev.device_kind),
            "compile_s": compile_s, "xla_memory": memory}


def torch_step(variant: str, batch: int, device: str, pt: str | None = None,
               compiled: bool = False, dtype: str = "float32"):
    """Upstream's training step on the PyTorch reference (``pt``'s weights, or torch's random
    init), ready to call: forward (eager, or the model under ``torch.compile``; under
    ``torch.autocast`` when ``dtype`` is bfloat16), 0.5 CE + 0.5 Dice, backward,
    ``torch.optim.AdamW``."""
    import numpy as np
    import torch

    from segface_jax.convert import reference
    from segface_jax.variants import get_variant

    v = get_variant(variant)
    if device != "cpu":  # float32 matmuls and convolutions as JAX's default precision runs them
        torch.set_float32_matmul_precision("high")  # TF32 on NVIDIA Tensor Cores
        torch.backends.cudnn.allow_tf32 = True
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
        with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=dtype != "float32"):
            logits = forward(x, lm)
        logits = logits.float()
        loss = 0.5 * torch.nn.functional.cross_entropy(logits, y) + 0.5 * dice(logits)
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    return step


def worker_torch(pt: str, variant: str, batch: int, runs: int, device: str,
                 compiled: bool = False, dtype: str = "float32", profile_dir: str = "") -> dict:
    """Time upstream's step (``torch_step``), eager or under ``torch.compile`` (inductor; the
    warm-up steps compile); with ``profile_dir``, also profile one more step there
    (``torch_profile.txt``: self time per op on the device, or on the CPU)."""
    import torch

    step = torch_step(variant, batch, device, pt, compiled, dtype)
    t0 = time.perf_counter()
    for _ in range(2):
        step()
    warm_s = time.perf_counter() - t0
    times = []
    with exclusive_device():
        for _ in range(runs):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        if profile_dir:
            _profile_torch(step, device, Path(profile_dir) / "torch_profile.txt")
    peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None
    return {"s": statistics.median(times), "spread": [min(times), max(times)],
            "peak_mb": peak, "warm_s": warm_s}


def _profile_torch(step, device: str, path: Path) -> None:
    """Write torch.profiler's table of one ``step`` to ``path``, by self device time."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device != "cpu"
    with profile(activities=[ProfilerActivity.CPU]
                 + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        step()
    averages = prof.key_averages()
    key = "self_cpu_time_total"
    if gpu:  # torch >= 2.4 names it "device"; older releases "cuda"
        key = ("self_device_time_total" if hasattr(averages[0], "self_device_time_total")
               else "self_cuda_time_total")
    with open(path, "a") as f:
        f.write(averages.table(sort_by=key, row_limit=60, max_name_column_width=90))


def run_worker(script: str, args: list[str], timeout: float | None = None) -> dict:
    """Run ``script --worker ...`` in a fresh process; its last stdout line is JSON. Raises
    RuntimeError (its last error line) when the worker fails or outlasts ``timeout`` seconds."""
    try:
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"over {timeout:.0f} s") from None
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr, flush=True)
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RuntimeError(lines[-1][-160:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(r: dict, fmt: str, key: str = "s") -> str:
    """A table cell: ``r[key]`` formatted, or '-' for a failed measurement."""
    return "-" if "error" in r or r.get(key) is None else format(r[key], fmt)


def _ratio(a: dict, b: dict) -> str:
    """b's time over a's ('1.20x': a is 1.2 times faster), or '-' where either failed."""
    return "-" if "error" in a or "error" in b else f"{b['s'] / a['s']:.2f}x"


def main() -> None:
    """Prepare seeded checkpoints, run every measurement in its own process, print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--batch", type=int, nargs="+", default=[2])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--torch-device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (parameters stay float32); torch runs bfloat16 under "
                        "torch.autocast")
    p.add_argument("--torch-compile", action="store_true",
                   help="add a torch.compile (inductor) column; compiling takes minutes")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak at --dtype (CPU: e.g. 0.157 for 2 AVX2 cores), "
                        "for the share of peak each side reaches (MFU)")
    p.add_argument("--checkpoints", default=None,
                   help="folder that keeps the seeded checkpoints between runs (default: a "
                        "temporary folder)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds each measurement may take; one that outlasts it shows '-'")
    p.add_argument("--skip", nargs="+", choices=["jax", "torch"], default=[],
                   help="leave these columns out (e.g. a torch.compile run on its own)")
    p.add_argument("--profile-dir", default="",
                   help="also trace one step of each side into this folder (JAX: the trace "
                        "and compiled HLO that bench/profile_step.py --from-dir reads; torch: "
                        "torch.profiler's table); one variant and batch per run")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "jax":
            out = worker_jax(rest[0], int(rest[1]), int(rest[2]), rest[3], rest[4])
        else:
            out = worker_torch(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4],
                               compiled=kind == "torch-compile", dtype=rest[5],
                               profile_dir=rest[6])
        print(json.dumps(out))
        return

    torch_kinds = ["torch", "torch-compile"] if args.torch_compile else ["torch"]
    gpu = args.torch_device != "cpu"
    print(f"Compute dtype {args.dtype} on both sides (parameters float32; torch under "
          f"torch.autocast for bfloat16). GFLOP/step as the trainer counts them "
          f"(train/perf.py); each side's GFLOP/s is that over its own step time; '-' is a "
          f"failed or timed-out run.")
    head = ("| variant | batch | JAX s/step | torch eager s/step | JAX speed vs eager |"
            + (" torch.compile s/step | JAX vs compile |" if args.torch_compile else "")
            + " JAX img/s | GFLOP/step | JAX GFLOP/s | torch GFLOP/s |"
            + (" JAX MFU | torch MFU |" if args.peak_tflops else "")
            + (" JAX peak MiB | torch peak MiB |" if gpu else ""))
    print("\n" + head + "\n|---|---:" + "|---:" * (head.count("|") - 3) + "|", flush=True)
    with tempfile.TemporaryDirectory(prefix="segface-bench-train-") as tmp:
        folder = Path(args.checkpoints or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.variants:
            pt, converted = _checkpoints(name, folder)
            for batch in args.batch:
                j = _run(["--worker", "jax", str(converted), str(batch), str(args.runs),
                          args.dtype, args.profile_dir], args.timeout, "jax" in args.skip)
                t = [_run(["--worker", kind, str(pt), name, str(batch), str(args.runs),
                           args.torch_device, args.dtype, args.profile_dir], args.timeout,
                          kind in args.skip) for kind in torch_kinds]
                print(_row(name, batch, j, t, args, gpu), flush=True)
                for who, r in zip(["JAX", *torch_kinds], [j, *t]):
                    if "error" in r and r["error"] != SKIPPED:
                        print(f"  ({name} batch {batch}, {who}: {r['error']})", flush=True)
                    elif "error" not in r:
                        print(f"  ({name} batch {batch}, {who}: {_details(r)})", flush=True)


def _checkpoints(name: str, folder: Path) -> tuple[Path, Path]:
    """The seeded release-format ``.pt`` of ``name`` and its conversion, made once in
    ``folder``."""
    from segface_jax.convert.converter import convert_checkpoint
    from segface_jax.convert.parity import seeded_release
    from segface_jax.variants import get_variant

    converted, pt = folder / name, folder / f"{name}_seed0.pt"
    if not pt.exists():
        seeded_release(get_variant(name), folder)
    if not converted.exists():
        convert_checkpoint(pt, converted, name, overwrite=True)
    return pt, converted


def _row(name: str, batch: int, j: dict, t: list[dict], args, gpu: bool) -> str:
    """One table row of a (variant, batch) measurement."""
    flops = j.get("flops") or float("nan")
    cells = [name, batch, _cell(j, ".3f"), _cell(t[0], ".3f"), _ratio(j, t[0])]
    if args.torch_compile:
        cells += [_cell(t[1], ".3f"), _ratio(j, t[1])]
    per_s = [flops / r["s"] if "error" not in r else float("nan") for r in (j, t[0])]
    cells += ["-" if "error" in j else f"{batch / j['s']:.1f}",
              f"{flops / 1e9:.0f}", f"{per_s[0] / 1e9:.0f}", f"{per_s[1] / 1e9:.0f}"]
    if args.peak_tflops:
        cells += [f"{100 * f / (args.peak_tflops * 1e12):.0f}%" for f in per_s]
    if gpu:
        cells += [_cell(j, ".0f", "peak_mb"), _cell(t[0], ".0f", "peak_mb")]
    return "| " + " | ".join(map(str, cells)) + " |"


SKIPPED = "skipped"


def _details(r: dict) -> str:
    """What a measurement saw besides its step time: compile or warm-up seconds, and XLA's
    memory analysis of the compiled step (MiB)."""
    parts = [f"steps {r['spread'][0]:.3f}-{r['spread'][1]:.3f} s"] if "spread" in r else []
    if "compile_s" in r:
        parts.append(f"compile {r['compile_s']:.0f} s")
    if "warm_s" in r:
        parts.append(f"two warm-up steps {r['warm_s']:.1f} s")
    if "xla_memory" in r:
        parts.append("XLA memory analysis (MiB): " + ", ".join(
            f"{k} {v / 2**20:.0f}" for k, v in r["xla_memory"].items()))
    return "; ".join(parts)


def _run(args: list[str], timeout: float | None = None, skip: bool = False) -> dict:
    """One measurement's result, or ``{"error": why}`` so the table goes on without it."""
    if skip:
        return {"error": SKIPPED}
    try:
        return run_worker(__file__, args, timeout)
    except RuntimeError as e:
        return {"error": str(e)}


if __name__ == "__main__":
    main()
