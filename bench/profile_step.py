"""Where a training step's time goes: JAX (XLA ops, from a profiler trace) beside torch eager.

    python bench/profile_step.py                                  # mobilenet_celeba_512, batch 2
    python bench/profile_step.py --variant swinb_celeba_224 --batch 2 --top 25
    python bench/profile_step.py --from-dir OUT   # a step traced on a GPU (bench/run_gpu.sh)

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
# name = shape opcode(operands...: the shape may be a tuple with spaces
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (?:.*?) ([\w\-]+)\((.*)$", re.M)
_LIBRARY_KERNEL = ("nvjet", "sm90", "sm80", "cutlass", "ampere", "cudnn", "void ")


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
    return {"wall_ms": wall * 1e3, **summarise(events, compiled.as_text())}


def summarise(events: list[dict], hlo: str) -> dict:
    """Time per (kind, primitive, pass) and per (module, pass), in ms, of a trace's ``events``
    matched to the compiled ``hlo``'s instructions. On a GPU only the device's kernels count:
    XLA's own are named after their fusion (``a.1`` runs as ``a_1``), library kernels
    (cuBLAS, cuDNN) after themselves and sit under ``library call``."""
    ops = {}
    for name, opcode, rest in _INSTRUCTION.findall(hlo):
        op_name = re.search(r'op_name="([^"]*)"', rest)
        op_name = op_name.group(1) if op_name else ""
        primitive = op_name.rsplit("/", 1)[-1] or opcode
        library = '"__ynn_fusion"' in rest or '"__xnn_fusion"' in rest or "onednn" in rest
        scopes = [part for part in op_name.split("/") if part.startswith("segface.")]
        source = scopes[-1].removeprefix("segface.") if scopes else "(outside modules)"
        ops[name] = ops[name.replace(".", "_")] = (
            _kind(opcode, library, primitive), primitive,
            "backward" if "transpose(" in op_name else "forward", source)
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") ==
               "process_name" and "/device:GPU" in e.get("args", {}).get("name", "")}
    rows, sources = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or (devices and e["pid"] not in devices):
            continue
        if e["name"] in ops:
            *key, source = ops[e["name"]]
        elif devices and e["name"].startswith(_LIBRARY_KERNEL):
            key, source = ["library call", "(cuBLAS/cuDNN kernel)", "-"], "(library calls)"
        else:
            continue
        rows["|".join(key)] += e["dur"] / 1e3
        sources[f"{source}|{key[2]}"] += e["dur"] / 1e3
    return {"rows": dict(rows), "sources": dict(sources)}


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
    p.add_argument("--from-dir", default="",
                   help="summarise a step traced elsewhere instead (a GPU's: the folder where "
                        "bench/train_step.py --profile-dir wrote jax_trace.json.gz and "
                        "jax_hlo.txt.gz)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, variant, batch = args.worker
        out = (worker_jax if kind == "jax" else worker_torch)(variant, int(batch))
        print(json.dumps(out))
        return

    if args.from_dir:
        folder = Path(args.from_dir)
        events = json.load(gzip.open(folder / "jax_trace.json.gz"))["traceEvents"]
        j = summarise(events, gzip.open(folder / "jax_hlo.txt.gz", "rt").read())
        print(f"the step traced in {folder} (torch's profile, if any: torch_profile.txt)")
        _tables(j, None, args.top)
        return
    j = run_worker(__file__, ["--worker", "jax", args.variant, str(args.batch)])
    t = run_worker(__file__, ["--worker", "torch", args.variant, str(args.batch)])
    print(f"{args.variant}, batch {args.batch}: one step takes {j['wall_ms'] / 1e3:.2f} s in "
          f"JAX and {t['wall_ms'] / 1e3:.2f} s in torch eager (under their profilers)")
    _tables(j, t, args.top)


def _tables(j: dict, t: dict | None, top: int) -> None:
    """JAX by kind, by op and by module; torch eager by op (when ``t``)."""
    by_kind = collections.Counter()
    for key, ms in j["rows"].items():
        kind, _, pass_ = key.split("|")
        by_kind[f"{kind}|{pass_}"] += ms
    _table("JAX by kind", by_kind, 99, "| kind | pass | ms | share |")
    _table("JAX by op", j["rows"], top, "| kind | primitive | pass | ms | share |")
    _table("JAX by module (innermost)", j["sources"], top, "| module | pass | ms | share |")
    if t:
        _table("torch eager by op (self time)", t["rows"], top, "| op | ms | share |")


if __name__ == "__main__":
    main()
