"""``segface-jax parity``: run the PyTorch reference and the JAX model on the same face."""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np

from segface_jax import preprocess
from segface_jax.convert.report import (
    MATMUL_PRECISIONS,
    ParityResult,
    Verdict,
    compare,
    jax_stages,
    judge,
)
from segface_jax.examples import sample_face
from segface_jax.models import SegFaceConfig
from segface_jax.variants import Variant

__all__ = ["ParityResult", "compare", "default_landmarks", "network_parity", "run_parity",
           "run_torch", "seeded_release", "torch_stages"]


def default_landmarks(resolution: int) -> np.ndarray:
    """Landmarks of an already aligned, centred face: the standard points at ``resolution``."""
    from segface_jax.align import standard_landmarks

    return standard_landmarks(resolution)[None]


def torch_stages(model, images_nhwc: np.ndarray, landmarks: np.ndarray | None
                 ) -> dict[str, np.ndarray]:
    """The reference's intermediate results (``SegFaceReference.stages``) as NHWC arrays, in the
    model's dtype (call it on a ``.double()`` copy with float64 inputs for the referee)."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        lm = None if landmarks is None else torch.from_numpy(landmarks)
        return {k: (t.permute(0, 2, 3, 1) if t.ndim == 4 else t).numpy()
                for k, t in model.stages(x, lm).items()}


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
               fetch: Callable[[Variant], Path | None] | None = None, *,
               referee: str | None = None, matmul_precision: str = "highest",
               save_golden: str | os.PathLike | None = None) -> Verdict:
    """The ``parity`` command: convert, run both models, print the figures and a verdict,
    write an overlay.

    Without ``weights``, ``fetch(variant)`` supplies the release file (the CLI passes the hub
    download); where it returns None, or no ``fetch`` is given, a seeded release-format file with
    random weights stands in, and the overlay says so. ``referee``: "float32" (torch float32
    is the reference) or "float64" (a float64 run of it referees both; the default for LaPa,
    whose alignment makes float32 itself noisy). ``save_golden``: a directory to store the
    input and the reference's outputs in, for ``parity --golden`` (``convert/golden.py``).
    """
    import jax
    import torch

    from segface_jax.convert import reference
    from segface_jax.convert.converter import convert_checkpoint, load_state_dict
    from segface_jax.files import atomic_write, ensure_writable
    from segface_jax.runtime import load

    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision must be one of {', '.join(MATMUL_PRECISIONS)}, "
                         f"not {matmul_precision!r}")
    referee = referee or ("float64" if variant.needs_landmarks else "float32")
    if referee not in ("float32", "float64"):
        raise ValueError(f"referee must be float32 or float64, not {referee!r}")
    jax.config.update("jax_default_matmul_precision", MATMUL_PRECISIONS[matmul_precision])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    SegFaceConfig.from_variant(variant)  # an unimplemented backbone fails before any download
    if save_golden:
        ensure_writable(save_golden, "--save-golden")
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
    stages32 = torch_stages(ref, x, lm)  # the last stage is the reference's output
    ref32 = list(stages32.values())[-1]
    result = compare(jax_logits, ref32)
    print(f"{variant.name} on {source} at {r}x{r}: max |delta| = {result.max_abs_diff:.3e}, "
          f"max |ref| = {result.ref_max_abs:.3e}, relative = {result.relative:.3e}, "
          f"argmax agreement = {100 * result.argmax_agreement:.4f}%")
    stages64 = None
    if referee == "float64":
        import copy

        stages64 = torch_stages(copy.deepcopy(ref).double(), x.astype(np.float64),
                                None if lm is None else lm.astype(np.float64))
    verdict, text = judge(jax_logits, jax_stages(model.module, x, lm), stages32, stages64,
                          matmul_precision)
    print(text)
    if save_golden:
        from segface_jax.convert.golden import save_golden as save

        meta = save(save_golden, variant, images=x, landmarks=lm, referee=referee,
                    stages32=stages32, stages64=stages64, source_sha256=report.sha256,
                    random_weights=random_weights, image_source=source)
        print(f"golden files written: {meta.with_suffix('.npz')} and {meta}")
    if variant.needs_landmarks:
        net = network_parity(model, ref, x, lm)
        print(f"  network alone on the same aligned input: relative = {net.relative:.3e}, "
              f"argmax agreement = {100 * net.argmax_agreement:.4f}%\n"
              "  (the whole LaPa model differs more because PyTorch's own float32 tanh-warp "
              "grids are ~1e-4 off its float64 ones; see README, 'Parity with PyTorch')")
    out = Path(out or f"parity_{variant.name}.png")
    header = [verdict.line()]
    if random_weights:
        header.append("RANDOM WEIGHTS (hub unreachable): masks are meaningless")
    img = parity_panel(rgb, jax_logits[0].argmax(-1), ref32[0].argmax(-1), variant, header)
    atomic_write(out, lambda p: img.save(p, format="PNG"))
    print(f"overlay written to {out}" + (" (labelled: random weights)" if random_weights else ""))
    print(verdict.line())
    return verdict


def parity_panel(rgb: np.ndarray, ours: np.ndarray, ref: np.ndarray, variant: Variant,
                 header: list[str]):
    """The parity overlay: image, JAX labels, reference labels and where they disagree side by
    side, under ``header`` (the verdict first), over a legend in the variant's palette."""
    from PIL import Image, ImageDraw

    r = rgb.shape[0]
    differ = ours != ref
    grey = (rgb.mean(-1, keepdims=True) * 0.5).astype(np.uint8).repeat(3, -1)
    disagreement = np.where(differ[..., None], np.array([255, 0, 0], np.uint8), grey)
    tiles = [("image", rgb), ("JAX", preprocess.overlay(rgb, ours, variant.palette)),
             ("PyTorch reference", preprocess.overlay(rgb, ref, variant.palette)),
             (f"disagreement: {int(differ.sum())} px", disagreement)]
    line, swatch = 14, 12
    per_row = max(1, 4 * r // 120)  # legend entries 120 px wide
    legend_rows = -(-len(variant.classes) // per_row)
    char = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength("x" * 20) / 20
    wrapped = [(text.startswith("PASS"), part) for text in header
               for part in textwrap.wrap(text, max(20, int((4 * r - 12) / char)))]
    top = 6 + line * len(wrapped) + 4
    img = Image.new("RGB", (4 * r, top + line + r + 6 + legend_rows * (swatch + 6)), "white")
    draw = ImageDraw.Draw(img)
    for i, (passed, text) in enumerate(wrapped):
        draw.text((6, 6 + i * line), text, fill=(0, 120, 0) if passed else (200, 0, 0))
    for i, (title, tile) in enumerate(tiles):
        draw.text((i * r + 4, top), title, fill=(0, 0, 0))
        img.paste(Image.fromarray(tile), (i * r, top + line))
    y0 = top + line + r + 6
    for k, (name, colour) in enumerate(zip(variant.classes, variant.palette, strict=True)):
        x, y = (k % per_row) * 120 + 6, y0 + (k // per_row) * (swatch + 6)
        draw.rectangle((x, y, x + swatch, y + swatch), fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x + swatch + 4, y), f"{k} {name}", fill=(0, 0, 0))
    return img
