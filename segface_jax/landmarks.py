"""Face landmarks: the 5 points the LaPa models align with, from the 106 / 68 / 5-point formats.

The five points are, in order: left-eye centre, right-eye centre, nose tip, left and right mouth
corners, as pixel (x, y). The reductions are upstream's data loaders': LaPa's 106 points
give mean(74, 104), mean(83, 105), 54, 84, 90; the 68-point (iBUG / Helen) layout gives
mean(36..41), mean(42..47), 30, 48, 54. Helen models crop the face box of the 68 points.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_COUNTS = (5, 68, 106)


class LandmarkError(ValueError):
    """Landmarks that cannot be used, with the file or image named in the message."""


def to_five(points: Any, where: str = "landmarks") -> np.ndarray:
    """(5 | 68 | 106, 2) pixel points -> (5, 2) float32 eye centres, nose tip, mouth corners."""
    p = np.asarray(points, np.float64)
    if p.ndim == 1 and p.size in tuple(2 * n for n in SUPPORTED_COUNTS):
        p = p.reshape(-1, 2)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] not in SUPPORTED_COUNTS:
        raise LandmarkError(f"{where}: expected 5, 68 or 106 (x, y) points, got an array of "
                            f"shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise LandmarkError(f"{where}: landmarks contain NaN or infinite values")
    if p.shape[0] == 106:
        five = [(p[74] + p[104]) / 2, (p[83] + p[105]) / 2, p[54], p[84], p[90]]
    elif p.shape[0] == 68:
        five = [p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]]
    else:
        five = list(p)
    return np.asarray(five, np.float32)


def degenerate(five: np.ndarray, image_hw: tuple[int, int]) -> str | None:
    """Why 5 points cannot describe a face in an image of ``image_hw``, or None: the points
    (nearly) coincide, or one lies further outside the image than the image is large."""
    five = np.asarray(five, np.float64).reshape(5, 2)
    h, w = image_hw
    if np.ptp(five, axis=0).max() < 2.0:
        return "the 5 landmarks (nearly) coincide"
    x, y = five[:, 0], five[:, 1]
    if (x < -w).any() or (x > 2 * w).any() or (y < -h).any() or (y > 2 * h).any():
        return f"landmarks lie far outside the {w}x{h} image (are they in another image's pixels?)"
    return None


def helen_crop_box(points68: Any, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of upstream's Helen crop: a square 1.2 x the 68 points' extent.

    The square is centred on the landmark box and clipped to the image (so a face at the border
    gives a non-square crop, which the resize to R then stretches, as upstream does).
    """
    p = np.asarray(points68, np.float32).reshape(-1, 2)
    lo, hi = p.min(axis=0), p.max(axis=0)
    wh = hi - lo + 1
    center = (lo + wh / 2).astype(np.int32)
    size = int(np.max(wh) * 1.2)
    x1, y1 = (int(c) for c in center - size // 2)
    x2, y2 = x1 + size, y1 + size
    h, w = image_hw
    return max(0, x1), max(0, y1), min(w, x2), min(h, y2)


def read_points_txt(path: str | os.PathLike) -> np.ndarray:
    """(K, 2) points from a text file: LaPa's format (first number K, then K lines ``x y``) or
    plain ``x y`` lines (commas allowed)."""
    path = Path(path)
    try:
        numbers = [float(t) for t in path.read_text().replace(",", " ").split()]
    except FileNotFoundError:
        raise LandmarkError(f"{path}: no such landmark file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LandmarkError(f"{path}: not a landmark text file ({e})") from None
    if len(numbers) % 2 == 1 and numbers and int(numbers[0]) == (len(numbers) - 1) // 2:
        numbers = numbers[1:]  # LaPa: the point count comes first
    if len(numbers) // 2 not in SUPPORTED_COUNTS or len(numbers) % 2:
        raise LandmarkError(f"{path}: expected 5, 68 or 106 'x y' points, found {len(numbers)} "
                            "numbers")
    return np.asarray(numbers, np.float32).reshape(-1, 2)


def read_landmark_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Landmarks for several images: a JSON object ``{"image name or path": [[x, y], ...]}``
    or a folder of ``<image stem>.txt`` files (LaPa format). Keys are returned as written
    (folder: the stems)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise LandmarkError(f"{path}: folder holds no <image stem>.txt landmark files")
        return {f.stem: read_points_txt(f) for f in files}
    if path.suffix.lower() == ".txt":
        return {"": read_points_txt(path)}  # one image's points
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LandmarkError(f"{path}: no such landmark file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LandmarkError(f"{path}: not a JSON landmark file ({e}); expected "
                            '{"image.jpg": [[x, y], ...], ...}') from None
    if not isinstance(data, Mapping):
        raise LandmarkError(f'{path}: expected a JSON object {{"image.jpg": [[x, y], ...]}}')
    out = {}
    for key, points in data.items():
        try:
            out[str(key)] = np.asarray(points, np.float32)
        except (TypeError, ValueError):
            raise LandmarkError(f"{path}: entry {key!r} is not a list of [x, y] points") from None
    return out


def lookup(table: Mapping[str, np.ndarray], image_path: str | os.PathLike) -> np.ndarray | None:
    """The points of ``image_path`` in a ``read_landmark_file`` table: by full path, file name
    or stem, in that order; a single-image table (a ``.txt``) matches anything."""
    p = Path(image_path)
    for key in (str(image_path), str(p.resolve()), p.name, p.stem, ""):
        if key in table:
            return table[key]
    return None


def mirror_landmarks(points: np.ndarray, resolution: int) -> np.ndarray:
    """(..., 5, 2) pixel landmarks of an R-wide image -> those of its mirror image: x becomes
    R - 1 - x (pixel centres at integers), and left and right eyes and mouth corners swap."""
    flipped = np.asarray(points, np.float32).copy()
    flipped[..., 0] = resolution - 1 - flipped[..., 0]
    return flipped[..., [1, 0, 2, 4, 3], :]
