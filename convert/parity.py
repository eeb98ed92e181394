"""``segface-jax parity``: run the PyTorch reference and the JAX model on the same face."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from segface_jax.examples import sample_faces
from segface_jax.models import SegFaceConfig
from segface_jax.variants import Variant

__all__ = ["ParityError", "ParityInput", "ParityResult", "ParityRun", "compare",
           "default_landmarks", "local_release", "network_parity", "parity_inputs", "run_parity",
           "run_parity_all", "run_torch", "seeded_release", "torch_stages", "write_report"]


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


class ParityError(ValueError):
    """A ``parity`` request that cannot run: no weights for ``--all``, conflicting options."""


@dataclasses.dataclass(frozen=True)
class ParityInput:
    """One face for ``parity``: a name, the uint8 RGB crop at the model's resolution and its 5
    landmarks in the crop's pixels (LaPa aligns with them; the others ignore them)."""

    name: str
    rgb: np.ndarray
    landmarks: np.ndarray


def parity_inputs(variant: Variant, image: str | None = None,
                  images: str | os.PathLike | None = None) -> list[ParityInput]:
    """``parity``'s faces: ``image``, the pictures in folder ``images``, or by default the
    astronaut, its mirror image and a rotated crop (``examples.sample_faces``). A user's
    picture is taken as an aligned, centred face crop: its landmarks are the standard ones."""
    r = variant.resolution
    if image is None and images is None:
        return [ParityInput(name, rgb, lm) for name, rgb, lm in sample_faces(r)]
    if image is not None:
        paths = [Path(image)]
    else:
        folder = Path(images)
        if not folder.is_dir():
            raise preprocess.ImageError(f"--images {folder}: not a folder")
        paths = sorted(p for p in folder.iterdir() if preprocess.is_image_file(p))
        if not paths:
            raise preprocess.ImageError(f"--images {folder}: no images in it ("
                                        f"{', '.join(sorted(preprocess.IMAGE_SUFFIXES))})")
    if variant.needs_landmarks:
        print("no landmarks for user images: each is taken as an aligned, centred face crop")
    standard = default_landmarks(r)[0]
    return [ParityInput(p.name, preprocess.resize_rgb(preprocess.read_rgb(p), r), standard)
            for p in paths]  # every picture is read before any heavy work


@dataclasses.dataclass(frozen=True)
class ParityRun:
    """What one variant's ``parity`` found: the verdict and the figures behind it."""

    variant: str
    verdict: Verdict
    result: ParityResult  # ours against torch float32, every image together
    per_image: list[tuple[str, ParityResult]]
    referee: str
    referee_distances: tuple[float, float] | None  # float64 referee: (ours, torch float32)
    network: ParityResult | None  # LaPa: the network alone on the same aligned input
    first_stage_over: str | None
    weights: str  # the release file, or "seeded random weights"
    weights_sha256: str

    def row(self) -> dict[str, Any]:
        """This run as one JSON-ready row of ``parity.json``."""
        row = {"variant": self.variant, "verdict": "PASS" if self.verdict.passed else "FAIL",
               "reason": self.verdict.reason, "bar": self.verdict.bar,
               "matmul_precision": self.verdict.precision, "referee": self.referee,
               "relative": self.result.relative, "max_abs_diff": self.result.max_abs_diff,
               "argmax_agreement": self.result.argmax_agreement,
               "images": {name: {"relative": r.relative, "argmax_agreement": r.argmax_agreement}
                          for name, r in self.per_image},
               "first_stage_over": self.first_stage_over, "weights": self.weights,
               "weights_sha256": self.weights_sha256}
        if self.referee_distances:
            row["float64_referee"] = dict(zip(("ours", "torch_float32"), self.referee_distances))
        if self.network:
            row["network_relative"] = self.network.relative
        return row


