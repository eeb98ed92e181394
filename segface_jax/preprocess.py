"""Image preparation shared by the parser, the CLI, the parity check and the data pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What a folder of pictures is read for (predict, parity --images): PIL reads them all.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                  ".pgm", ".jfif"}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def is_image_file(path: Path) -> bool:
    """Whether a folder entry is a picture to read: a visible file with an image suffix."""
    return (path.is_file() and not path.name.startswith(".")
            and path.suffix.lower() in IMAGE_SUFFIXES)


class ImageError(Exception):
    """An input image that cannot be read, with the file named in the message."""


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    # Any PIL mode -> (H, W, 3) uint8: 16-bit scaled to 8, alpha composited onto black.
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, np.float64)
        if im.mode == "F":
            arr = arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0)
        elif im.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 0..65535 -> 0..255
        im = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, im)
    return np.asarray(im.convert("RGB"))


def upright_rgb(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image with its EXIF orientation applied (as OpenCV reads)."""
    return _pil_to_rgb(ImageOps.exif_transpose(im))


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any image file PIL reads, upright (EXIF orientation applied).

    Grayscale, palette, CMYK and 16-bit images are converted; alpha is composited onto black.
    Truncated files and images beyond PIL's decompression-bomb limit raise ``ImageError``.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return upright_rgb(im)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too large to read safely ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None


def to_rgb(item: Any, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB from a file path, a PIL image or a numpy array.

    Arrays may be (H, W) grayscale or (H, W, 1 | 3 | 4) channels-last; uint8, uint16 (scaled
    to 8 bits), or float in [0, 1]. Anything else raises ``ImageError`` naming ``name``.
    """
    if isinstance(item, str | os.PathLike):
        return read_rgb(item)
    if isinstance(item, Image.Image):
        return _pil_to_rgb(item)
    try:
        arr = np.asarray(item)
    except Exception:  # noqa: BLE001 - arbitrary objects
        arr = None
    if arr is None or arr.dtype == object or arr.ndim not in (2, 3) or (
            arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) or min(arr.shape[:2]) < 1:
        what = (f"a {type(item).__name__}" if arr is None or arr.dtype == object
                else f"an array of shape {arr.shape}")
        raise ImageError(f"{name}: expected a path, a PIL image or an (H, W[, 1|3|4]) array, "
                         f"got {what}")
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ImageError(f"{name}: float image contains NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise ImageError(f"{name}: float images must hold values in [0, 1], got "
                             f"[{arr.min():.3g}, {arr.max():.3g}]; pass uint8 for 0..255")
        arr = (arr * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {arr.dtype}; use uint8, uint16 or "
                         "float in [0, 1]")
    if arr.ndim == 2 or arr.shape[2] == 1:
        arr = np.repeat(arr.reshape(*arr.shape[:2], 1), 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[..., 3:].astype(np.float32) / 255.0
        arr = (arr[..., :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of an (H, W, 3) uint8 image to size x size, as upstream's data pipeline."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def normalize(image: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> float32 ImageNet mean/std normalised, the models' input."""
    return ((image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def overlay(image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 blend of an image and its class colours; background (class 0) untinted."""
    colours = np.asarray(palette, np.uint8)[labels]
    mixed = np.asarray(Image.blend(Image.fromarray(image), Image.fromarray(colours), alpha))
    return np.where((labels == 0)[..., None], image, mixed)
