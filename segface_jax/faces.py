"""Faces in the wild: each face cut out of a photo the way its model's training faces were, and
the model's answer put back into the photo.

A ``Frame`` places an R x R face crop in the photo as an affine map. Coordinates are continuous
pixel-corner coordinates (pixel (i, j) covers [j, j + 1] x [i, i + 1], its centre is
(j + 0.5, i + 0.5)); landmarks and boxes arrive in pixel-index units and gain 0.5 on the way in.
Each dataset's convention (``Dataset.face_frame``) builds the frame from 5 landmarks (eye
centres, nose tip, mouth corners; image-left eye first):

- ``celebahq``: the oriented square that CelebA-HQ was cut with (Karras et al., "Progressive
  Growing of GANs", ICLR 2018, appendix C; ``dataset_tool.py``'s ``create_celebahq`` in
  tkarras/progressive_growing_of_gans). With e = right eye - left eye and m = mouth centre -
  eye centre, the crop's x axis is e - rot90(m) normalised, its half-width
  max(2 |e|, 1.8 |m|), and its centre eye centre + 0.1 m. The recipe shrinks large faces by an
  integer factor (PIL's antialiasing resize, by floor(side / 2048)), samples the square at
  4096 px and resizes to 1024 px with that filter (upstream then resizes to R): we average
  blocks of floor(photo pixels per crop pixel) pixels, sample at 2R and average 2 x 2 blocks.
  Where the square leaves the photo, both fill it by reflection (the recipe then blurs that
  band; we do not). The recipe adds half a pixel twice between CelebA's integer landmarks and
  PIL's corner coordinates; we add it once, so our square sits at most one source pixel from
  the recipe's.
- ``lapa``: an axis-aligned square around the face, twice the size of the 512 px template
  canvas that the model's own alignment maps the face into (``align.STANDARD_FACE_POINTS``), so
  the tanh warp inside the model sees the face with context; the landmarks go to the model in
  crop pixels and the model maps its logits back onto the crop.
- ``helen``: upstream's Helen crop, a square 1.2 x the extent of the 68 landmarks, centred on
  them (``landmarks.helen_crop_box``). With only 5 points the 68-point box is estimated from
  approximate adult face proportions (no Helen data is at hand to fit them to): across, the jaw
  points span about 2.1 x the distance between the eye centres (a jaw about 130 mm wide against
  about 63 mm between the pupils), centred on the face's axis; down, from the brow tops, about
  0.4 x the eye-to-mouth distance above the eyes (25 mm against 65 mm), to the chin, about 0.7 x
  that distance below the mouth (45 mm).

``paste`` maps a crop's logits back with the inverse map (bilinear, like upstream's resize of
logits), and ``Composite`` joins every face of a photo as it arrives: a pixel belongs to the
face that labels it as a non-background class; where several do, to the one with the highest
non-background probability there. The instance map holds that face's number (1, 2, ...; 0 for
none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from segface_jax import postprocess
from segface_jax.align import STANDARD_FACE_POINTS


@dataclasses.dataclass(frozen=True)
class Face:
    """One face in a photo: a box (x1, y1, x2, y2), the detector's score (None for landmarks a
    user gave), and 5 landmarks, all in image pixels."""

    box: np.ndarray
    score: float | None
    landmarks: np.ndarray

    @classmethod
    def from_landmarks(cls, five: np.ndarray) -> Face:
        """A face known only by its 5 points: the box is their extent."""
        five = np.asarray(five, np.float32).reshape(5, 2)
        return cls(np.concatenate([five.min(0), five.max(0)]), None, five)


@dataclasses.dataclass(frozen=True)
class Frame:
    """An R x R crop's place in the photo: crop point (a, b) in [0, 1]^2 lies at photo point
    ``origin + a * across + b * down`` (pixel-corner coordinates)."""

    origin: np.ndarray  # (2,) the crop's top-left corner
    across: np.ndarray  # (2,) its top edge, left to right
    down: np.ndarray  # (2,) its left edge, top to bottom

    @classmethod
    def square(cls, centre: np.ndarray, half: float) -> Frame:
        """The axis-aligned square of half-side ``half`` around ``centre`` (corner coords)."""
        centre = np.asarray(centre, np.float64)
        return cls(centre - half, np.array([2.0 * half, 0.0]), np.array([0.0, 2.0 * half]))

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """Photo corner coordinates (..., 2) -> crop coordinates (a, b), (..., 2)."""
        linear = np.stack([self.across, self.down], 1)
        return (np.asarray(points, np.float64) - self.origin) @ np.linalg.inv(linear).T

    def crop_pixels(self, points: np.ndarray, resolution: int) -> np.ndarray:
        """Photo pixel positions (index units) -> pixel positions (index units) in the crop."""
        return (self.to_crop(np.asarray(points, np.float64) + 0.5) * resolution - 0.5).astype(
            np.float32)

    def corners(self) -> np.ndarray:
        """(4, 2) top-left, bottom-left, bottom-right, top-right, in corner coordinates."""
        o, a, d = self.origin, self.across, self.down
        return np.stack([o, o + d, o + a + d, o + a])

    def pixel_size(self, resolution: int) -> float:
        """Photo pixels per crop pixel (the larger of the two axes)."""
        return float(max(np.hypot(*self.across), np.hypot(*self.down))) / resolution


def _rot90(v: np.ndarray) -> np.ndarray:
    return np.array([-v[1], v[0]])


def celebahq_frame(five: np.ndarray) -> Frame:
    """CelebA-HQ's oriented square from 5 landmarks (pixel-index units; module docstring)."""
    lm = np.asarray(five, np.float64).reshape(5, 2) + 0.5
    eye_avg, mouth_avg = (lm[0] + lm[1]) / 2, (lm[3] + lm[4]) / 2
    eye_to_eye, eye_to_mouth = lm[1] - lm[0], mouth_avg - eye_avg
    x = eye_to_eye - _rot90(eye_to_mouth)
    x = x / np.hypot(*x) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = _rot90(x)
    c = eye_avg + eye_to_mouth * 0.1
    return Frame(c - x - y, 2 * x, 2 * y)


