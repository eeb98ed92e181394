"""LaPa face alignment in pure JAX: 5-point similarity, tanh-warp grids and grid sampling.

The model warps a face so its five landmarks land on a standard template, parses the warped
image, and maps the logits back with the inverse warp. Conventions follow the PyTorch
release (which takes them from FaRL/facer): grids are built over integer pixel coordinates
(x, y), normalised by the image width/height, and sampled with ``grid_sample`` semantics
(``align_corners=False``, zero padding). All functions are batched and jit-able.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

WARP_FACTOR = 0.8
# Clamp applied before arctanh when building the image warp grid (upstream's "safe arctanh").
_ARCTANH_EPS = 1e-3
# Standard face points (eye centres, nose tip, mouth corners) on a 512 canvas, mapped to [-1, 1].
STANDARD_FACE_POINTS = np.array(
    [[196.0, 226.0], [316.0, 226.0], [256.0, 286.0], [220.0, 360.4], [292.0, 360.4]], np.float32
) / 256.0 - 1.0


def similarity_matrix(src: jnp.ndarray, dst: jnp.ndarray) -> jnp.ndarray:
    """Least-squares similarity transform mapping ``src`` points onto ``dst``.

    (B, P, 2), (B, P, 2) -> (B, 3, 3) acting on homogeneous (x, y, 1) column vectors.
    """
    src_mean = src.mean(axis=1, keepdims=True)
    dst_mean = dst.mean(axis=1, keepdims=True)
    s = src - src_mean
    d = dst - dst_mean
    norm = jnp.sum(s * s, axis=(1, 2))
    a = jnp.sum(d * s, axis=(1, 2)) / norm
    b = jnp.sum(d[..., 0] * s[..., 1] - d[..., 1] * s[..., 0], axis=1) / norm
    mx, my = src_mean[:, 0, 0], src_mean[:, 0, 1]
    tx = dst_mean[:, 0, 0] - a * mx - b * my
    ty = dst_mean[:, 0, 1] + b * mx - a * my
    zeros, ones = jnp.zeros_like(a), jnp.ones_like(a)
    rows = [a, b, tx, -b, a, ty, zeros, zeros, ones]
    return jnp.stack(rows, axis=-1).reshape(-1, 3, 3)


def standard_landmarks(resolution: int) -> np.ndarray:
    """(5, 2) float32 pixel positions of the standard face points in an R x R aligned crop."""
    return ((STANDARD_FACE_POINTS + 1) * (resolution - 1) / 2).astype(np.float32)


def invert_similarity(matrix: jnp.ndarray) -> jnp.ndarray:
    """Closed-form inverse of (B, 3, 3) similarity matrices [[a, b, tx], [-b, a, ty], [0, 0, 1]].

    Written out rather than ``jnp.linalg.inv`` so exporters without a linear solver (ONNX)
    can translate the alignment.
    """
    a, b = matrix[:, 0, 0], matrix[:, 0, 1]
    tx, ty = matrix[:, 0, 2], matrix[:, 1, 2]
    det = a * a + b * b
    ia, ib = a / det, -b / det  # inverse linear part [[ia, ib], [-ib, ia]]
    itx = -(ia * tx + ib * ty)
    ity = -(-ib * tx + ia * ty)
    zeros, ones = jnp.zeros_like(a), jnp.ones_like(a)
    rows = [ia, ib, itx, -ib, ia, ity, zeros, zeros, ones]
    return jnp.stack(rows, axis=-1).reshape(-1, 3, 3)


def face_align_matrix(landmarks: jnp.ndarray, resolution: int) -> jnp.ndarray:
    """Matrix taking (B, 5, 2) pixel landmarks onto the standard points of an R x R crop."""
    target = (jnp.asarray(STANDARD_FACE_POINTS, landmarks.dtype) + 1.0) * (resolution - 1) / 2.0
    target = jnp.broadcast_to(target, landmarks.shape)
    return similarity_matrix(landmarks, target)


def _pixel_coords(h: int, w: int) -> np.ndarray:
    # (h * w, 2) integer pixel coordinates (x, y), row-major.
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                         indexing="ij")
    return np.stack([xx, yy], axis=-1).reshape(h * w, 2)


def _apply(matrix: jnp.ndarray, coords: jnp.ndarray) -> jnp.ndarray:
    # (B, 3, 3), (B or 1, N, 2) -> (B, N, 2): projective map of (x, y) points.
    homo = jnp.concatenate([coords, jnp.ones_like(coords[..., :1])], axis=-1)
    out = jnp.einsum("bnk,bjk->bnj", jnp.broadcast_to(homo, (matrix.shape[0], *homo.shape[1:])),
                     matrix)
    return out[..., :2] / out[..., 2:3]


def _tanh_squash(c: jnp.ndarray, factor: float) -> jnp.ndarray:
    # Normalised coords in [-1, 1]: the outer ``factor`` band is compressed with tanh.
    hi = jnp.tanh((c - 1.0 + factor) / factor) * factor + 1.0 - factor
    lo = jnp.tanh((c + 1.0 - factor) / factor) * factor - 1.0 + factor
    return jnp.where(c > 1.0 - factor, hi, jnp.where(c < -1.0 + factor, lo, c))


def _tanh_unsquash(c: jnp.ndarray, factor: float) -> jnp.ndarray:
    # Inverse of ``_tanh_squash``, with arctanh's argument clamped to +-(1 - 1e-3).
    def safe_arctanh(x):
        return jnp.arctanh(jnp.clip(x, -1.0 + _ARCTANH_EPS, 1.0 - _ARCTANH_EPS))

    hi = safe_arctanh((c - 1.0 + factor) / factor) * factor + 1.0 - factor
    lo = safe_arctanh((c + 1.0 - factor) / factor) * factor - 1.0 + factor
    return jnp.where(c > 1.0 - factor, hi, jnp.where(c < -1.0 + factor, lo, c))


def warp_grid(matrix: jnp.ndarray, warped_hw: tuple[int, int], orig_hw: tuple[int, int],
              factor: float = WARP_FACTOR) -> jnp.ndarray:
    """Sampling grid that warps an original image into the aligned, tanh-warped crop.

    (B, 3, 3) -> (B, h_warped, w_warped, 2) in grid_sample's normalised (x, y) units.
    """
    h, w = warped_hw
    wh = jnp.array([w, h], matrix.dtype)
    c = jnp.asarray(_pixel_coords(h, w), matrix.dtype)[None] / wh * 2.0 - 1.0
    c = (_tanh_unsquash(c, factor) + 1.0) / 2.0 * wh
    orig = _apply(invert_similarity(matrix), c)
    orig_wh = jnp.array([orig_hw[1], orig_hw[0]], matrix.dtype)
    return (orig / orig_wh * 2.0 - 1.0).reshape(matrix.shape[0], h, w, 2)


def inverse_warp_grid(matrix: jnp.ndarray, warped_hw: tuple[int, int], orig_hw: tuple[int, int],
                      factor: float = WARP_FACTOR) -> jnp.ndarray:
    """Sampling grid that maps the warped crop (e.g. logits) back onto the original image.

    (B, 3, 3) -> (B, h_orig, w_orig, 2) in grid_sample's normalised (x, y) units.
    """
    h, w = warped_hw
    wh = jnp.array([w, h], matrix.dtype)
    c = _apply(matrix, jnp.asarray(_pixel_coords(*orig_hw), matrix.dtype)[None])
    c = (_tanh_squash(c / wh * 2.0 - 1.0, factor) + 1.0) / 2.0 * wh
    return (c / wh * 2.0 - 1.0).reshape(matrix.shape[0], *orig_hw, 2)


def grid_sample(image: jnp.ndarray, grid: jnp.ndarray) -> jnp.ndarray:
    """Bilinear sampling like torch's ``grid_sample(align_corners=False, padding_mode='zeros')``.

    image (B, H, W, C), grid (B, Ho, Wo, 2) normalised (x, y) -> (B, Ho, Wo, C).
    """
    b, h, w, c = image.shape
    _, ho, wo, _ = grid.shape
    x = ((grid[..., 0] + 1.0) * w - 1.0) / 2.0
    y = ((grid[..., 1] + 1.0) * h - 1.0) / 2.0
    x0, y0 = jnp.floor(x), jnp.floor(y)
    x1, y1 = x0 + 1.0, y0 + 1.0
    # weights formed as torch forms them, corners summed in its order (nw, ne, sw, se)
    wx, wy = (x1 - x, x - x0), (y1 - y, y - y0)
    flat = image.reshape(b, h * w, c)
    out = jnp.zeros((b, ho * wo, c), image.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = (x0, x1)[dx], (y0, y1)[dy]
            weight = wx[dx] * wy[dy]
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
            vals = jnp.take_along_axis(flat, idx.reshape(b, ho * wo, 1), axis=1)
            out = out + vals * jnp.where(inside, weight, 0.0).reshape(b, ho * wo, 1).astype(
                image.dtype)
    return out.reshape(b, ho, wo, c)


def align_faces(images: jnp.ndarray, landmarks: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Warp (B, R, R, C) images to the aligned crop; returns the images and the align matrices."""
    res = images.shape[1]
    # float32, or the images' precision if wider (SegFace passes them in float32 at least)
    matrix = face_align_matrix(landmarks.astype(jnp.promote_types(images.dtype, jnp.float32)),
                               res)
    grid = warp_grid(matrix, (res, res), images.shape[1:3])
    return grid_sample(images, grid), matrix


def unalign_logits(logits: jnp.ndarray, matrix: jnp.ndarray,
                   orig_hw: tuple[int, int]) -> jnp.ndarray:
    """Map (B, R, R, K) logits of the aligned crop back onto the original image frame."""
    grid = inverse_warp_grid(matrix, logits.shape[1:3], orig_hw)
    return grid_sample(logits, grid)
