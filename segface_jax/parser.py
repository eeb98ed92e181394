"""``FaceParser``: released SegFace models on any images, at each image's own size.

```python
parser = segface_jax.FaceParser.from_pretrained("swinb_celeba_512")
result = parser(["me.jpg", pil_image, numpy_image])
result.labels[0]        # (H, W) uint8 class map at the first image's size
result.overlay(0)       # RGB overlay in the variant's palette
```

Images of any size are resized to the model resolution (bicubic, as upstream's data pipeline),
batched into a fixed set of compiled batch shapes (powers of two up to ``batch_size``, the last
batch padded), and the logits resized back to each image's size before the argmax (bilinear,
as upstream's evaluation). LaPa models align faces with 5 landmarks; Helen models crop the box
of 68 landmarks as upstream's Helen pipeline does.

With a detector (``from_pretrained(..., detector="mtcnn")``), every face in an image is cut out
as its model's training faces were (``segface_jax.faces``), the faces of all images are batched
together, and each face's result is pasted back into its image (class and instance maps).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from segface_jax import faces as faces_lib
from segface_jax import landmarks as lmk
from segface_jax import postprocess, preprocess
from segface_jax.align import standard_landmarks
from segface_jax.checkpoint import CheckpointError
from segface_jax.faces import Face
from segface_jax.runtime import LoadedModel
from segface_jax.variants import VARIANTS, Variant

NO_LANDMARKS_NOTE = ("{variant}: no landmarks given, so images are treated as already aligned, "
                     "centred face crops (pass 5, 68 or 106 points per image to align them)")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache (unless the user configured one already).

    Compiled programs then survive the process: the second run of the same model and batch
    shape starts in a fraction of the time. Default location: ``<segface-jax cache>/xla``;
    set ``SEGFACE_JAX_COMPILATION_CACHE=0`` to leave JAX's setting alone.
    """
    from segface_jax.hub import cache_dir

    if os.environ.get("SEGFACE_JAX_COMPILATION_CACHE", "1").lower() in ("0", "false", "no"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    target = Path(path) if path else cache_dir() / "xla"
    target.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(target))
    # every program, not only those that took JAX's default 1 s to compile: the detector's
    # networks compile in about that long, so whether a second run recompiled them depended
    # on the machine's load
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return target


@dataclasses.dataclass
class ImageResult:
    """One image's class map, or the reason it failed, as ``FaceParser.parse_iter`` yields it."""

    index: int
    source: str
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB as parsed
    labels: np.ndarray | None = None  # (H, W) uint8
    probabilities: np.ndarray | None = None  # (H, W, C) float32
    landmarks: np.ndarray | None = None  # (5, 2) pixel points used to align, if any
    crop_box: tuple[int, int, int, int] | None = None  # Helen crop (x1, y1, x2, y2), if any
    faces: list[Face] | None = None  # per-face parsing: the faces, numbered 1, 2, ... below
    instances: np.ndarray | None = None  # (H, W) uint8 face number per pixel (0 = none)
    note: str | None = None  # e.g. "no face found": parsed, with nothing to report
    error: str | None = None  # why this input was not parsed
    exception: Exception | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass
class ParseResult:
    """What ``parser(images)`` returns: the class maps of all its images, each at the image's own
    size (it raises on the first unusable input, where ``parse_iter`` yields an ``ImageResult``
    with the error and goes on)."""

    labels: list[np.ndarray]
    probabilities: list[np.ndarray] | None
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    images: list[np.ndarray]
    sources: list[str]
    faces: list[list[Face] | None] = dataclasses.field(default_factory=list)
    instances: list[np.ndarray | None] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def overlay(self, i: int, alpha: float = 0.5) -> np.ndarray:
        """(H, W, 3) uint8 image ``i`` with its classes coloured (background left as is) and,
        with per-face parsing, each face's box, number and landmarks drawn."""
        over = preprocess.overlay(self.images[i], self.labels[i], self.palette, alpha)
        faces = self.faces[i] if i < len(self.faces) else None
        return faces_lib.draw(over, faces) if faces else over

    def areas(self, i: int) -> dict[str, dict[str, float]]:
        """Pixel count and fraction of every class in image ``i``."""
        return postprocess.class_areas(self.labels[i], self.class_names)


