"""Golden parity files: the reference's inputs and outputs, saved where torch runs and re-checked
anywhere JAX runs (a TPU with a new jaxlib, a machine without torch).

``parity --save-golden DIR`` writes ``DIR/<variant>.npz`` (the input batch, its landmarks, the
reference's logits and stage outputs, float64 ones too with that referee) and
``DIR/<variant>.json`` (the variant, the release file's sha256, the versions and device that
made them, and the ``.npz``'s own sha256, so an edited file is refused). ``parity --golden DIR``
runs our model on the stored input and gives the same verdict and per-stage table as ``parity``;
nothing here imports torch.
"""

from __future__ import annotations

import datetime
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segface_jax.checkpoint import CheckpointError, read_metadata
from segface_jax.convert.report import (
    MATMUL_PRECISIONS,
    Verdict,
    compare,
    jax_stages,
    judge,
)
from segface_jax.files import atomic_write, sha256_file
from segface_jax.variants import Variant


class GoldenError(ValueError):
    """A golden file that is missing, made for another variant or checkpoint, or modified."""


def versions() -> dict[str, str]:
    """The versions that decide the numbers: JAX, jaxlib, numpy, and torch where installed."""
    import jax
    import jaxlib

    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__}
    try:
        import torch
        import torchvision

        out.update(torch=torch.__version__, torchvision=torchvision.__version__)
    except ImportError:
        pass
    return out


def device() -> str:
    """The first JAX device, in words."""
    import jax

    d = jax.devices()[0]
    return f"{d.platform} ({d.device_kind})"


def save_golden(directory: str | os.PathLike, variant: Variant, *, images: np.ndarray,
                landmarks: np.ndarray | None, referee: str, stages32: dict[str, np.ndarray],
                stages64: dict[str, np.ndarray] | None, source_sha256: str,
                random_weights: bool, image_source: str) -> Path:
    """Write ``variant``'s golden pair into ``directory``; returns the ``.json`` path."""
    directory = Path(directory)
    arrays = {"images": images, **{f"float32/{k}": v for k, v in stages32.items()}}
    if landmarks is not None:
        arrays["landmarks"] = landmarks
    if stages64 is not None:
        arrays.update({f"float64/{k}": v for k, v in stages64.items()})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    npz = atomic_write(directory / f"{variant.name}.npz", lambda p: p.write_bytes(
        buffer.getvalue()))
    meta = {"variant": variant.name, "referee": referee, "stages": list(stages32),
            "source": {"sha256": source_sha256, "random_weights": random_weights},
            "image": image_source, "versions": versions(), "device": device(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "npz_sha256": sha256_file(npz)}
    return atomic_write(directory / f"{variant.name}.json",
                        lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))


def load_golden(directory: str | os.PathLike, variant: Variant
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``variant``'s golden metadata and arrays from ``directory``, checked: made for this
    variant, and unmodified since it was saved."""
    directory = Path(directory)
    meta_path, npz_path = directory / f"{variant.name}.json", directory / f"{variant.name}.npz"
    if not meta_path.is_file() or not npz_path.is_file():
        found = sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []
        raise GoldenError(f"{directory}: no golden files for {variant.name} ({meta_path.name} "
                          f"and {npz_path.name}); found: {', '.join(found) or 'none'}. Save them "
                          f"with `segface-jax parity --variant {variant.name} --save-golden "
                          f"{directory}` where torch is installed")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise GoldenError(f"{meta_path}: not a golden metadata file ({e})") from None
    if meta.get("variant") != variant.name:
        raise GoldenError(f"{meta_path} was saved for {meta.get('variant')!r}, not "
                          f"{variant.name}: golden files cannot be renamed to another variant")
    if sha256_file(npz_path) != meta.get("npz_sha256"):
        raise GoldenError(f"{npz_path} differs from the file saved with {meta_path.name} "
                          "(sha256 mismatch): it was modified or truncated; save it again with "
                          "--save-golden")
    with np.load(npz_path) as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def _checked_weights(meta: dict[str, Any], path: Path) -> Path:
    """``path``, a converted checkpoint, if it was converted from the golden files' release."""
    want = meta["source"]["sha256"]
    got = read_metadata(path).get("source", {}).get("sha256")
    if got != want:
        raise GoldenError(f"{path} holds weights converted from a release file with sha256 "
                          f"{str(got)[:12]}..., but the golden files were made from "
                          f"{want[:12]}...: check the checkpoint they were saved with")
    return path


def check_golden(variant: Variant, directory: str | os.PathLike,
                 weights: Callable[[str], Path], matmul_precision: str = "highest") -> Verdict:
    """The ``parity --golden`` command: our model on the stored input against the stored
    reference, with ``parity``'s verdict and per-stage table. ``weights(sha256)`` gives the
    converted checkpoint of the release file with that sha256 (the CLI: ``--weights`` or the
    cache); it must have been converted from the file the golden files were made from."""
    import jax

    from segface_jax.runtime import load

    jax.config.update("jax_default_matmul_precision", MATMUL_PRECISIONS[matmul_precision])
    meta, arrays = load_golden(directory, variant)
    path = _checked_weights(meta, Path(weights(meta["source"]["sha256"])))
    try:
        model = load(path)
    except CheckpointError as e:
        raise GoldenError(str(e)) from None
    if model.variant.name != variant.name:
        raise GoldenError(f"{path} holds {model.variant.name}, not {variant.name}")
    made = meta["versions"]
    now = versions()
    print(f"golden files for {variant.name}: made {meta['created']} on {meta['device']} with "
          + ", ".join(f"{k} {v}" for k, v in made.items()))
    print(f"checking on {device()} with " + ", ".join(f"{k} {now[k]}" for k in ("jax", "jaxlib")))
    x, lm = arrays["images"], arrays.get("landmarks")
    ours = np.asarray(model(x, landmarks=lm))
    stages32 = {k: arrays[f"float32/{k}"] for k in meta["stages"]}
    ref32 = stages32[meta["stages"][-1]]
    result = compare(ours, ref32)
    print(f"against the stored torch float32 logits: relative = {result.relative:.3e}, argmax "
          f"agreement = {100 * result.argmax_agreement:.4f}%")
    stages64 = ({k: arrays[f"float64/{k}"] for k in meta["stages"]}
                if meta["referee"] == "float64" else None)
    judgement = judge(ours, jax_stages(model.module, x, lm), stages32, stages64,
                      matmul_precision)
    print(judgement.text)
    print(judgement.verdict.line())
    return judgement.verdict
