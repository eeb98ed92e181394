"""Image preparation shared by the CLI, the parity check and (later) the data pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class ImageError(Exception):
    """An input image that cannot be read, with the file named in the message."""


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any image file PIL reads (grayscale/RGBA/16-bit converted)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, np.float64)
                im = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of an (H, W, 3) uint8 image to size x size, as upstream's data pipeline."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def normalize(image: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> float32 ImageNet mean/std normalised, the models' input."""
    return ((image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def overlay(image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 blend of an image and its class map coloured with ``palette``."""
    colours = np.asarray(palette, np.float32)[labels]
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
