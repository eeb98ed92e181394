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

from segface_jax import landmarks as lmk
from segface_jax import postprocess, preprocess
from segface_jax.align import standard_landmarks
from segface_jax.checkpoint import CheckpointError
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

    def __len__(self) -> int:
        return len(self.labels)

    def overlay(self, i: int, alpha: float = 0.5) -> np.ndarray:
        """(H, W, 3) uint8 image ``i`` with its classes coloured (background left as is)."""
        return preprocess.overlay(self.images[i], self.labels[i], self.palette, alpha)

    def areas(self, i: int) -> dict[str, dict[str, float]]:
        """Pixel count and fraction of every class in image ``i``."""
        return postprocess.class_areas(self.labels[i], self.class_names)


@dataclasses.dataclass
class _ModelInput:
    """An image decoded, cropped, resized and normalised, waiting for its batch."""

    item: ImageResult
    x: np.ndarray  # (R, R, 3) float32 normalised
    lm: np.ndarray | None  # (5, 2) at model resolution, LaPa only


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
                 detector: Callable[[np.ndarray], Any] | None = None):
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
        # LaPa: landmarks for images given without any (see segface_jax.detect); called under a
        # lock because detectors are rarely thread-safe
        self.detector = detector
        self._detector_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, variant: str | Variant | None = None, *,
                        weights: str | os.PathLike | None = None, dtype: Any = None,
                        revision: str | None = None, batch_size: int | None = None,
                        compilation_cache: bool = True, quiet: bool = False,
                        notify: Callable[[str], None] | None = None,
                        detector: Callable[[np.ndarray], Any] | None = None) -> FaceParser:
        """A parser for a released variant, with its release weights or ``weights`` given.

        ``from_pretrained("swinb_celeba_512")`` downloads ``kartiknarayan/SegFace/<variant>/
        model_299.pt`` (huggingface_hub; HF_HOME, HF_HUB_OFFLINE and ``revision`` apply) and
        converts it once into the cache. ``weights=`` takes a release ``.pt`` or a `segface-jax
        convert` directory instead (then ``variant`` may be left out: it is read or inferred).
        ``dtype="bfloat16"`` computes in bfloat16 with float32 parameters. ``detector`` finds
        landmarks for LaPa inputs given without any (``segface_jax.detect``).
        """
        from segface_jax import hub

        if isinstance(variant, os.PathLike) or isinstance(variant, str) and (
                variant not in VARIANTS and (Path(variant).suffix in (".pt", ".pth")
                                             or os.sep in variant or Path(variant).exists())):
            raise CheckpointError(f"{variant} looks like a file: pass it as weights="
                                  f"{str(variant)!r} (the first argument is a variant name)")
        if compilation_cache:
            enable_compilation_cache()
        resolved = hub.resolve(variant, weights, revision, quiet=quiet)
        return cls(hub.load_weights(resolved, dtype, quiet), batch_size=batch_size,
                   notify=notify, detector=detector)

    # -- preparation -------------------------------------------------------------------------

    def _prepare(self, index: int, item: Any, points: Any) -> _ModelInput | ImageResult:
        source = str(item) if isinstance(item, str | os.PathLike) else f"<image {index}>"
        out = ImageResult(index, source)
        try:
            rgb = preprocess.to_rgb(item, source)
            if points is None and self.detector is not None and self.variant.needs_landmarks:
                with self._detector_lock:
                    points = self.detector(rgb)
                if points is None:
                    raise lmk.LandmarkError(f"{source}: the landmark detector found no face")
            five = None if points is None else lmk.to_five(points, f"landmarks of {source}")
        except (preprocess.ImageError, lmk.LandmarkError) as e:
            out.error, out.exception = str(e), e
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
        return _ModelInput(out, x, lm)

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
        return self.model(x, landmarks=lm)  # dispatched asynchronously

    def _finish(self, batch: list[_ModelInput], logits: jax.Array,
                with_probabilities: bool) -> Iterator[ImageResult]:
        host = np.asarray(logits)
        for i, p in enumerate(batch):
            out = p.item
            h, w = out.image.shape[:2]
            if out.crop_box is not None:
                x1, y1, x2, y2 = out.crop_box
                labels, probs = postprocess.labels_at_size(host[i], (y2 - y1, x2 - x1),
                                                           with_probabilities)
                out.labels, out.probabilities = postprocess.paste(labels, probs, out.crop_box,
                                                                  (h, w))
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
        batch: list[_ModelInput] = []
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
            queue: collections.deque[concurrent.futures.Future] = collections.deque()
            todo = iter(enumerate(zip(items, points)))
            lookahead = 2 * self.batch_size + self.num_threads
            while True:
                for i, (item, pts) in itertools.islice(todo, lookahead - len(queue)):
                    queue.append(pool.submit(self._prepare, i, item, pts))
                if queue:
                    prepared = queue.popleft().result()
                    if isinstance(prepared, ImageResult):
                        done[prepared.index] = prepared
                    else:
                        batch.append(prepared)
                if batch and (len(batch) == self.batch_size or not queue):
                    logits = self._run_batch(batch)  # async: the host goes on below
                    if pending is not None:
                        done.update((o.index, o) for o in self._finish(*pending,
                                                                        with_probabilities))
                    pending, batch = (batch, logits), []
                if not queue and pending is not None:
                    done.update((o.index, o) for o in self._finish(*pending, with_probabilities))
                    pending = None
                while next_index in done:
                    yield done.pop(next_index)
                    next_index += 1
                if not queue and not batch and pending is None:
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
            images=[r.image for r in results], sources=[r.source for r in results])

