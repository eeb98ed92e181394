"""Depthwise convolution on this CPU: XLA's grouped convolution, our shifted slices, and torch.

    python bench/depthwise.py

``segface_jax.models.layers.depthwise_conv`` runs a depthwise convolution on CPU as a sum of
k*k shifted slices because XLA:CPU's grouped convolution (``feature_group_count = C``) is many
times slower than torch's at SegFace's shapes; this prints the measurement behind that choice,
forward and forward+backward (the training case), side by side in one run.
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from segface_jax.models import layers
from segface_jax.models.layers import depthwise_conv

# (name, batch, side, channels, kernel, stride): a ConvNeXt-B stage-1 block at 512 px and the
# MobileNetV3 / EfficientNetV2 depthwise shapes with the most work at 512 px
SHAPES = [("convnext 7x7", 1, 128, 128, 7, 1), ("mobilenet 3x3", 1, 256, 64, 3, 1),
          ("mobilenet 5x5", 1, 64, 120, 5, 1), ("mobilenet 5x5 s2", 1, 128, 72, 5, 2),
          ("efficientnet 3x3", 1, 64, 640, 3, 1)]


def _ms(fn, *args, runs: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(runs):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / runs * 1e3


def _torch_ms(x, w, g, stride: int, backward: bool, runs: int = 5) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(backward)
    wt = torch.from_numpy(w.transpose(2, 0, 1)[:, None].copy()).requires_grad_(backward)
    gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
    k = w.shape[0]

    def run():
        y = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=(k - 1) // 2,
                                       groups=x.shape[-1])
        if backward:
            y.backward(gt)

    run()
    t0 = time.perf_counter()
    for _ in range(runs):
        run()
    return (time.perf_counter() - t0) / runs * 1e3


def main() -> None:
    """Print a Markdown table of milliseconds per call for each implementation and shape."""
    print(f"jax {jax.__version__} on {platform.processor() or platform.machine()}, "
          f"{jax.devices()[0].device_kind}\n")
    print("| shape | pass | lax grouped ms | slices, autodiff ms | slices ms | torch ms | "
          "torch / slices |\n|---|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for name, b, side, c, k, stride in SHAPES:
        x = rng.standard_normal((b, side, side, c), np.float32)
        w = rng.standard_normal((k, k, c), np.float32)
        side_out = (side - 1) // stride + 1
        # a random output gradient, as in training (a constant one lets XLA simplify autodiff)
        g = rng.standard_normal((b, side_out, side_out, c), np.float32)
        for backward in (False, True):
            times = {}
            for impl in ("lax", "autodiff", "slices"):
                def f(x, w, impl=impl, stride=stride):
                    if impl == "autodiff":  # the slices without their hand-written backward
                        return layers._shifted_sum(x, w, stride)
                    return depthwise_conv(x, w, None, impl=impl, stride=stride)
                fn = jax.jit(jax.grad(lambda x, w, f=f: jnp.vdot(f(x, w), g), (0, 1))  # noqa: B023
                             if backward else f)
                times[impl] = _ms(fn, jnp.asarray(x), jnp.asarray(w))
            t = _torch_ms(x, w, g, stride, backward)
            ratio = "-" if t is None else f"{t / times['slices']:.2f}x"
            print(f"| {name} {side}x{side}x{c} | {'fwd+bwd' if backward else 'fwd'} | "
                  f"{times['lax']:.1f} | {times['autodiff']:.1f} | {times['slices']:.1f} | "
                  f"{'-' if t is None else f'{t:.1f}'} | "
                  f"{ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
