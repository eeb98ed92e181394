"""Sample inputs that ship with a dependency: scikit-image's ``astronaut`` photo."""

from __future__ import annotations

import numpy as np

from segface_jax import preprocess

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


def astronaut() -> np.ndarray:
    """scikit-image's astronaut photo, (512, 512, 3) uint8 RGB (needs scikit-image)."""
    try:
        from skimage import data
    except ModuleNotFoundError:
        raise preprocess.ImageError("the astronaut sample needs scikit-image: "
                                    "pip install scikit-image") from None
    return data.astronaut()
