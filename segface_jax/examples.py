"""Sample inputs that ship with a dependency: scikit-image's ``astronaut`` photo."""

from __future__ import annotations

import numpy as np

from segface_jax import preprocess
from segface_jax.landmarks import mirror_landmarks

# scikit-image's ``astronaut`` (512 x 512): a square crop around the face and its 5 landmarks
# (eye centres, nose tip, mouth corners) in full-image pixels, read off the photo by eye.
ASTRONAUT_FACE_BOX = (94, 0, 350, 256)
ASTRONAUT_LANDMARKS = np.array(
    [[201.5, 101.5], [248.0, 103.0], [223.0, 125.0], [205.5, 141.5], [242.0, 142.5]], np.float32)


def sample_face(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Astronaut face crop at ``resolution``: (uint8 RGB, normalised NHWC, landmarks (1,5,2))."""
    x0, y0, x1, y1 = ASTRONAUT_FACE_BOX
    crop = astronaut()[y0:y1, x0:x1]
    scale = resolution / (x1 - x0)
    rgb = preprocess.resize_rgb(crop, resolution)
    lm = (ASTRONAUT_LANDMARKS - np.array([x0, y0], np.float32)) * scale
    return rgb, preprocess.normalize(rgb)[None], lm[None].astype(np.float32)


def sample_faces(resolution: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Three faces at ``resolution`` with their 5 landmarks, as (name, uint8 RGB, (5, 2)): the
    astronaut's crop, its mirror image and a crop of the photo rotated by 20 degrees about the
    face (``parity``'s default input set)."""
    rgb, _, lm = sample_face(resolution)
    lm = lm[0]
    # mirrored: x -> (r - 1) - x with pixel centres at integers, and left and right swapped
    mirrored = mirror_landmarks(lm, resolution)
    return [("astronaut", rgb, lm), ("astronaut, mirrored", rgb[:, ::-1].copy(), mirrored),
            ("astronaut, rotated 20 degrees", *_rotated_face(resolution, 20.0))]


def _rotated_face(resolution: int, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The photo turned counter-clockwise by ``degrees`` about the face box's centre, then
    cropped to the box: (uint8 RGB at ``resolution``, the 5 landmarks moved with it)."""
    from PIL import Image

    x0, y0, x1, y1 = ASTRONAUT_FACE_BOX
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    turned = np.asarray(Image.fromarray(astronaut()).rotate(
        degrees, resample=Image.Resampling.BILINEAR, center=(cx, cy)))
    rgb = preprocess.resize_rgb(turned[y0:y1, x0:x1], resolution)
    # counter-clockwise on screen (y down): a point at (dx, dy) from the centre goes to
    # (dx cos t + dy sin t, -dx sin t + dy cos t)
    t = np.deg2rad(degrees)
    d = ASTRONAUT_LANDMARKS - np.array([cx, cy], np.float32)
    moved = np.stack([d[:, 0] * np.cos(t) + d[:, 1] * np.sin(t),
                      -d[:, 0] * np.sin(t) + d[:, 1] * np.cos(t)], -1) + [cx - x0, cy - y0]
    return rgb, (moved * resolution / (x1 - x0)).astype(np.float32)


def astronaut() -> np.ndarray:
    """scikit-image's astronaut photo, (512, 512, 3) uint8 RGB (needs scikit-image)."""
    try:
        from skimage import data
    except ModuleNotFoundError:
        raise preprocess.ImageError("the astronaut sample needs scikit-image: "
                                    "pip install scikit-image") from None
    return data.astronaut()


# (left, top, scale, degrees counter-clockwise, mirrored) of each face pasted into the group
# photo, on a 640 x 480 canvas whose own face sits at about (226, 58)-(335, 161)
_PASTED_FACES = [(20, 260, 0.75, 0, True), (440, 30, 0.6, 20, False), (430, 270, 0.9, -25, True),
                 (230, 320, 0.5, 0, False), (20, 40, 0.55, 30, False)]


def group_photo(faces: int = 4) -> np.ndarray:
    """A (480, 640, 3) uint8 composite with ``faces`` faces (1-6): the astronaut photo resized,
    plus copies of its head pasted at other scales, positions and in-plane rotations, some
    mirrored, each blended in through an elliptical mask (the detector's multi-face input)."""
    from PIL import Image, ImageDraw

    if not 1 <= faces <= len(_PASTED_FACES) + 1:
        raise ValueError(f"group_photo makes 1 to {len(_PASTED_FACES) + 1} faces, not {faces}")
    photo = Image.fromarray(astronaut())
    canvas = photo.resize((640, 480), Image.Resampling.BILINEAR)
    head = photo.crop((150, 20, 300, 210))  # 150 x 190 around the face
    mask = Image.new("L", head.size, 0)
    ImageDraw.Draw(mask).ellipse((8, 4, head.size[0] - 8, head.size[1] - 4), fill=255)
    for left, top, scale, degrees, mirrored in _PASTED_FACES[:faces - 1]:
        size = (round(head.size[0] * scale), round(head.size[1] * scale))
        face, face_mask = (im.resize(size, Image.Resampling.BILINEAR) for im in (head, mask))
        if mirrored:
            face, face_mask = (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                               for im in (face, face_mask))
        if degrees:
            face = face.rotate(degrees, resample=Image.Resampling.BILINEAR)
            face_mask = face_mask.rotate(degrees, resample=Image.Resampling.BILINEAR)
        canvas.paste(face, (left, top), face_mask)
    return np.asarray(canvas)
