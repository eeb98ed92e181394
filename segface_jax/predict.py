"""``segface-jax predict``: parse files, folders and globs of images and write the results.

For each input ``<name>`` it writes, under ``--out`` (folders keep their sub-folder layout):
``<name>_labels.png`` (palette PNG: pixel value = class index), ``<name>_instances.png`` (face
number per pixel, 0 = none; with ``--faces all|largest``), ``<name>_overlay.png`` (with each
face's box and landmarks), ``<name>.json`` (faces with box, score, landmarks and class areas;
class areas of the whole image; size, weights) and, on request, ``<name>_probs.npz``. Every file
is written to a temporary name and renamed, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segface_jax import examples, hub, preprocess
from segface_jax import faces as faces_lib
from segface_jax import landmarks as lmk
from segface_jax.files import atomic_write, ensure_writable
from segface_jax.parser import FaceParser, ImageResult, enable_compilation_cache
from segface_jax.postprocess import class_areas
from segface_jax.variants import get_variant

SAVE_KINDS = ("labels", "instances", "overlay", "probs", "json")
DEFAULT_SAVE = "labels,instances,overlay,json"
EXAMPLE = "astronaut"  # scikit-image's sample photo, for the README's first command


class InputError(Exception):
    """Inputs or options that cannot be used as given; the message says what to change."""


@dataclasses.dataclass
class Job:
    """One input image and where its outputs go (``stem`` without the output suffixes)."""

    source: str  # a path, or "skimage:astronaut"
    stem: Path

    def outputs(self, save: Sequence[str]) -> dict[str, Path]:
        """Output path of each requested kind."""
        names = {"labels": "_labels.png", "instances": "_instances.png",
                 "overlay": "_overlay.png", "probs": "_probs.npz", "json": ".json"}
        return {k: self.stem.with_name(self.stem.name + names[k]) for k in save}


def collect_inputs(inputs: Sequence[str], out_dir: Path,
                   notify: Callable[[str], None] | None = None) -> list[Job]:
    """Expand files, folders (recursively, image suffixes only) and globs into jobs, each with
    its output stem (``notify`` hears once if some stems had to keep their extension)."""
    jobs: list[Job] = []
    for arg in inputs:
        if arg == f"skimage:{EXAMPLE}":
            jobs.append(Job(arg, out_dir / EXAMPLE))
            continue
        path = Path(arg)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if preprocess.is_image_file(p))
            if not files:
                kinds = ", ".join(sorted(preprocess.IMAGE_SUFFIXES))
                raise InputError(f"{path}: folder holds no images ({kinds})")
            jobs += [Job(str(f), out_dir / path.name / f.relative_to(path).with_suffix(""))
                     for f in files]
        elif path.exists() or not glob.has_magic(arg):
            jobs.append(Job(arg, out_dir / path.stem))  # a missing file fails with its reason
        else:
            matches = sorted(m for m in glob.glob(arg, recursive=True) if Path(m).is_file())
            if not matches:
                raise InputError(f"{arg}: the pattern matches no files")
            jobs += [Job(m, out_dir / Path(m).stem) for m in matches]
    if not jobs:
        raise InputError("no inputs: pass image files, folders or glob patterns")
    return _name_outputs(jobs, notify)


def _name_outputs(jobs: list[Job], notify: Callable[[str], None] | None) -> list[Job]:
    """Drop repeats of one file; where different inputs share an output stem (face.jpg and
    face.png), keep their extension in it (face.jpg_labels.png, face.png_labels.png)."""
    unique: dict[str, Job] = {}
    for job in jobs:
        key = job.source if job.source.startswith("skimage:") else os.path.realpath(job.source)
        unique.setdefault(key, job)
    jobs = list(unique.values())
    by_stem: dict[Path, list[Job]] = {}
    for job in jobs:
        by_stem.setdefault(job.stem, []).append(job)
    renamed = []
    for stem, group in by_stem.items():
        if len(group) > 1:
            for i, job in enumerate(group):
                group[i] = dataclasses.replace(job, stem=stem.with_name(Path(job.source).name))
            renamed.append(group)
    jobs = [j for group in by_stem.values() for j in group]
    seen: dict[Path, str] = {}
    clashes = []
    for job in jobs:
        if job.stem in seen:
            clashes.append(f"{seen[job.stem]} and {job.source}")
        seen.setdefault(job.stem, job.source)
    if clashes:
        raise InputError("inputs would write the same output names: " + "; ".join(clashes[:5])
                         + ("; ..." if len(clashes) > 5 else "")
                         + ". Rename them or run them separately.")
    if renamed and notify is not None:
        example = renamed[0][0].outputs(["labels"])["labels"].name
        notify(f"{sum(map(len, renamed))} inputs share a name with another input "
               f"(e.g. {', '.join(Path(j.source).name for j in renamed[0])}); their outputs keep "
               f"the file extension ({example}, ...)")
    return jobs


def label_png(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A palette ('P' mode) PNG whose pixel values are the class indices."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [c for rgb in palette for c in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    return im


def _random_weights_banner(image: np.ndarray) -> np.ndarray:
    im = Image.fromarray(image)
    text = "RANDOM WEIGHTS (hub unreachable): mask is meaningless"
    draw = ImageDraw.Draw(im)
    box = draw.textbbox((6, 6), text)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((6, 6), text, fill=(255, 60, 60))
    return np.asarray(im)


def write_outputs(job: Job, result: ImageResult, parser: FaceParser, save: Sequence[str],
                  weights_note: dict) -> None:
    """Write every requested output of one parsed image, each atomically."""
    v = parser.variant
    out = job.outputs(save)
    if "labels" in out:
        atomic_write(out["labels"], lambda p: label_png(result.labels, v.palette).save(
            p, format="PNG"))
    if "instances" in out and result.instances is not None:
        atomic_write(out["instances"], lambda p: Image.fromarray(result.instances, mode="L").save(
            p, format="PNG"))
    if "overlay" in out:
        over = preprocess.overlay(result.image, result.labels, v.palette)
        if result.faces:
            over = faces_lib.draw(over, result.faces)
        if weights_note.get("random"):
            over = _random_weights_banner(over)
        atomic_write(out["overlay"], lambda p: Image.fromarray(over).save(p, format="PNG"))
    if "probs" in out:
        def write_probs(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez_compressed(f, probabilities=result.probabilities.astype(np.float16),
                                    class_names=np.array(v.classes))
        atomic_write(out["probs"], write_probs)
    if "json" in out:
        h, w = result.labels.shape
        info = {
            "source": job.source, "variant": v.name, "width": w, "height": h,
            "weights": weights_note,
            "landmarks": None if result.landmarks is None else result.landmarks.tolist(),
            "alignment": (f"per face: {v.data.face_frame}" if result.faces is not None else
                          ("landmarks" if result.landmarks is not None else
                           "assumed aligned face crop") if v.needs_landmarks else None),
            "crop_box": result.crop_box,
            "classes": class_areas(result.labels, v.classes),
        }
        if result.faces is not None:
            info["faces"] = [{
                "id": k, "box": [round(float(c), 2) for c in face.box],
                "score": face.score, "landmarks": np.round(face.landmarks, 2).tolist(),
                "parts": _face_parts(result, k, v.classes)}
                for k, face in enumerate(result.faces, 1)]
        atomic_write(out["json"], lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))


def _face_parts(result: ImageResult, number: int,
                class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Pixels of each part (not background) of face ``number``, and their fraction of the
    face's pixels."""
    areas = class_areas(result.labels[result.instances == number], class_names)
    return {name: area for name, area in areas.items() if name != class_names[0]}


