"""Two backward passes written for XLA:CPU, each beside autodiff's and torch's, side by side.

    python bench/cpu_backward.py
    python bench/cpu_backward.py --runs 9
    python bench/cpu_backward.py --steps resnet_celeba_512 efficientnet_celeba_512

* BatchNorm + ReLU in training, forward + backward: autodiff of the mean/variance formula (the
  code before ``layers.batch_norm_train``) against its closed-form backward, and torch's
  ``BatchNorm2d`` + ReLU (channels-last).
* A convolution's kernel gradient: XLA's (a convolution whose window is the whole image)
  against ``layers._conv_kernel_grad`` (one matmul per tap), and torch's
  ``convolution_backward`` for the weight alone.

Shapes are ResNet-101's and EfficientNetV2-M's at 512 px, batch 1. JAX jit (median of
``--runs`` after a warm-up) and torch eager with as many threads as cores, in one process.

``--steps``: whole training steps (bench/train_step.py's, batch 1, seeded weights) with both
passes and with autodiff's instead (the same code with the two functions swapped back while
tracing), compiled in one process and timed alternately, step for step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from segface_jax.models import layers
from segface_jax.models.layers import _conv_kernel_grad, batch_norm_train

BN_SHAPES = [(1, 128, 128, 256), (1, 64, 64, 512), (1, 32, 32, 1024), (1, 256, 256, 24)]
# (size, Cin, Cout, k, stride): ResNet stem, 3x3 layers of its four stages (the strided first
# one of stage 2), EfficientNetV2-M's stem and fused-MBConv layers
CONV_SHAPES = [(512, 3, 64, 7, 2), (128, 64, 64, 3, 1), (128, 128, 128, 3, 2),
               (64, 128, 128, 3, 1), (32, 256, 256, 3, 1), (16, 512, 512, 3, 1),
               (512, 3, 24, 3, 2), (256, 24, 24, 3, 1), (256, 24, 96, 3, 2),
               (128, 48, 192, 3, 1), (128, 48, 192, 3, 2), (64, 80, 320, 3, 1)]


def _median_ms(f, runs: int) -> float:
    jax.block_until_ready(f())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _autodiff_batch_norm(x, scale, bias):
    return _autodiff_batch_norm_train(x, scale, bias, 1e-5, x.dtype)[0]


def _closed_form_batch_norm(x, scale, bias):
    return batch_norm_train(x, scale, bias, 1e-5, x.dtype)[0]


def _to_torch(a: jax.Array):
    """NHWC array -> channels-last NCHW torch tensor."""
    import torch

    return torch.tensor(np.asarray(a)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)


def batch_norm_row(shape: tuple[int, ...], runs: int) -> str:
    """BatchNorm + ReLU forward + backward at one NHWC shape: autodiff, ours, torch."""
    import torch

    rng = np.random.default_rng(0)
    c = shape[-1]
    x, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    scale, bias = (jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(2))
    cells = []
    for norm in (_autodiff_batch_norm, _closed_form_batch_norm):
        grads = jax.jit(jax.grad(lambda x, s, b, g, norm=norm: jnp.vdot(
            jax.nn.relu(norm(x, s, b)), g), argnums=(0, 1, 2)))
        cells.append(_median_ms(lambda grads=grads: grads(x, scale, bias, g), runs))
    module = torch.nn.BatchNorm2d(c).train()
    xt, gt = _to_torch(x).requires_grad_(), _to_torch(g)
    cells.append(_median_ms(lambda: torch.relu(module(xt)).backward(gt), runs))
    return (f"| {shape} | {cells[0]:.1f} | {cells[1]:.1f} | {cells[2]:.1f} | "
            f"{cells[0] / cells[1]:.2f}x |")


def conv_row(size: int, cin: int, cout: int, k: int, stride: int, runs: int) -> str:
    """A convolution's kernel gradient at one shape: XLA's, ours, torch's."""
    import torch

    rng = np.random.default_rng(0)
    p = (k - 1) // 2
    out = (size + 2 * p - k) // stride + 1
    x = jnp.asarray(rng.standard_normal((1, size, size, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((1, out, out, cout)), jnp.float32)
    strides, padding = (stride, stride), ((p, p), (p, p))
    # inputs as arguments: XLA would constant-fold a gradient of captured arrays
    xla = jax.jit(lambda kernel, x, g: jax.vjp(
        lambda k: layers._lax_conv(x, k, strides, padding), kernel)[1](g)[0])
    taps = jax.jit(lambda kernel, x, g: _conv_kernel_grad(x, g, kernel, strides, padding))
    want, got = xla(kernel, x, g), taps(kernel, x, g)
    error = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    cells = [_median_ms(lambda: xla(kernel, x, g), runs),
             _median_ms(lambda: taps(kernel, x, g), runs)]
    xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    gt = torch.tensor(np.asarray(g)).permute(0, 3, 1, 2).contiguous()
    wt = torch.tensor(np.asarray(kernel)).permute(3, 2, 0, 1).contiguous()
    cells.append(_median_ms(lambda: torch.ops.aten.convolution_backward(
        gt, xt, wt, None, strides, (p, p), (1, 1), False, (0, 0), 1, (False, False, True)),
        runs))
    return (f"| {size}x{size}x{cin} -> {cout}, {k}x{k} stride {stride} | {cells[0]:.1f} | "
            f"{cells[1]:.1f} | {cells[2]:.1f} | {cells[0] / cells[1]:.2f}x | {error:.0e} |")


def _autodiff_batch_norm_train(x, scale, bias, eps, dt):
    """``layers.batch_norm_train`` as autodiff differentiates it (the code before it)."""
    xf = x.astype(jnp.float32)
    mean, var = xf.mean(axis=(0, 1, 2)), xf.var(axis=(0, 1, 2))
    return layers._normalize(x, mean, var, scale, bias, eps, dt), mean, var


def step_row(name: str, runs: int) -> str:
    """A variant's train step with the two backward passes and without, alternately."""
    import sys
    from pathlib import Path
    from tempfile import TemporaryDirectory

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import _batch, _checkpoints

    from segface_jax.runtime import load
    from segface_jax.train import optim, step

    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    with TemporaryDirectory(prefix="segface-bench-backward-") as tmp:
        model = load(_checkpoints(name, Path(tmp))[1])
        v = model.variant
        images, labels = _batch(v.resolution, 1, v.num_classes)
        batch = {"image": images, "label": labels,
                 "landmarks": np.zeros((1, 5, 2), np.float32)}
        tx = optim.adamw(1e-4, 1e-5)
        runs_of = {}
        for kind in ("ours", "autodiff"):
            graphdef, state = step.init_state(model.module, tx, mesh=mesh)
            train = step.make_train_step(graphdef, tx, mesh, dice_group=None,
                                         needs_landmarks=v.needs_landmarks)
            kept = layers.batch_norm_train, layers._conv
            if kind == "autodiff":
                # _lax_conv: the same convolution without the custom kernel gradient
                layers.batch_norm_train, layers._conv = (_autodiff_batch_norm_train,
                                                         layers._lax_conv)
            try:
                compiled = train.lower(state, batch).compile()
            finally:
                layers.batch_norm_train, layers._conv = kept
            state, _ = compiled(state, batch)  # warm-up
            runs_of[kind] = [compiled, state, []]
        for _ in range(runs):
            for entry in runs_of.values():
                t = time.perf_counter()
                entry[1], metrics = entry[0](entry[1], batch)
                jax.block_until_ready(metrics)
                entry[2].append(time.perf_counter() - t)
        ours, auto = (statistics.median(runs_of[k][2]) for k in ("ours", "autodiff"))
    return f"| {name} | {auto:.2f} | {ours:.2f} | {auto / ours:.2f}x |"


def main() -> None:
    """Print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--steps", nargs="+", default=[], metavar="VARIANT",
                   help="also time these variants' train steps with and without both passes")
    args = p.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print("BatchNorm + ReLU, training, forward + backward (ms):\n")
    print("| NHWC shape | autodiff | closed form | torch eager | closed form vs autodiff |")
    print("|---|---:|---:|---:|---:|")
    for shape in BN_SHAPES:
        print(batch_norm_row(shape, args.runs), flush=True)
    print("\nConvolution kernel gradient (ms):\n")
    print("| input, kernel | XLA | matmul per tap | torch eager | taps vs XLA | rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in CONV_SHAPES:
        print(conv_row(*shape, args.runs), flush=True)
    if args.steps:
        print("\nTraining step, batch 1, s (median of --runs, alternating):\n")
        print("| variant | autodiff's backward | ours | speed-up |")
        print("|---|---:|---:|---:|")
        for name in args.steps:
            print(step_row(name, args.runs), flush=True)


if __name__ == "__main__":
    main()
