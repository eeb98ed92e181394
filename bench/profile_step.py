"""Where a training step's time goes: JAX (XLA ops, from a profiler trace) beside torch eager.

    python bench/profile_step.py                                  # mobilenet_celeba_512, batch 2
    python bench/profile_step.py --variant swinb_celeba_224 --batch 2 --top 25

One step as bench/train_step.py runs it (forward, 0.5 CE + 0.5 Dice, backward, AdamW; training
mode), after two warm-up steps, each framework in its own process.

JAX: one step under ``jax.profiler.trace``; each op the XLA runtime executed (a fusion, a
library call, a copy) is matched by name to its instruction in the compiled HLO, and grouped by
what it is (a matmul or convolution, a reduction, data movement, other elementwise work), by
the JAX primitive it comes from (the last part of its ``op_name``) and by pass (``backward``
when JAX's autodiff transposed it). torch: ``torch.profiler``'s self time per ``aten`` op.
Times are summed over threads, so on a multi-core CPU they can exceed the wall-clock step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import _batch, run_worker, torch_step  # noqa: E402

_MOVEMENT = {"transpose", "copy", "slice", "pad", "concatenate", "reshape", "split",
             "dynamic_slice", "dynamic_update_slice", "broadcast_in_dim", "squeeze",
             "expand_dims", "gather", "scatter-add", "scatter_add", "rev"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\((.*)$", re.M)


def _kind(opcode: str, library: bool, primitive: str) -> str:
    """One of: matmul/conv, reduction, data movement, elementwise."""
    if opcode in ("dot", "convolution") or primitive in ("dot_general", "conv_general_dilated"):
        return "matmul/conv"
    if primitive.startswith(("reduce_", "argmax", "argmin")) or opcode == "reduce":
        return "reduction"
    if primitive in _MOVEMENT or opcode in ("copy", "transpose", "concatenate", "pad", "slice"):
        return "data movement"
    return "elementwise" if not library else "library fusion"


def name_module_scopes() -> None:
    """Wrap every model class's ``__call__`` in ``jax.named_scope("segface.<Class>")``, so each
    compiled op's ``op_name`` says which module emitted it."""
    import functools
    import inspect

    import jax
    from flax import nnx

    from segface_jax.models import (
        convnext,
        decoder,
        efficientnet_v2,
        layers,
        mobilenet_v3,
        resnet,
        segface,
        swin,
    )

    def scoped(cls):
        call = cls.__call__

        @functools.wraps(call)
        def wrapper(self, *args, **kwargs):
            with jax.named_scope(f"segface.{cls.__name__}"):
                return call(self, *args, **kwargs)
        return wrapper

    for mod in (convnext, decoder, efficientnet_v2, layers, mobilenet_v3, resnet, segface, swin):
        for cls in vars(mod).values():
            if (inspect.isclass(cls) and issubclass(cls, nnx.Module) and cls.__module__ ==
                    mod.__name__ and "__call__" in vars(cls)):
                cls.__call__ = scoped(cls)


def worker_jax(variant: str, batch: int) -> dict:
    """Trace one compiled step; time per (kind, primitive, pass), in ms."""
    import jax
    import numpy as np
    from flax import nnx

    from segface_jax.models import SegFace, SegFaceConfig
    from segface_jax.train import optim, step
    from segface_jax.variants import get_variant

    name_module_scopes()
    v = get_variant(variant)
    model = SegFace(SegFaceConfig.from_variant(v), rngs=nnx.Rngs(0))
    tx = optim.adamw(1e-4, 1e-5)
    graphdef, state = step.init_state(model, tx)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    train = step.make_train_step(graphdef, tx, mesh, dice_group=None,
                                 needs_landmarks=v.needs_landmarks)
    images, labels = _batch(v.resolution, batch, v.num_classes)
    b = {"image": images, "label": labels, "landmarks": np.zeros((batch, 5, 2), np.float32)}
    compiled = train.lower(state, b).compile()
    ops = {}
    for name, opcode, rest in _INSTRUCTION.findall(compiled.as_text()):
        op_name = re.search(r'op_name="([^"]*)"', rest)
        op_name = op_name.group(1) if op_name else ""
        primitive = op_name.rsplit("/", 1)[-1] or opcode
        library = '"__ynn_fusion"' in rest or '"__xnn_fusion"' in rest or "onednn" in rest
        scopes = [part for part in op_name.split("/") if part.startswith("segface.")]
        source = scopes[-1].removeprefix("segface.") if scopes else "(outside modules)"
        ops[name] = (_kind(opcode, library, primitive), primitive,
                     "backward" if "transpose(" in op_name else "forward", source)
    for _ in range(2):
        state, metrics = compiled(state, b)
        jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory(prefix="segface-profile-") as tmp:
        t0 = time.perf_counter()
        with jax.profiler.trace(tmp):
            state, metrics = compiled(state, b)
            jax.block_until_ready(metrics)
        wall = time.perf_counter() - t0
        trace = sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))[-1]
        events = json.load(gzip.open(trace))["traceEvents"]
    rows, sources = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in ops:
            *key, source = ops[e["name"]]
            rows["|".join(key)] += e["dur"] / 1e3
            sources[f"{source}|{key[2]}"] += e["dur"] / 1e3
    return {"wall_ms": wall * 1e3, "rows": dict(rows), "sources": dict(sources)}


def worker_torch(variant: str, batch: int) -> dict:
    """Profile one eager step; self time per aten op, in ms."""
    from torch.profiler import ProfilerActivity, profile

    step = torch_step(variant, batch, "cpu")
    for _ in range(2):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - t0
    rows = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()
            if e.key.startswith("aten::")}
    return {"wall_ms": wall * 1e3, "rows": rows}


def _table(title: str, rows: dict[str, float], top: int, header: str) -> None:
    total = sum(rows.values())
    print(f"\n{title}: {total:.0f} ms of ops\n\n{header}\n"
          + "|---" * (header.count("|") - 3) + "|---:|---:|")
    for key, ms in sorted(rows.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {' | '.join(key.split('|'))} | {ms:.0f} | {100 * ms / total:.0f}% |")


def main() -> None:
    """Run both workers and print three Markdown tables: JAX by kind, JAX by op, torch by op."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="mobilenet_celeba_512")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--top", type=int, default=20, help="rows of the per-op tables")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, variant, batch = args.worker
        out = (worker_jax if kind == "jax" else worker_torch)(variant, int(batch))
        print(json.dumps(out))
        return

    j = run_worker(__file__, ["--worker", "jax", args.variant, str(args.batch)])
    t = run_worker(__file__, ["--worker", "torch", args.variant, str(args.batch)])
    print(f"{args.variant}, batch {args.batch}: one step takes {j['wall_ms'] / 1e3:.2f} s in "
          f"JAX and {t['wall_ms'] / 1e3:.2f} s in torch eager (under their profilers)")
    by_kind = collections.Counter()
    for key, ms in j["rows"].items():
        kind, _, pass_ = key.split("|")
        by_kind[f"{kind}|{pass_}"] += ms
    _table("JAX by kind", by_kind, 99, "| kind | pass | ms | share |")
    _table("JAX by op", j["rows"], args.top, "| kind | primitive | pass | ms | share |")
    _table("JAX by module (innermost)", j["sources"], args.top, "| module | pass | ms | share |")
    _table("torch eager by op (self time)", t["rows"], args.top, "| op | ms | share |")


if __name__ == "__main__":
    main()