def run_predict(args) -> int:
    """The ``predict`` command; returns the exit status (1 when any input failed)."""
    from tqdm import tqdm

    save = [s.strip() for s in (args.save or DEFAULT_SAVE).split(",") if s.strip()]
    unknown = sorted(set(save) - set(SAVE_KINDS))
    if unknown or not save:
        raise InputError(f"--save: unknown output kind(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {','.join(SAVE_KINDS)}")
    if args.faces == "none" and "instances" in save:
        if args.save is not None:
            raise InputError("--save instances needs --faces all or largest (with --faces none "
                             "the whole image is parsed, so there are no face numbers)")
        save.remove("instances")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.variant is None and args.weights is None:
        raise InputError(hub.NAME_A_MODEL)
    # the one place the name becomes a Variant (with --weights alone, the weights name it)
    variant = get_variant(args.variant) if args.variant else None
    out_dir = Path(args.out)
    inputs = list(args.inputs) + ([f"skimage:{EXAMPLE}"] if args.example else [])
    jobs = collect_inputs(inputs, out_dir,
                          notify=lambda msg: print(f"note: {msg}", file=sys.stderr))
    ensure_writable(out_dir, "--out")
    table = lmk.read_landmark_file(args.landmarks) if args.landmarks else {}
    if "" in table and len(jobs) > 1:
        raise InputError(f"{args.landmarks}: a single-image .txt landmark file, but there are "
                         f"{len(jobs)} inputs; use a JSON file or a folder of <stem>.txt files")

    existing = [p for job in jobs for p in job.outputs(save).values() if p.exists()]
    skipped: list[Job] = []
    if existing and not args.overwrite:
        if not args.skip_existing:
            shown = ", ".join(str(p) for p in existing[:3]) + (", ..." if len(existing) > 3
                                                               else "")
            raise InputError(f"{len(existing)} output file(s) already exist ({shown}); pass "
                             "--overwrite to replace them or --skip-existing to parse only the "
                             "other inputs")
        done = {p for p in existing}
        skipped = [j for j in jobs if all(p in done for p in j.outputs(save).values())]
        jobs = [j for j in jobs if j not in skipped]

    # Large images are read and post-processed in chunks; PIL's warning between its limit and
    # twice it (where it refuses, and we skip the file with the reason) would only be noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    def note(msg: str) -> None:
        tqdm.write(f"note: {msg}", file=sys.stderr)

    t_setup = time.perf_counter()
    enable_compilation_cache()
    if args.weights is None and args.allow_random_weights:
        from segface_jax.demo import release_or_seeded

        weights = release_or_seeded(variant, args.revision)
    else:
        weights = hub.resolve(variant, args.weights, args.revision)
    detector = None
    if args.detect_landmarks:
        from segface_jax.detect import MediaPipeDetector

        detector = MediaPipeDetector()
    elif args.faces != "none":
        from segface_jax import mtcnn

        try:
            detector = mtcnn.pretrained()
        except mtcnn.DetectorWeightsError as e:
            raise InputError(f"{e}; or pass --faces none to parse whole images") from None
    parser = FaceParser(hub.load_weights(weights, args.dtype), batch_size=args.batch_size,
                        notify=note, detector=detector, faces=args.faces, tta=args.tta)
    weights_note = {"random": weights.random,
                    "sha256": parser.model.metadata.get("source", {}).get("sha256")}
    if weights.random:
        weights_note["file"] = str(weights.source)
    setup_s = time.perf_counter() - t_setup

    images, points = [], []
    for job in jobs:
        if job.source == f"skimage:{EXAMPLE}":
            images.append(examples.astronaut())
            points.append(examples.ASTRONAUT_LANDMARKS if parser.variant.needs_landmarks
                          else None)
        else:
            images.append(job.source)
            points.append(lmk.lookup(table, job.source) if table else None)
    if table and not parser.variant.uses_landmarks and args.faces == "none":
        note(f"{parser.variant.name} parses the whole image and does not use landmarks; "
             f"{args.landmarks} is ignored")
    elif table:
        missing = [j.source for j, p in zip(jobs, points) if p is None]
        if missing:
            note(f"{len(missing)} input(s) have no entry in {args.landmarks} "
                 f"(e.g. {missing[0]})")

    failures: list[tuple[str, str]] = []
    faceless: list[str] = []
    found = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="img", desc=f"parsing ({parser.variant.name})",
               disable=args.quiet or None, dynamic_ncols=True)
    try:
        for result in parser.parse_iter(images, points, with_probabilities="probs" in save):
            job = jobs[result.index]
            if result.error:
                failures.append((job.source, result.error))
                tqdm.write(f"skipped {result.error}", file=sys.stderr)
            else:
                if result.faces is not None:
                    found += len(result.faces)
                    if not result.faces:
                        faceless.append(job.source)
                        tqdm.write(f"no face found in {job.source}", file=sys.stderr)
                try:
                    write_outputs(job, result, parser, save, weights_note)
                except OSError as e:
                    failures.append((job.source, f"cannot write outputs: {e}"))
                    tqdm.write(f"failed {job.source}: cannot write outputs ({e})",
                               file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    parsed = len(jobs) - len(failures)
    rate = parsed / elapsed if elapsed > 0 else 0.0
    summary = (f"parsed {parsed} of {len(jobs)} image(s) with {parser.variant.name} in "
               f"{elapsed:.1f} s ({rate:.2f} img/s; set-up {setup_s:.1f} s); outputs in {out_dir}")
    if args.faces != "none":
        summary += (f"; {found} face(s) found" + (f", none in {len(faceless)} image(s)"
                                                  if faceless else ""))
    if skipped:
        summary += f"; {len(skipped)} already done (--skip-existing)"
    if weights_note.get("random"):
        summary += "; RANDOM WEIGHTS: the masks are meaningless"
    print(summary)
    if failures:
        print(f"{len(failures)} input(s) failed:", file=sys.stderr)
        for source, why in failures:
            print(f"  {why if why.startswith(source) else f'{source}: {why}'}", file=sys.stderr)
        return 1
    return 0