def run_parity(variant: Variant, weights: str | None, inputs: list[ParityInput] | None,
               out: str | None, fetch: Callable[[Variant], Path | None] | None = None, *,
               referee: str | None = None, matmul_precision: str = "highest",
               save_golden: str | os.PathLike | None = None) -> ParityRun:
    """The ``parity`` command for one variant: convert, run both models on the faces
    ``inputs`` (default ``parity_inputs(variant)``) as one batch, print the figures and a
    verdict, write an overlay.

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
    inputs = inputs or parity_inputs(variant)
    r = variant.resolution
    x = np.stack([preprocess.normalize(face.rgb) for face in inputs])
    lm = np.stack([face.landmarks for face in inputs]).astype(np.float32)
    source = ", ".join(face.name for face in inputs)
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
    print(f"{variant.name} on {len(inputs)} image(s) at {r}x{r}: max |delta| = "
          f"{result.max_abs_diff:.3e}, max |ref| = {result.ref_max_abs:.3e}, relative = "
          f"{result.relative:.3e}, argmax agreement = {100 * result.argmax_agreement:.4f}%")
    per_image = [(face.name, compare(jax_logits[i:i + 1], ref32[i:i + 1]))
                 for i, face in enumerate(inputs)]
    if len(inputs) > 1:
        for name, one in per_image:
            print(f"  {name}: relative = {one.relative:.3e}, argmax agreement = "
                  f"{100 * one.argmax_agreement:.4f}%")
    stages64 = None
    if referee == "float64":
        import copy

        stages64 = torch_stages(copy.deepcopy(ref).double(), x.astype(np.float64),
                                None if lm is None else lm.astype(np.float64))
    judgement = judge(jax_logits, jax_stages(model.module, x, lm), stages32, stages64,
                      matmul_precision)
    print(judgement.text)
    verdict = judgement.verdict
    if save_golden:
        from segface_jax.convert.golden import save_golden as save

        meta = save(save_golden, variant, images=x, landmarks=lm, referee=referee,
                    stages32=stages32, stages64=stages64, source_sha256=report.sha256,
                    random_weights=random_weights, image_source=source)
        print(f"golden files written: {meta.with_suffix('.npz')} and {meta}")
    net = None
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
    panels = [parity_panel(face.rgb, jax_logits[i].argmax(-1), ref32[i].argmax(-1), variant,
                           (header if i == 0 else []) + ([f"{face.name}: relative "
                           f"{per_image[i][1].relative:.2e}"] if len(inputs) > 1 else []),
                           legend=i == len(inputs) - 1)
              for i, face in enumerate(inputs)]
    img = _stacked(panels)
    atomic_write(out, lambda p: img.save(p, format="PNG"))
    print(f"overlay written to {out}" + (" (labelled: random weights)" if random_weights else ""))
    print(verdict.line())
    return ParityRun(variant.name, verdict, result, per_image, referee,
                     judgement.referee_distances, net, judgement.first_stage_over,
                     "seeded random weights" if random_weights else str(path), report.sha256)


def _stacked(panels):
    """Panels one above the other, on white."""
    from PIL import Image

    img = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)),
                    "white")
    y = 0
    for p in panels:
        img.paste(p, (0, y))
        y += p.height
    return img


def local_release(variant: Variant, weights_dir: str | os.PathLike | None,
                  cached: Callable[[Variant], Path | None] | None = None) -> Path | None:
    """``variant``'s release file without any download: ``weights_dir/<variant>/model_299.pt``
    (the hub's layout) or ``weights_dir/<variant>.pt``, else ``cached(variant)`` (the CLI
    passes the hub cache's lookup), else None."""
    if weights_dir is not None:
        for path in (Path(weights_dir) / variant.hub_filename,
                     Path(weights_dir) / f"{variant.name}.pt"):
            if path.is_file():
                return path
    return cached(variant) if cached else None


def run_parity_all(variants: list[Variant], out_dir: str | os.PathLike, *,
                   weights_dir: str | os.PathLike | None = None, images: str | None = None,
                   allow_random_weights: bool = False,
                   cached: Callable[[Variant], Path | None] | None = None,
                   **options) -> list[ParityRun]:
    """``parity --all``: every variant whose release file is available locally
    (``local_release``, with ``cached`` for the hub cache; with ``allow_random_weights``, the
    others on seeded random weights),
    each with its overlay in ``out_dir``; then ``out_dir/parity.md`` and ``parity.json``
    (``options``: ``run_parity``'s referee, matmul_precision, save_golden)."""
    import gc

    import jax

    from segface_jax.convert.golden import device, versions
    from segface_jax.files import ensure_writable

    out_dir = Path(out_dir)
    ensure_writable(out_dir, "--out")
    found = {v.name: local_release(v, weights_dir, cached) for v in variants}
    todo = [v for v in variants if found[v.name] or allow_random_weights]
    skipped = [v.name for v in variants if v not in todo]
    if not todo:
        raise ParityError(
            "no release files found for any variant (looked in "
            + (f"{weights_dir}/<variant>/model_299.pt, " if weights_dir else "")
            + "the local Hugging Face hub cache); pass --weights-dir, or "
            "--allow-random-weights to check the converter on seeded random weights")
    runs = []
    for i, v in enumerate(todo):
        print(f"\n[{i + 1}/{len(todo)}] {v.name}")
        inputs = parity_inputs(v, images=images)
        weights = found[v.name]
        runs.append(run_parity(v, None if weights is None else str(weights), inputs,
                               str(out_dir / f"parity_{v.name}.png"), **options))
        jax.clear_caches()  # one variant's compiled programs at a time
        gc.collect()
    header = {"versions": versions(), "device": device(),
              "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "images": images or "astronaut, mirrored, rotated 20 degrees (bundled)",
              "skipped (no weights)": skipped}
    print("\n" + write_report(out_dir, header, runs))
    passed = sum(run.verdict.passed for run in runs)
    print(f"{passed} of {len(runs)} variants PASS"
          + (f"; no weights for {', '.join(skipped)}" if skipped else "")
          + f"; wrote {out_dir / 'parity.md'} and {out_dir / 'parity.json'}")
    return runs


def write_report(out_dir: Path, header: dict[str, Any], runs: list[ParityRun]) -> str:
    """Write ``parity.json`` (the header and one row per run) and ``parity.md`` (a table);
    return the Markdown."""
    from segface_jax.files import atomic_write

    rows = [run.row() for run in runs]
    doc = json.dumps({**header, "variants": rows}, indent=2) + "\n"
    atomic_write(out_dir / "parity.json", lambda p: Path(p).write_text(doc))
    lines = ["| variant | verdict | relative to torch float32 | argmax agreement | "
             "float64 referee: ours / torch float32 | LaPa network alone | weights |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        ref64, net = row.get("float64_referee"), row.get("network_relative")
        lines.append(
            f"| {row['variant']} | {row['verdict']} | {row['relative']:.1e} | "
            f"{100 * row['argmax_agreement']:.4f}% | "
            + (f"{ref64['ours']:.1e} / {ref64['torch_float32']:.1e}" if ref64 else "-")
            + f" | {'-' if net is None else f'{net:.1e}'} | "
            + ("seeded random" if row["weights"] == "seeded random weights" else "release")
            + " |")
    made = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    text = (f"Parity of segface-jax with the PyTorch reference ({header['created']}, "
            f"{header['device']}; {made}; images: {header['images']}).\n\n"
            + "\n".join(lines) + "\n"
            + (f"\nNo weights found for: {', '.join(header['skipped (no weights)'])}.\n"
               if header["skipped (no weights)"] else ""))
    atomic_write(out_dir / "parity.md", lambda p: Path(p).write_text(text))
    return text


def parity_panel(rgb: np.ndarray, ours: np.ndarray, ref: np.ndarray, variant: Variant,
                 header: list[str], legend: bool = True):
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
    legend_rows = -(-len(variant.classes) // per_row) if legend else 0
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
    entries = zip(variant.classes, variant.palette, strict=True) if legend else ()
    for k, (name, colour) in enumerate(entries):
        x, y = (k % per_row) * 120 + 6, y0 + (k // per_row) * (swatch + 6)
        draw.rectangle((x, y, x + swatch, y + swatch), fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x + swatch + 4, y), f"{k} {name}", fill=(0, 0, 0))
    return img
