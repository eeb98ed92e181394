"""XLA:CPU reduction speed by shape: the one pattern that is pathologically slow on this JAX.

    python bench/xla_cpu_reduce.py

A parameter's gradient sums ``dy * x`` over every axis but the channel one (LayerNorm scales,
biases, the Dice's per-class sums). At a per-device batch of 1, XLA simplifies the fused
multiply-and-sum over (batch, tokens, channels) to a reduction of a (1, N, C) array over its
middle axis; XLA:CPU hands that fusion to YNNPACK, which runs it ~50x slower than the same sum
at batch 2 or on the (N, C) array (jaxlib 0.10.2, measured on a 2-core AMD EPYC: 113 ms vs
2 ms for N = 16384, C = 256). Printing the compiled HLO's fusion kind shows which backend got
each case. ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE``
moves reductions back to XLA's own emitter, which is fast here but slower on the rest of a
training step (bench/profile_step.py), so it is not a fix.
"""

from __future__ import annotations

import time

import jax
import numpy as np


def _ms(fn, *args, runs: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(runs):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / runs * 1e3


def main() -> None:
    """Print a Markdown table: shape, axes summed, ms, whether YNNPACK runs it."""
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}\n")
    print("| array | sum over | ms | YNNPACK fusion |\n|---|---|---:|---|")
    rng = np.random.default_rng(0)
    for shape, axes in [((1, 16384, 256), (1,)), ((1, 16384, 256), (0, 1)),
                        ((16384, 256), (0,)), ((2, 16384, 256), (0, 1)),
                        ((1, 262144, 19), (1,)), ((262144, 19), (0,))]:
        a = rng.random(shape, np.float32)
        fn = jax.jit(lambda a, b, axes=axes: (a * b).sum(axes))
        ynn = "__ynn_fusion" in fn.lower(a, a).compile().as_text()
        print(f"| {shape} | {axes} | {_ms(fn, a, a + 1):.1f} | {'yes' if ynn else 'no'} |")


if __name__ == "__main__":
    main()