def lapa_frame(five: np.ndarray) -> Frame:
    """A square twice the LaPa template canvas that the 5 landmarks map into (docstring)."""
    lm = np.asarray(five, np.float64).reshape(5, 2) + 0.5
    template = (STANDARD_FACE_POINTS.astype(np.float64) + 1) * 256  # on the 512 canvas
    # scale of the template onto the landmarks: the ratio of their RMS spreads
    t, p = template - template.mean(0), lm - lm.mean(0)
    scale = np.sqrt((p ** 2).sum() / (t ** 2).sum())
    centre = lm.mean(0) + (np.array([256.0, 256.0]) - template.mean(0)) * scale
    return Frame.square(centre, 512 * scale)


def helen_frame(five: np.ndarray) -> Frame:
    """Upstream's Helen square (1.2 x the 68-point extent) estimated from 5 landmarks."""
    lm = np.asarray(five, np.float64).reshape(5, 2) + 0.5
    eye_avg, mouth_avg = (lm[0] + lm[1]) / 2, (lm[3] + lm[4]) / 2
    eye_dist, eye_mouth = np.hypot(*(lm[1] - lm[0])), np.hypot(*(mouth_avg - eye_avg))
    width = 2.1 * eye_dist
    top, bottom = -0.4 * eye_mouth, 1.7 * eye_mouth  # along the eye-to-mouth line
    down = (mouth_avg - eye_avg) / max(eye_mouth, 1e-6)
    centre = eye_avg + down * (top + bottom) / 2
    return Frame.square(centre, 1.2 * max(width, bottom - top) / 2)


def helen_frame_68(points68: np.ndarray) -> Frame:
    """Upstream's Helen square from 68 landmarks (``landmarks.helen_crop_box`` before it clips
    the square to the image: here reflection fills what lies outside)."""
    p = np.asarray(points68, np.float64).reshape(-1, 2)
    lo, hi = p.min(0), p.max(0)
    wh = hi - lo + 1
    size = int(np.max(wh) * 1.2)
    top_left = (lo + wh / 2).astype(np.int64) - size // 2
    return Frame(top_left.astype(np.float64), np.array([size, 0.0]), np.array([0.0, size]))


