"""``segface-jax parity``: run the PyTorch reference and the JAX model on the same face."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from segface_jax import preprocess
from segface_jax.examples import sample_face
from segface_jax.models import SegFaceConfig
from segface_jax.variants import Variant


def default_landmarks(resolution: int) -> np.ndarray:
    """Landmarks of an already aligned, centred face: the standard points at ``resolution``."""
    from segface_jax.align import standard_landmarks

    return standard_landmarks(resolution)[None]


@dataclasses.dataclass
class ParityResult:
    """How far the JAX logits are from the PyTorch reference's."""

    max_abs_diff: float
    ref_max_abs: float
    argmax_agreement: float

    @property
    def relative(self) -> float:
        """max |delta| / max |reference logit|."""
        return self.max_abs_diff / self.ref_max_abs


def compare(jax_logits: np.ndarray, torch_logits_nhwc: np.ndarray) -> ParityResult:
    """Parity figures for two (N, H, W, C) logit arrays."""
    diff = float(np.abs(jax_logits - torch_logits_nhwc).max())
    agree = float((jax_logits.argmax(-1) == torch_logits_nhwc.argmax(-1)).mean())
    return ParityResult(diff, float(np.abs(torch_logits_nhwc).max()), agree)


def run_torch(model, images_nhwc: np.ndarray, landmarks: np.ndarray | None) -> np.ndarray:
    """Reference logits (N, H, W, C) for NHWC inputs, float32, no grad."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        lm = None if landmarks is None else torch.from_numpy(landmarks)
        return model(x, lm).permute(0, 2, 3, 1).numpy()


def network_parity(model, ref, x: np.ndarray, landmarks: np.ndarray) -> ParityResult:
    """LaPa: both networks parse the same torch-warped input (no alignment noise)."""
    import torch
    from flax import nnx

    with torch.no_grad():
        warped, _ = ref.align_input(torch.from_numpy(np.ascontiguousarray(
            x.transpose(0, 3, 1, 2))), torch.from_numpy(landmarks))
        expected = ref.parse(warped).permute(0, 2, 3, 1).numpy()
    warped = warped.permute(0, 2, 3, 1).numpy()
    return compare(np.asarray(nnx.jit(lambda m, a: m.parse(a))(model.module, warped)), expected)


def seeded_release(variant: Variant, directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomised release-format checkpoint of ``variant`` and return its path."""
    from segface_jax.convert import reference

    model = reference.randomize(reference.build_reference(variant), seed)
    return reference.save_release(model, Path(directory) / f"{variant.name}_seed{seed}.pt")


def run_parity(variant: Variant, weights: str | None, image: str | None, out: str | None,
               fetch: Callable[[Variant], Path | None] | None = None) -> ParityResult:
    """The ``parity`` command: convert, run both models, print the figures, write an overlay.

    Without ``weights``, ``fetch(variant)`` supplies the release file (the CLI passes the hub
    download); where it returns None, or no ``fetch`` is given, a seeded release-format file with
    random weights stands in, and the overlay says so.
    """
    import jax
    import torch
    from PIL import Image, ImageDraw

    from segface_jax.convert import reference
    from segface_jax.convert.converter import convert_checkpoint, load_state_dict
    from segface_jax.files import atomic_write
    from segface_jax.runtime import load

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    SegFaceConfig.from_variant(variant)  # an unimplemented backbone fails before any download
    r = variant.resolution
    if image:  # read first: a bad image fails before any heavy work
        rgb = preprocess.resize_rgb(preprocess.read_rgb(image), r)
        x, lm = preprocess.normalize(rgb)[None], default_landmarks(r)
        source = image
        if variant.needs_landmarks:
            print("no landmarks for --image: treating it as an aligned, centred face crop")
    else:
        rgb, x, lm = sample_face(r)
        source = "scikit-image astronaut"
    with tempfile.TemporaryDirectory(prefix="segface-parity-") as tmp:
        path = Path(weights) if weights else (fetch(variant) if fetch else None)
        random_weights = path is None
        if random_weights:
            path = seeded_release(variant, tmp)
        state = load_state_dict(path)
        report = convert_checkpoint(path, Path(tmp) / "orbax", variant.name, state=state)
        print(report.summary())
        model = load(Path(tmp) / "orbax")
        ref = reference.build_reference(variant)
        ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        ref.eval()
    lm = lm if variant.needs_landmarks else None
    jax_logits = np.asarray(model(x, landmarks=lm))
    result = compare(jax_logits, run_torch(ref, x, lm))
    print(f"{variant.name} on {source} at {r}x{r}: max |delta| = {result.max_abs_diff:.3e}, "
          f"max |ref| = {result.ref_max_abs:.3e}, relative = {result.relative:.3e}, "
          f"argmax agreement = {100 * result.argmax_agreement:.4f}%")
    if variant.needs_landmarks:
        net = network_parity(model, ref, x, lm)
        print(f"  network alone on the same aligned input: relative = {net.relative:.3e}, "
              f"argmax agreement = {100 * net.argmax_agreement:.4f}%\n"
              "  (the whole LaPa model differs more because PyTorch's own float32 tanh-warp "
              "grids are ~1e-4 off its float64 ones; see README, 'Parity with PyTorch')")
    out = Path(out or f"parity_{variant.name}.png")
    labels = jax_logits[0].argmax(-1)
    panel = np.concatenate([rgb, preprocess.overlay(rgb, labels, variant.palette)], axis=1)
    img = Image.fromarray(panel)
    if random_weights:
        ImageDraw.Draw(img).text((8, 8), "RANDOM WEIGHTS (hub unreachable): mask is meaningless",
                                 fill=(255, 0, 0))
    atomic_write(out, lambda p: img.save(p, format="PNG"))
    print(f"overlay written to {out}" + (" (labelled: random weights)" if random_weights else ""))
    return result