@dataclasses.dataclass
class _FaceGroup:
    """The faces of one image, joined into its maps as their batches finish."""

    frames: list[faces_lib.Frame]
    composite: faces_lib.Composite
    done: int = 0


@dataclasses.dataclass
class _ModelInput:
    """An image (or one face of it) decoded, cropped, resized and normalised, waiting for its
    batch."""

    item: ImageResult
    x: np.ndarray  # (R, R, 3) float32 normalised
    lm: np.ndarray | None  # (5, 2) at model resolution, LaPa only
    group: _FaceGroup | None = None  # per-face parsing: this image's faces
    face: int = 0  # which of them


FACE_MODES = ("all", "largest", "none")
TTA_MODES = ("none", "flip")


@jax.jit
def _flip_average(logits: jax.Array, mirrored: jax.Array, mirror: jax.Array) -> jax.Array:
    """Flip test-time augmentation: the log of the mean of the image's probabilities and its
    mirror image's, mirrored back with left and right classes swapped (float32)."""
    p = jax.nn.log_softmax(logits.astype(jax.numpy.float32), axis=-1)
    q = jax.nn.log_softmax(mirrored.astype(jax.numpy.float32), axis=-1)[:, :, ::-1]
    # log((e^p + e^q) / 2) without underflow: a logit gap of ~90 made log(0) = -inf
    return jax.numpy.logaddexp(p, q[..., mirror]) - jax.numpy.log(2.0)


def faces_found(found: Any) -> list[Face]:
    """A detector's answer as faces, largest first: ``Detections`` (or anything with boxes,
    scores and landmarks), 5 points for one face, or None for none."""
    if found is None:
        return []
    if hasattr(found, "boxes"):
        out = [Face(np.asarray(b, np.float32), float(s), np.asarray(lm, np.float32))
               for b, s, lm in zip(found.boxes, found.scores, found.landmarks)]
    else:
        out = [Face.from_landmarks(lmk.to_five(found, "the detector's landmarks"))]
    return sorted(out, key=lambda f: -float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))


def _batch_buckets(batch_size: int) -> list[int]:
    sizes, b = [], 1
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return [*sizes, batch_size]