FRAMES: dict[str, Callable[[np.ndarray], Frame]] = {
    "celebahq": celebahq_frame, "lapa": lapa_frame, "helen": helen_frame}


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Reflect integer indices into [0, size) (numpy's 'reflect' padding: edge not repeated)."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


def _shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks; the last rows and columns that do not fill a
    block are dropped (at most ``factor`` - 1 pixels at the bottom and right edges)."""
    h, w = (s // factor * factor for s in image.shape[:2])
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, -1)
    return blocks.mean((1, 3))


def bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample (H, W, C) at continuous pixel-index positions (..., 2), reflecting outside
    (weights in the image's dtype)."""
    h, w = image.shape[:2]
    x, y = xy[..., 0], xy[..., 1]
    x0, y0 = np.floor(x), np.floor(y)
    fx = (x - x0)[..., None].astype(image.dtype)
    fy = (y - y0)[..., None].astype(image.dtype)
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    xs = (_reflect(x0, w), _reflect(x0 + 1, w))
    ys = (_reflect(y0, h), _reflect(y0 + 1, h))
    top = image[ys[0], xs[0]] * (1 - fx) + image[ys[0], xs[1]] * fx
    bottom = image[ys[1], xs[0]] * (1 - fx) + image[ys[1], xs[1]] * fx
    return top * (1 - fy) + bottom * fy


class FrameError(ValueError):
    """Landmarks that give no usable crop: coincident, not finite, or far outside the photo."""


def check(frame: Frame, image_hw: tuple[int, int]) -> None:
    """Raise ``FrameError`` unless ``frame`` is finite, not degenerate and overlaps the photo."""
    h, w = image_hw
    corners = frame.corners()
    if not np.isfinite(corners).all():
        raise FrameError("the landmarks give no finite face crop")
    if abs(np.linalg.det(np.stack([frame.across, frame.down]))) < 1.0:
        raise FrameError("the landmarks (nearly) coincide: the face crop has no area")
    lo, hi = corners.min(0), corners.max(0)
    if (hi <= 0).any() or lo[0] >= w or lo[1] >= h:
        raise FrameError(f"the face crop lies outside the {w}x{h} image")


def _span(lo: float, hi: float, n: int, step: int) -> tuple[int, int]:
    """The pixels [first, end) of an image side of ``n`` that sampling between ``lo`` and
    ``hi`` (corner coordinates) reads, reflections across the image's edges included, with a
    margin, the start on a multiple of ``step`` (the shrink's block grid)."""
    first, end = int(np.floor(lo)) - 2 * step, int(np.ceil(hi)) + 2 * step
    if first < 0:  # reflected back in across the low edge
        end = max(end, -first + 2 * step)
    if end > n:  # and across the high edge
        first = min(first, 2 * n - end - 2 * step)
    return max(0, first) // step * step, min(n, end)


def crop(image: np.ndarray, frame: Frame, resolution: int, whole: bool = False) -> np.ndarray:
    """The (R, R, 3) float32 crop (0-255) of an (H, W, 3) photo (module docstring; pass the
    photo as float32 to spare a conversion per face). Only the part of the photo the crop
    reads is shrunk and sampled (``whole=True``: all of it; the same numbers)."""
    source = np.asarray(image, np.float32)
    h, w = source.shape[:2]
    # a large face: box-filter the photo first (never below 2 x 2 pixels)
    shrink = max(1, min(int(np.floor(frame.pixel_size(resolution))), h // 2, w // 2))
    corners = frame.corners()
    (x0, x1), (y0, y1) = ((0, w), (0, h)) if whole else (
        _span(corners[:, k].min(), corners[:, k].max(), n, shrink)
        for k, n in ((0, w), (1, h)))
    if not whole and (x0, x1, y0, y1) != (0, w, 0, h) and (
            x1 - x0 < 2 * shrink or y1 - y0 < 2 * shrink or _reaches_twice(corners, w, h)):
        return crop(image, frame, resolution, whole=True)
    source = source[y0:y1, x0:x1]
    if shrink > 1:
        source = _shrink(source, shrink)
    n = 2 * resolution  # sampled at 2R, then 2 x 2 blocks averaged
    ab = (np.arange(n, dtype=np.float64) + 0.5) / n
    a, b = np.meshgrid(ab, ab, indexing="xy")
    points = frame.origin + a[..., None] * frame.across + b[..., None] * frame.down
    sampled = bilinear(source, (points - [x0, y0]) / shrink - 0.5)
    return sampled.reshape(resolution, 2, resolution, 2, 3).mean((1, 3)).astype(np.float32)


def _reaches_twice(corners: np.ndarray, w: int, h: int) -> bool:
    """Whether the crop reaches further outside the photo than the photo is large (where
    reflections fold more than once: only the whole photo gives them right)."""
    lo, hi = corners.min(0), corners.max(0)
    return bool((lo < -np.array([w, h])).any() or (hi > 2 * np.array([w, h])).any())


def footprint(frame: Frame, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the photo pixels inside the frame's bounding box (may be empty)."""
    corners = frame.corners()
    h, w = image_hw
    x0, y0 = (max(0, int(np.floor(v))) for v in corners.min(0))
    x1 = min(w, int(np.ceil(corners[:, 0].max())))
    y1 = min(h, int(np.ceil(corners[:, 1].max())))
    return y0, max(y0, y1), x0, max(x0, x1)


def paste(logits: np.ndarray, frame: Frame, image_hw: tuple[int, int],
          rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Map an (R, R, C) crop's logits onto the photo pixels of its footprint (or of ``rows``
    = (first, end) of it): (h, w, C) float32 logits, (h, w) where the crop covers the pixel,
    and the window (y0, y1, x0, x1) they fill."""
    r = logits.shape[0]
    y0, y1, x0, x1 = footprint(frame, image_hw)
    if rows is not None:
        y0, y1 = max(y0, rows[0]), min(y1, rows[1])
    ys, xs = np.mgrid[y0:max(y0, y1), x0:x1]
    ab = frame.to_crop(np.stack([xs + 0.5, ys + 0.5], -1))
    covered = ((ab >= 0) & (ab <= 1)).all(-1)
    # crop pixel-index positions, clamped at the crop's edge (upstream's resize clamps too)
    uv = np.clip(ab * r - 0.5, 0, r - 1)
    values = bilinear(np.asarray(logits, np.float32), uv)
    return values, covered, (y0, max(y0, y1), x0, x1)


class Composite:
    """The faces of one photo joined as their logits arrive (the rule in the module
    docstring), pasted in bands of rows so memory stays a few bands of the photo:
    ``labels`` (H, W) uint8 classes, ``instances`` (H, W) uint8 face numbers (0 = none) and,
    if asked, ``probabilities`` (H, W, C): the owner's where a face claims the pixel, else the
    surest covering face's (lowest background probability), else background 1."""

    MAX_FACES = 255  # the instance map is uint8
    ROWS = 64  # rows pasted at a time

    def __init__(self, image_hw: tuple[int, int], num_classes: int,
                 with_probabilities: bool = False):
        self.hw = image_hw
        self.labels = np.zeros(image_hw, np.uint8)
        self.instances = np.zeros(image_hw, np.uint8)
        self._claim = np.zeros(image_hw, np.float32)  # the owner's non-background probability
        self.probabilities = None
        if with_probabilities:
            self.probabilities = postprocess.background_probabilities(image_hw, num_classes)

    def add(self, number: int, logits: np.ndarray, frame: Frame) -> None:
        """Paste face ``number`` (1-255): its (R, R, C) crop logits and where the crop lies."""
        if not 1 <= number <= self.MAX_FACES:
            raise ValueError(f"face numbers run 1 to {self.MAX_FACES}, not {number}")
        y0, y1, _, _ = footprint(frame, self.hw)
        for start in range(y0, y1, self.ROWS):
            values, covered, (a, b, x0, x1) = paste(logits, frame, self.hw,
                                                    (start, start + self.ROWS))
            probs = postprocess.softmax(values)
            label = values.argmax(-1)
            claim = np.where(covered, 1.0 - probs[..., 0], 0.0)
            window = (slice(a, b), slice(x0, x1))
            wins = covered & (label != 0) & (claim > self._claim[window])
            if self.probabilities is not None:
                owned = self.instances[window] != 0
                # unclaimed pixels show the surest covering face's (soft) probabilities
                softer = covered & ~owned & ~wins & (
                    probs[..., 0] < self.probabilities[window][..., 0])
                self.probabilities[window][softer | wins] = probs[softer | wins]
            self._claim[window][wins] = claim[wins]
            self.labels[window][wins] = label[wins]
            self.instances[window][wins] = number


def draw(image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """(H, W, 3) uint8 copy of ``image`` with each face's box, number and 5 landmarks drawn."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.asarray(image, np.uint8))
    pen = ImageDraw.Draw(im)
    width = max(1, round(max(im.size) / 400))
    for k, face in enumerate(faces, 1):
        x1, y1, x2, y2 = (float(v) for v in face.box)
        pen.rectangle((x1, y1, x2, y2), outline=(255, 255, 255), width=width)
        label = f"{k}" if face.score is None else f"{k}: {face.score:.3f}"
        box = pen.textbbox((x1 + 2, y1 + 2), label)
        pen.rectangle(box, fill=(0, 0, 0))
        pen.text((x1 + 2, y1 + 2), label, fill=(255, 255, 255))
        r = 1 + width
        for x, y in np.asarray(face.landmarks, np.float32):
            pen.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 0), outline=(0, 0, 0))
    return np.asarray(im)
