"""A released model's structure (ShapeDtypeStruct leaves), two ways, side by side in one process.

``nnx.eval_shape`` of the constructor, as Flax documents it, against ``layers.abstract`` (what
``abstract_model``, the backbone converter and MTCNN use): a traced key, a concrete random-stream
counter. For every distinct released model and compute dtype, alternately, best of
``--repeats``; both must give the same graph and leaves. Every conversion and every load of a
checkpoint builds this structure once per process.

    python bench/abstract_model.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

from flax import nnx

from segface_jax.models import SegFace, SegFaceConfig
from segface_jax.models.layers import abstract
from segface_jax.variants import VARIANTS, get_variant


def _leaves(module: nnx.Module) -> dict:
    return {path: (type(v), v.get_value().shape, v.get_value().dtype)
            for path, v in nnx.to_flat_state(nnx.state(module))}


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ways = {
        "nnx.eval_shape": lambda cfg, dtype: nnx.eval_shape(
            lambda: SegFace(cfg, dtype=dtype, rngs=nnx.Rngs(0))),
        "layers.abstract": lambda cfg, dtype: abstract(
            lambda rngs: SegFace(cfg, dtype=dtype, rngs=rngs)),
    }
    print("| model | dtype | nnx.eval_shape (s) | layers.abstract (s) | speed-up |")
    print("|---|---|---:|---:|---:|")
    seen = set()
    for name in VARIANTS:
        cfg = SegFaceConfig.from_variant(get_variant(name))
        for dtype in (None, "bfloat16"):
            if (cfg, dtype) in seen:  # resolutions share a structure
                continue
            seen.add((cfg, dtype))
            best, built = {}, {}
            for _ in range(args.repeats):
                for way, build in ways.items():
                    t0 = time.perf_counter()
                    built[way] = build(cfg, dtype)
                    best[way] = min(best.get(way, float("inf")), time.perf_counter() - t0)
            plain, ours = built.values()
            assert nnx.graphdef(plain) == nnx.graphdef(ours) and _leaves(plain) == _leaves(ours)
            a, b = best.values()
            print(f"| {name} ({cfg.backbone}) | {dtype or 'float32'} | {a:.2f} | {b:.2f} | "
                  f"{a / b:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