class FaceParser:
    """Parse faces in images of any size with one SegFace model (see the module docstring)."""

    def __init__(self, model: LoadedModel, batch_size: int | None = None, num_threads: int = 4,
                 notify: Callable[[str], None] | None = None,
                 detector: Callable[[np.ndarray], Any] | None = None, faces: str = "all",
                 tta: str = "none"):
        if faces not in FACE_MODES:
            raise ValueError(f"faces must be one of {', '.join(FACE_MODES)}, not {faces!r}")
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, not {tta!r}")
        if batch_size is None:  # measured: on CPU, batch 1 has the best throughput (README)
            batch_size = 1 if jax.default_backend() == "cpu" else 8
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.variant: Variant = model.variant
        self.batch_size = batch_size
        self.buckets = _batch_buckets(batch_size)
        self.num_threads = max(1, num_threads)
        self._notify = notify or (lambda msg: warnings.warn(msg, stacklevel=3))
        self._said_no_landmarks = False
        # With faces "all" or "largest", every face the detector finds is cut out the way the
        # model's training faces were and parsed (segface_jax.faces); with "none", the whole
        # image is parsed and a detector only finds LaPa's landmarks. Called under a lock
        # because detectors are rarely thread-safe.
        self.detector = detector
        self.faces = faces if detector is not None else "none"
        # tta="flip": every input is also parsed mirrored, and the two are averaged
        self.tta = tta
        self._mirror = np.asarray(self.variant.data.mirrored_classes, np.int32)
        self._detector_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, variant: str | Variant | None = None, *,
                        weights: str | os.PathLike | None = None, dtype: Any = None,
                        revision: str | None = None, batch_size: int | None = None,
                        compilation_cache: bool = True, quiet: bool = False,
                        notify: Callable[[str], None] | None = None,
                        detector: str | Callable[[np.ndarray], Any] | None = None,
                        faces: str = "all", tta: str = "none") -> FaceParser:
        """A parser for a released variant, with its release weights or ``weights`` given.

        ``from_pretrained("swinb_celeba_512")`` downloads ``kartiknarayan/SegFace/<variant>/
        model_299.pt`` (huggingface_hub; HF_HOME, HF_HUB_OFFLINE and ``revision`` apply) and
        converts it once into the cache. ``weights=`` takes a release ``.pt`` or a `segface-jax
        convert` directory instead (then ``variant`` may be left out: it is read or inferred).
        ``dtype="bfloat16"`` computes in bfloat16 with float32 parameters.

        ``detector="mtcnn"`` (facenet-pytorch 2.6.0's pretrained MTCNN, converted once into the
        cache) or any callable from an RGB array to ``Detections`` or 5 points finds the faces
        in each image; each is aligned as its model's training faces were, parsed, and pasted
        back (``faces="largest"``: the largest only; ``faces="none"``: whole images, the detector
        only giving LaPa models their landmarks). ``detector=None`` parses whole images (and
        ignores ``faces``).
        ``tta="flip"`` averages each input's probabilities with its mirror image's (left and
        right classes swapped back), at twice the compute.
        """
        from segface_jax import hub

        if detector == "mtcnn":
            from segface_jax import mtcnn

            detector = mtcnn.pretrained()
        elif isinstance(detector, str):
            raise ValueError(f"unknown detector {detector!r}; use 'mtcnn', a callable or None")

        if isinstance(variant, os.PathLike) or isinstance(variant, str) and (
                variant not in VARIANTS and (Path(variant).suffix in (".pt", ".pth")
                                             or os.sep in variant or Path(variant).exists())):
            raise CheckpointError(f"{variant} looks like a file: pass it as weights="
                                  f"{str(variant)!r} (the first argument is a variant name)")
        if compilation_cache:
            enable_compilation_cache()
        resolved = hub.resolve(variant, weights, revision, quiet=quiet)
        return cls(hub.load_weights(resolved, dtype, quiet), batch_size=batch_size,
                   notify=notify, detector=detector, faces=faces, tta=tta)

    # -- preparation -------------------------------------------------------------------------

    def _prepare(self, index: int, item: Any, points: Any,
                 with_probabilities: bool = False) -> list[_ModelInput] | ImageResult:
        """Decode one input and make its model inputs: one per face (``faces`` "all" or
        "largest"), or the whole image; an ``ImageResult`` when it is done already (an
        unusable input, or no face found)."""
        source = str(item) if isinstance(item, str | os.PathLike) else f"<image {index}>"
        out = ImageResult(index, source)
        try:
            rgb = preprocess.to_rgb(item, source)
            if self.faces != "none":
                return self._prepare_faces(out, rgb, points, with_probabilities)
            if points is None and self.detector is not None and self.variant.needs_landmarks:
                with self._detector_lock:
                    found = faces_found(self.detector(rgb))
                if not found:
                    raise lmk.LandmarkError(f"{source}: the landmark detector found no face")
                points = found[0].landmarks  # the largest face
            five = None if points is None else lmk.to_five(points, f"landmarks of {source}")
        except (preprocess.ImageError, lmk.LandmarkError) as e:
            out.error, out.exception = str(e), e
            return out
        except faces_lib.FrameError as e:
            out.exception = lmk.LandmarkError(f"{source}: {e}")
            out.error = str(out.exception)
            return out
        out.image = rgb
        v, r = self.variant, self.variant.resolution
        h, w = rgb.shape[:2]
        face = rgb
        if v.data.crops_to_face and points is not None and np.asarray(points).size >= 2 * 68:
            out.crop_box = lmk.helen_crop_box(np.asarray(points, np.float32).reshape(-1, 2),
                                              (h, w))
            x1, y1, x2, y2 = out.crop_box
            if x2 - x1 < 2 or y2 - y1 < 2:
                out.exception = lmk.LandmarkError(
                    f"{source}: the landmarks' face box lies outside the image")
                out.error = str(out.exception)
                return out
            face = rgb[y1:y2, x1:x2]
        x = preprocess.normalize(preprocess.resize_rgb(face, r))
        lm = None
        if v.needs_landmarks:
            if five is None:
                lm = standard_landmarks(r)
            else:
                out.landmarks = five
                lm = (five * np.array([r / w, r / h], np.float32)).astype(np.float32)
                if (problem := lmk.degenerate(five, (h, w))) is not None:
                    self._notify(f"{source}: {problem}; its alignment will be meaningless")
        return [_ModelInput(out, x, lm)]

    def _prepare_faces(self, out: ImageResult, rgb: np.ndarray, points: Any,
                       with_probabilities: bool) -> list[_ModelInput] | ImageResult:
        """Per-face parsing: the faces (the user's landmarks win over the detector), each cut
        out with its dataset's convention (``segface_jax.faces``)."""
        out.image = rgb
        v, r = self.variant, self.variant.resolution
        if points is not None:  # one face, where the user says it is
            five = lmk.to_five(points, f"landmarks of {out.source}")
            if (problem := lmk.degenerate(five, rgb.shape[:2])) is not None:
                raise lmk.LandmarkError(f"{out.source}: {problem}")
            found = [Face.from_landmarks(five)]
        else:
            with self._detector_lock:
                found = faces_found(self.detector(rgb))
        if self.faces == "largest":
            found = found[:1]
        most = faces_lib.Composite.MAX_FACES
        if len(found) > most:
            self._notify(f"{out.source}: {len(found)} faces found; the {most} largest are "
                         f"parsed (the instance map numbers up to {most})")
            found = found[:most]
        out.faces = found
        if not found:
            out.note = "no face found"
            out.labels = np.zeros(rgb.shape[:2], np.uint8)
            out.instances = np.zeros(rgb.shape[:2], np.uint8)
            return out
        to_frame = faces_lib.FRAMES[v.data.face_frame]
        helen68 = v.data.crops_to_face and points is not None and np.asarray(points).size >= 136
        frames = [faces_lib.helen_frame_68(points) if helen68 else to_frame(face.landmarks)
                  for face in found]
        for frame in frames:
            faces_lib.check(frame, rgb.shape[:2])  # FrameError: a LandmarkError, caught above
        group = _FaceGroup(frames, faces_lib.Composite(rgb.shape[:2], v.num_classes,
                                                       with_probabilities))
        pixels = rgb.astype(np.float32)  # once for all its faces
        inputs = []
        for k, (face, frame) in enumerate(zip(found, frames)):
            x = preprocess.normalize(faces_lib.crop(pixels, frame, r).round().astype(np.uint8))
            lm = frame.crop_pixels(face.landmarks, r) if v.needs_landmarks else None
            inputs.append(_ModelInput(out, x, lm, group, k))
        return inputs

    # -- running -----------------------------------------------------------------------------

    def _run_batch(self, batch: list[_ModelInput]):
        n = len(batch)
        size = next(b for b in self.buckets if b >= n)
        x = np.zeros((size, *batch[0].x.shape), np.float32)
        x[:n] = np.stack([p.x for p in batch])
        lm = None
        if self.variant.needs_landmarks:  # padding rows: a well-posed alignment, discarded
            lm = np.repeat(standard_landmarks(self.variant.resolution)[None], size, axis=0)
            lm[:n] = np.stack([p.lm for p in batch])
        logits = self.model(x, landmarks=lm)  # dispatched asynchronously
        if self.tta == "flip":
            mirrored_lm = None if lm is None else lmk.mirror_landmarks(lm, self.variant.resolution)
            mirrored = self.model(np.ascontiguousarray(x[:, :, ::-1]), landmarks=mirrored_lm)
            logits = _flip_average(logits, mirrored, self._mirror)
        return logits

    def _finish(self, batch: list[_ModelInput], logits: jax.Array,
                with_probabilities: bool) -> Iterator[ImageResult]:
        """The images of ``batch`` that are complete now, at their own sizes."""
        host = np.asarray(logits)
        for i, p in enumerate(batch):
            out = p.item
            h, w = out.image.shape[:2]
            if p.group is not None:
                p.group.composite.add(p.face + 1, host[i], p.group.frames[p.face])
                p.group.done += 1
                if p.group.done == len(p.group.frames):
                    c = p.group.composite
                    out.labels, out.instances, out.probabilities = (c.labels, c.instances,
                                                                    c.probabilities)
                    yield out
            elif out.crop_box is not None:
                x1, y1, x2, y2 = out.crop_box
                labels, probs = postprocess.labels_at_size(host[i], (y2 - y1, x2 - x1),
                                                           with_probabilities)
                out.labels, out.probabilities = postprocess.paste(labels, probs, out.crop_box,
                                                                  (h, w))
                yield out
            else:
                out.labels, out.probabilities = postprocess.labels_at_size(
                    host[i], (h, w), with_probabilities)
                yield out

    def parse_iter(self, images: Iterable[Any], landmarks: Sequence[Any] | None = None,
                   with_probabilities: bool = False) -> Iterator[ImageResult]:
        """Parse a stream of images, yielding one ``ImageResult`` per input, in input order.

        An input that cannot be used yields a ``ImageResult`` with ``error`` set instead of raising.
        Decoding runs in threads ahead of the device, and the post-processing of one batch
        overlaps the next batch's forward pass.
        """
        items = list(images)
        if landmarks is not None and len(landmarks) != len(items):
            raise lmk.LandmarkError(f"got {len(landmarks)} landmark entries for {len(items)} "
                                    "images; pass one per image (None where there are none)")
        points = list(landmarks) if landmarks is not None else [None] * len(items)
        if self.variant.needs_landmarks and any(p is None for p in points) \
                and self.detector is None and not self._said_no_landmarks:
            self._said_no_landmarks = True
            self._notify(NO_LANDMARKS_NOTE.format(variant=self.variant.name))
        done: dict[int, ImageResult] = {}
        next_index = 0
        pending: tuple[list[_ModelInput], jax.Array] | None = None
        waiting: list[_ModelInput] = []
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
            queue: collections.deque[concurrent.futures.Future] = collections.deque()
            todo = iter(enumerate(zip(items, points)))
            lookahead = 2 * self.batch_size + self.num_threads
            while True:
                for i, (item, pts) in itertools.islice(todo, lookahead - len(queue)):
                    queue.append(pool.submit(self._prepare, i, item, pts,
                                             with_probabilities))
                if queue:
                    prepared = queue.popleft().result()
                    if isinstance(prepared, ImageResult):
                        if prepared.labels is not None and with_probabilities:
                            prepared.probabilities = postprocess.background_probabilities(
                                prepared.labels.shape, self.variant.num_classes)
                        done[prepared.index] = prepared
                    else:
                        waiting.extend(prepared)
                # full batches while inputs wait; the rest once nothing else is coming
                while len(waiting) >= self.batch_size or (waiting and not queue):
                    batch, waiting = waiting[:self.batch_size], waiting[self.batch_size:]
                    logits = self._run_batch(batch)  # async: the host goes on below
                    if pending is not None:
                        done.update((o.index, o) for o in self._finish(*pending,
                                                                        with_probabilities))
                    pending = (batch, logits)
                if not queue and pending is not None:
                    done.update((o.index, o) for o in self._finish(*pending, with_probabilities))
                    pending = None
                while next_index in done:
                    yield done.pop(next_index)
                    next_index += 1
                if not queue and not waiting and pending is None:
                    return

    def __call__(self, images: Any, landmarks: Sequence[Any] | None = None,
                 return_probabilities: bool = False) -> ParseResult:
        """Parse images (paths, PIL images or arrays; one or a list) at their own sizes.

        ``landmarks``: one entry per image, each 5, 68 or 106 (x, y) pixel points or None.
        Raises ``ImageError`` / ``LandmarkError`` naming the first input that cannot be used.
        """
        from PIL import Image

        single = isinstance(images, str | os.PathLike | Image.Image) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3))
        items = [images] if single else list(images)
        if single and landmarks is not None:
            landmarks = [landmarks]
        results = list(self.parse_iter(items, landmarks, return_probabilities))
        for r in results:
            if r.exception is not None:
                raise r.exception.with_traceback(None)
        return ParseResult(
            labels=[r.labels for r in results],
            probabilities=[r.probabilities for r in results] if return_probabilities else None,
            class_names=self.variant.classes, palette=self.variant.palette,
            images=[r.image for r in results], sources=[r.source for r in results],
            faces=[r.faces for r in results], instances=[r.instances for r in results])

