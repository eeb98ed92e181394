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
  max(2 |e|, 1.8 |m|), and its centre eye centre + 0.1 m. The recipe samples the square at
  4096 px after shrinking large faces by an integer box filter, and resizes to 1024 px with an
  antialiasing filter (upstream then resizes to R): we shrink by the integer part of the photo
  pixels per crop pixel, sample at 2R and average 2 x 2 blocks. Where the square leaves the
  photo, both fill it by reflection (the recipe then blurs that band; we do not). The recipe
  adds half a pixel twice between CelebA's integer landmarks and PIL's corner coordinates; we
  add it once, so our square sits at most one source pixel from the recipe's.
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
logits), and ``compose`` joins every face of a photo: a pixel belongs to the face that labels it
as a non-background class; where several do, to the one with the highest non-background
probability there. The instance map holds that face's number (1, 2, ...; 0 for none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

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

    @property
    def matrix(self) -> np.ndarray:
        """(2, 3) affine map from (a, b, 1) to photo corner coordinates."""
        return np.stack([self.across, self.down, self.origin], 1).astype(np.float64)

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
    # least-squares scale of the similarity taking the template onto the landmarks
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
    """Average ``factor`` x ``factor`` blocks (the edge rows/columns that do not fill a block
    are dropped, as PIL's box reduce would shade them)."""
    h, w = (s // factor * factor for s in image.shape[:2])
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, -1)
    return blocks.mean((1, 3))


def bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample (H, W, C) at continuous pixel-index positions (..., 2), reflecting outside."""
    h, w = image.shape[:2]
    x, y = xy[..., 0], xy[..., 1]
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    xs = (_reflect(x0, w), _reflect(x0 + 1, w))
    ys = (_reflect(y0, h), _reflect(y0 + 1, h))
    top = image[ys[0], xs[0]] * (1 - fx) + image[ys[0], xs[1]] * fx
    bottom = image[ys[1], xs[0]] * (1 - fx) + image[ys[1], xs[1]] * fx
    return top * (1 - fy) + bottom * fy


def crop(image: np.ndarray, frame: Frame, resolution: int) -> np.ndarray:
    """The (R, R, 3) float32 crop (0-255) of an (H, W, 3) photo (module docstring)."""
    source = np.asarray(image, np.float32)
    shrink = int(np.floor(frame.pixel_size(resolution)))
    if shrink > 1:  # a large face: box-filter the photo first, like the recipe
        source = _shrink(source, shrink)
    n = 2 * resolution  # sampled at 2R, then 2 x 2 blocks averaged
    ab = (np.arange(n, dtype=np.float64) + 0.5) / n
    a, b = np.meshgrid(ab, ab, indexing="xy")
    points = frame.origin + a[..., None] * frame.across + b[..., None] * frame.down
    sampled = bilinear(source, points / max(shrink, 1) - 0.5)
    return sampled.reshape(resolution, 2, resolution, 2, 3).mean((1, 3)).astype(np.float32)


@dataclasses.dataclass
class Pasted:
    """One face's logits mapped into the photo: the footprint (y0, y1, x0, x1) and, inside it,
    the logits (h, w, C) and where the crop covers the pixel (h, w)."""

    window: tuple[int, int, int, int]
    logits: np.ndarray
    covered: np.ndarray


def paste(logits: np.ndarray, frame: Frame, image_hw: tuple[int, int]) -> Pasted:
    """Map an (R, R, C) crop's logits onto the photo pixels that the crop covers."""
    r = logits.shape[0]
    corners = frame.corners()
    h, w = image_hw
    x0, y0 = (max(0, int(np.floor(v))) for v in corners.min(0))
    x1, y1 = min(w, int(np.ceil(corners[:, 0].max()))), min(h, int(np.ceil(corners[:, 1].max())))
    if x1 <= x0 or y1 <= y0:
        return Pasted((0, 0, 0, 0), np.zeros((0, 0, logits.shape[-1]), np.float32),
                      np.zeros((0, 0), bool))
    ys, xs = np.mgrid[y0:y1, x0:x1]
    ab = frame.to_crop(np.stack([xs + 0.5, ys + 0.5], -1))
    covered = ((ab >= 0) & (ab <= 1)).all(-1)
    # crop pixel-index positions, clamped at the crop's edge (upstream's resize clamps too)
    uv = np.clip(ab * r - 0.5, 0, r - 1)
    values = bilinear(np.asarray(logits, np.float32), uv).astype(np.float32)
    return Pasted((y0, y1, x0, x1), values, covered)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def compose(pasted: Sequence[Pasted], image_hw: tuple[int, int], num_classes: int,
            with_probabilities: bool = False
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Join every face's pasted logits: (H, W) uint8 classes, (H, W) uint8 face numbers (0 =
    none) and, if asked, (H, W, C) float32 probabilities (background 1 where no face is)."""
    if len(pasted) > 255:
        raise ValueError(f"{len(pasted)} faces in one photo; the instance map holds 255")
    labels = np.zeros(image_hw, np.uint8)
    instances = np.zeros(image_hw, np.uint8)
    best = np.zeros(image_hw, np.float32)  # the owner's non-background probability
    probs = None
    if with_probabilities:
        probs = np.zeros((*image_hw, num_classes), np.float32)
        probs[..., 0] = 1.0
    for k, p in enumerate(pasted):
        y0, y1, x0, x1 = p.window
        if y1 <= y0:
            continue
        face_probs = _softmax(p.logits)
        claim = np.where(p.covered, 1.0 - face_probs[..., 0], 0.0)
        wins = p.covered & (p.logits.argmax(-1) != 0) & (claim > best[y0:y1, x0:x1])
        best[y0:y1, x0:x1][wins] = claim[wins]
        labels[y0:y1, x0:x1][wins] = p.logits.argmax(-1)[wins]
        instances[y0:y1, x0:x1][wins] = k + 1
        if probs is not None:
            probs[y0:y1, x0:x1][wins] = face_probs[wins]
    return labels, instances, probs


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
