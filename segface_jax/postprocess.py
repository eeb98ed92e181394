"""From model logits to results at each image's own size: resize, argmax, probabilities, areas.

Runs on the host in numpy: output sizes differ per image, and compiling a device program per
size would recompile for every new photo. Work is done in row chunks so a huge image never
needs a full (H, W, C) float32 array unless its probabilities are asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_CHUNK_ROWS = 256


def bilinear_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 for torch's bilinear resize along one axis.

    ``interpolate(mode='bilinear', align_corners=False)`` without antialias: source coordinate
    (dst + 0.5) * in / out - 0.5, clamped at 0. Computed as torch's CPU kernel does: a float32
    scale and one fused multiply-add rounded to float32 (emulated exactly in float64), so the
    weights are torch's to the bit; float64 coordinates would move them by up to 1 ulp of the
    source coordinate, i.e. ~1e-5 of a logit step at 224 px.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (scale * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_rows(logits: np.ndarray, rows: slice, out_hw: tuple[int, int],
                taps: tuple | None = None) -> np.ndarray:
    """Rows ``rows`` of the bilinear resize of (h, w, C) ``logits`` to ``out_hw``, float32."""
    h, w, _ = logits.shape
    y0, y1, wy = taps[0] if taps else bilinear_taps(out_hw[0], h)
    x0, x1, wx = taps[1] if taps else bilinear_taps(out_hw[1], w)
    y0, y1, wy = y0[rows], y1[rows], wy[rows, None, None]
    cols = logits[y0] * (1 - wy) + logits[y1] * wy  # (rows, w, C)
    wx = wx[None, :, None]
    return cols[:, x0] * (1 - wx) + cols[:, x1] * wx


def resize_logits(logits: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(h, w, C) -> (H, W, C) float32, torch's bilinear (align_corners=False, no antialias)."""
    return resize_rows(np.asarray(logits, np.float32), slice(None), out_hw)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32, stable."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def labels_at_size(logits: np.ndarray, out_hw: tuple[int, int],
                   with_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(h, w, C) logits -> (H, W) uint8 argmax of the resized logits [, (H, W, C) softmax]."""
    logits = np.asarray(logits, np.float32)
    h, w, c = logits.shape
    taps = (bilinear_taps(out_hw[0], h), bilinear_taps(out_hw[1], w))
    labels = np.empty(out_hw, np.uint8)
    probs = np.empty((*out_hw, c), np.float32) if with_probabilities else None
    for start in range(0, out_hw[0], _CHUNK_ROWS):
        rows = slice(start, min(start + _CHUNK_ROWS, out_hw[0]))
        chunk = resize_rows(logits, rows, out_hw, taps)
        labels[rows] = chunk.argmax(-1)
        if probs is not None:
            probs[rows] = softmax(chunk)
    return labels, probs


def paste(labels: np.ndarray, probs: np.ndarray | None, box: tuple[int, int, int, int],
          image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Put crop results into a full image: outside the box is background (class 0, p = 1)."""
    x1, y1, x2, y2 = box
    full = np.zeros(image_hw, np.uint8)
    full[y1:y2, x1:x2] = labels
    if probs is None:
        return full, None
    full_p = background_probabilities(image_hw, probs.shape[-1])
    full_p[y1:y2, x1:x2] = probs
    return full, full_p


def class_areas(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """{class: {"pixels": n, "fraction": n / all}} for every class, absent ones with 0."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    total = max(int(labels.size), 1)
    return {name: {"pixels": int(n), "fraction": round(int(n) / total, 6)}
            for name, n in zip(class_names, counts)}


def background_probabilities(image_hw: tuple[int, int], num_classes: int) -> np.ndarray:
    """(H, W, C) float32 probabilities of an image with nothing in it: background 1."""
    probs = np.zeros((*image_hw, num_classes), np.float32)
    probs[..., 0] = 1.0
    return probs
