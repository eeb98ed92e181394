"""``segface-jax export``: a converted model as a serialized ``jax.export`` artifact or ONNX.

Both artifacts take the model's own input, (N, R, R, 3) float32 ImageNet-normalised RGB (plus
(N, 5, 2) landmarks for LaPa variants), and return (N, R, R, C) float32 logits, with the
parameters embedded.

* StableHLO (``jax.export``): any batch size (symbolic batch dimension) unless one is fixed;
  lowered for CPU, CUDA and TPU, whichever host exports it: the CPU-only kernels (depthwise
  convolutions as shifted slices, 1x1 convolutions as matmuls) are chosen per platform at
  lowering, so CUDA and TPU run lax convolutions. Load with
  ``jax.export.deserialize(open(path, "rb").read()).call(images[, landmarks])``.
* ONNX (through jax2onnx, ``pip install 'segface-jax[onnx]'``): a fixed batch size (default 1;
  jax2onnx cannot yet trace the bilinear resize with a symbolic batch), opset 23. Convolutions
  stay ONNX ``Conv`` ops (``layers.lax_convolutions``): ONNX Runtime (CPU, 2 threads) runs a
  7x7 depthwise conv on 128x128x128 that way in 24 ms, as XLA:CPU's 49 shifted slices in 640.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from segface_jax.checkpoint import CheckpointError
from segface_jax.files import atomic_write, ensure_writable
from segface_jax.models.layers import lax_convolutions
from segface_jax.runtime import LoadedModel

PLATFORMS = ("cpu", "cuda", "tpu")


def _signature(model: LoadedModel, batch: Any) -> tuple[jax.ShapeDtypeStruct, ...]:
    r = model.resolution
    specs = [jax.ShapeDtypeStruct((batch, r, r, 3), np.float32)]
    if model.variant.needs_landmarks:
        specs.append(jax.ShapeDtypeStruct((batch, 5, 2), np.float32))
    return tuple(specs)


def _function(model: LoadedModel):
    # The parameters are closed over, so they become constants of the exported program. Not
    # the model's own jitted forward: a trace it cached would ignore ``lax_convolutions``.
    graphdef, state = nnx.split(model.module)
    if model.variant.needs_landmarks:
        return lambda images, landmarks: nnx.merge(graphdef, state)(images, landmarks)
    return lambda images: nnx.merge(graphdef, state)(images)


def export_stablehlo(model: LoadedModel, batch_size: int | None = None,
                     platforms: tuple[str, ...] = PLATFORMS) -> bytes:
    """Serialized ``jax.export.Exported`` of the model (symbolic batch when ``batch_size`` is
    None)."""
    from jax import export

    batch = export.symbolic_shape("batch")[0] if batch_size is None else batch_size
    exported = export.export(jax.jit(_function(model)), platforms=platforms)(
        *_signature(model, batch))
    return exported.serialize()


def export_onnx(model: LoadedModel, batch_size: int = 1):
    """The model as an ONNX ``ModelProto`` with a fixed batch size, converted by jax2onnx."""
    try:
        from jax2onnx import to_onnx
    except ModuleNotFoundError:
        raise CheckpointError("ONNX export needs jax2onnx: pip install 'segface-jax[onnx]'") \
            from None
    names = ["images", "landmarks"] if model.variant.needs_landmarks else ["images"]
    with lax_convolutions():  # ONNX has no XLA platforms to choose kernels for at lowering
        return to_onnx(_function(model), [s.shape for s in _signature(model, batch_size)],
                       model_name=model.variant.name, input_names=names, output_names=["logits"])


def run_export(args) -> int:
    """The ``export`` command."""
    from segface_jax import hub

    v, weights = hub.named_model(args.variant, args.weights, args.revision)
    out = Path(args.out or f"{v.name}.{args.format}")
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite or choose another --out")
    ensure_writable(out.absolute().parent, "the folder of --out")
    if args.batch_size is not None and args.batch_size < 1:
        raise CheckpointError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = hub.load_weights(weights or hub.resolve(v, args.weights, args.revision), args.dtype)
    if args.format == "stablehlo":
        data = export_stablehlo(model, args.batch_size)
        batch = "any batch size" if args.batch_size is None else f"batch {args.batch_size}"
    else:
        data = export_onnx(model, args.batch_size or 1).SerializeToString()
        batch = f"batch {args.batch_size or 1}"
    atomic_write(out, lambda p: p.write_bytes(data))
    inputs = "images (N, R, R, 3)" + (" and landmarks (N, 5, 2)" if v.needs_landmarks else "")
    print(f"wrote {out} ({len(data) / 2**20:.1f} MiB): {v.name}, {args.format}, {batch}, "
          f"inputs {inputs} with R = {v.resolution}, output logits (N, R, R, {v.num_classes})")
    return 0
