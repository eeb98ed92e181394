"""The MTCNN face detector: facenet-pytorch 2.6.0's detection steps around our JAX networks.

facenet-pytorch resizes every pyramid level and every face crop with torch's ``area``
interpolation and prunes candidates with torchvision's NMS between stages (IoU, areas without
the +1) and its own NumPy NMS after the last ("Min": overlap over the smaller box, areas with
the +1). These functions follow each step; the NMS and the box arithmetic are float32 as
there, the area averages are exact (float64, rounded once) where torch sums in float32, a
difference of about 1e-6 of the pixel range. The networks are ``segface_jax.models.mtcnn``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from segface_jax.models.mtcnn import NETWORKS, abstract_network


def _prefix_sums(x: np.ndarray, axis: int) -> np.ndarray:
    """Cumulative sums along ``axis`` with a leading zero (float64)."""
    zero = np.zeros_like(np.take(x, [0], axis))
    return np.concatenate([zero, np.cumsum(x, axis)], axis)


def _area_average(sums: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """torch's adaptive average pooling along ``axis``, from the input's ``_prefix_sums``:
    output i averages inputs floor(i * n / out) to ceil((i + 1) * n / out) - 1."""
    n = sums.shape[axis] - 1
    i = np.arange(out_size)
    start, end = (i * n) // out_size, -((-(i + 1) * n) // out_size)
    shape = [1] * sums.ndim
    shape[axis] = out_size
    return (np.take(sums, end, axis) - np.take(sums, start, axis)) / (end - start).reshape(shape)


def area_resize(image: np.ndarray, size: tuple[int, int],
                row_sums: np.ndarray | None = None) -> np.ndarray:
    """torch ``interpolate(mode="area")`` of an (H, W, C) image to ``size`` = (h, w), float32.

    Area interpolation is adaptive average pooling; its rectangular windows separate into an
    average over rows then one over columns (each window's count is the product of the two),
    computed here in float64 and rounded once. ``row_sums`` (``_prefix_sums`` of the image
    along its rows) saves recomputing them for each level of a pyramid.
    """
    if row_sums is None:
        row_sums = _prefix_sums(np.asarray(image, np.float64), 0)
    rows = _area_average(row_sums, size[0], 0)
    return _area_average(_prefix_sums(rows, 1), size[1], 1).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float,
        groups: np.ndarray | None = None) -> np.ndarray:
    """torchvision's ``(batched_)nms``: indices kept, by decreasing score.

    A box is dropped when its IoU with a kept, higher-scoring box of the same group exceeds
    ``iou``; areas are (x2 - x1) * (y2 - y1), as torchvision computes them.
    """
    return _greedy(boxes, scores, groups, lambda inter, a, b: inter / (a + b - inter), iou,
                   plus_one=False, order=np.argsort(-scores, kind="stable"))


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float,
            groups: np.ndarray | None = None) -> np.ndarray:
    """facenet-pytorch's NumPy NMS with method "Min", used after O-Net: overlap is the
    intersection over the smaller box, areas count the +1 pixel, and the order is NumPy's
    default ``argsort`` of the scores, highest first."""
    return _greedy(boxes, scores, groups, lambda inter, a, b: inter / np.minimum(a, b),
                   threshold, plus_one=True, order=np.argsort(scores)[::-1])


def _greedy(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray | None,
            overlap: Callable, threshold: float, *, plus_one: bool,
            order: np.ndarray) -> np.ndarray:
    """Greedy suppression in ``order``; boxes of different ``groups`` never suppress each other."""
    boxes = np.asarray(boxes, np.float32)
    if len(boxes) == 0:
        return np.zeros((0,), np.int64)
    if groups is not None:  # torchvision's and facenet's trick: shift each group apart
        boxes = boxes + (np.asarray(groups, np.float32) * (boxes.max() + 1))[:, None]
    one = np.float32(1 if plus_one else 0)
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1 + one) * (y2 - y1 + one)
    keep = []
    order = np.asarray(order)
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])
                       + one)
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])
                       + one)
        order = rest[overlap(w * h, area[i], area[rest]) <= threshold]
    return np.asarray(keep, np.int64)


@dataclasses.dataclass(frozen=True)
class Detections:
    """Faces found in one image, largest box first (facenet-pytorch's ``select_largest``)."""

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2 in image pixels
    scores: np.ndarray  # (N,) O-Net's face probability
    landmarks: np.ndarray  # (N, 5, 2) x, y: the two eye centres, nose tip, two mouth corners

    def __len__(self) -> int:
        return len(self.scores)


def _compiled(network: nnx.Module) -> Callable:
    """``network`` as a jitted function of its inputs (one compile per input shape)."""
    graphdef, state = nnx.split(network)
    run = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs))
    return lambda *inputs: jax.tree.map(np.asarray, run(state, *inputs))


def _pnet_cells(n: int) -> int:
    """P-Net's output cells along an image side of ``n`` pixels (conv 3, ceil-mode pool 2,
    conv 3, conv 3)."""
    n = n - 2
    pooled = math.ceil((n - 2) / 2) + 1
    if (pooled - 1) * 2 >= n:
        pooled -= 1
    return pooled - 4


def _normalised(pixels: np.ndarray) -> np.ndarray:
    return (pixels - np.float32(127.5)) * np.float32(0.0078125)


def _rerec(boxes: np.ndarray) -> np.ndarray:
    """Squares around the boxes' centres, side max(w, h) (facenet-pytorch's ``rerec``)."""
    boxes = boxes.copy()
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    side = np.maximum(w, h)
    boxes[:, 0] = boxes[:, 0] + w * np.float32(0.5) - side * np.float32(0.5)
    boxes[:, 1] = boxes[:, 1] + h * np.float32(0.5) - side * np.float32(0.5)
    boxes[:, 2:4] = boxes[:, :2] + side[:, None]
    return boxes


def _bbreg(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Boxes moved by the regression ``offsets`` in units of their (+1) width and height."""
    boxes = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + np.float32(1)
    h = boxes[:, 3] - boxes[:, 1] + np.float32(1)
    boxes[:, :4] = boxes[:, :4] + offsets * np.stack([w, h, w, h], 1)
    return boxes


def _windows(boxes: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel windows (x0, y0, x1, y1; end exclusive) of the boxes, truncated to integers and
    clipped to the image as facenet-pytorch's ``pad`` does (1-based starts, inclusive ends),
    and which boxes keep at least one pixel inside the image.

    facenet-pytorch skips a box without one when it crops but keeps it in its box list, which
    misaligns the two lists; here such a box is dropped."""
    ints = np.trunc(boxes[:, :4]).astype(np.int64)
    x0, y0 = np.maximum(ints[:, 0], 1) - 1, np.maximum(ints[:, 1], 1) - 1
    x1, y1 = np.minimum(ints[:, 2], w), np.minimum(ints[:, 3], h)
    return np.stack([x0, y0, x1, y1], 1), (x1 > x0) & (y1 > y0)


def _crops(image: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """Normalised ``size`` x ``size`` crops of non-empty pixel ``windows``."""
    return np.stack([_normalised(area_resize(image[y0:y1, x0:x1], (size, size)))
                     for x0, y0, x1, y1 in windows])


def _bucket(n: int) -> int:
    """Crops per R-/O-Net call, padded to 4, 5, 6 or 7 times a power of two (at least 8): four
    compiled shapes per doubling, and at most a quarter of the work wasted on padding (powers
    of two alone wasted up to half: 261 R-Net crops ran as 512)."""
    if n <= 8:
        return 8
    step = 1 << max(0, (n - 1).bit_length() - 3)  # n <= 8 * step
    return -(-n // step) * step


class MTCNN:
    """MTCNN face detection with facenet-pytorch 2.6.0's defaults and steps.

    ``networks`` maps "pnet", "rnet", "onet" to the Flax networks (``convert/detector.py``
    converts the pretrained files). Call it on an (H, W, 3) RGB image with values 0-255.
    """

    def __init__(self, networks: Mapping[str, nnx.Module], min_face: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709):
        self.pnet, self.rnet, self.onet = (_compiled(networks[n]) for n in ("pnet", "rnet", "onet"))
        self.min_face, self.thresholds, self.factor = min_face, thresholds, factor

    def scales(self, h: int, w: int) -> list[float]:
        """The image pyramid: P-Net's 12 px window covers ``min_face`` px at the first level."""
        scale = 12.0 / self.min_face
        shortest, scales = min(h, w) * scale, []
        while shortest >= 12:
            scales.append(scale)
            scale, shortest = scale * self.factor, shortest * self.factor
        return scales

    def _propose(self, image: np.ndarray) -> np.ndarray:
        """Stage 1: P-Net on every pyramid level -> (N, 9) boxes, score and offsets."""
        h, w = image.shape[:2]
        found = []
        row_sums = _prefix_sums(np.asarray(image, np.float64), 0)  # shared by every level
        for scale in self.scales(h, w):
            size = (int(h * scale + 1), int(w * scale + 1))
            level = _normalised(area_resize(image, size, row_sums))
            # padded to a shape bucket: photos of many sizes share a few compiled P-Nets
            padded = np.zeros((1, *(_bucket(n) for n in size), 3), np.float32)
            padded[0, :size[0], :size[1]] = level
            offsets, probs = self.pnet(padded, np.asarray(size, np.int32))
            rows, cols = (_pnet_cells(n) for n in size)
            offsets, probs = offsets[:, :rows, :cols], probs[:, :rows, :cols]
            ys, xs = np.nonzero(probs[0, :, :, 1] >= self.thresholds[0])
            cells = np.stack([xs, ys], 1).astype(np.float32)
            s = np.float32(scale)
            boxes = np.concatenate([np.floor((2 * cells + 1) / s), np.floor((2 * cells + 12) / s),
                                    probs[0, ys, xs, 1:2], offsets[0, ys, xs]], 1)
            found.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
        boxes = np.concatenate(found) if found else np.zeros((0, 9), np.float32)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        size = boxes[:, 2:4] - boxes[:, 0:2]
        moved = boxes[:, :4] + boxes[:, 5:9] * np.concatenate([size, size], 1)
        return _rerec(np.concatenate([moved, boxes[:, 4:5]], 1))

    def _score(self, network: Callable, image: np.ndarray, boxes: np.ndarray,
               size: int) -> tuple[np.ndarray, ...]:
        """The boxes that touch the image, then ``network``'s outputs on their crops (run in
        padded batches, trimmed to the boxes)."""
        windows, inside = _windows(boxes, *image.shape[:2])
        boxes = boxes[inside]
        if not len(boxes):
            return (boxes,)
        crops = _crops(image, windows[inside], size)
        padded = np.zeros((_bucket(len(crops)), size, size, 3), np.float32)
        padded[:len(crops)] = crops
        return (boxes, *(o[:len(crops)] for o in network(padded)))

    def __call__(self, image: np.ndarray) -> Detections:
        """Faces in an (H, W, 3) RGB image (uint8 or float 0-255)."""
        image = np.asarray(image, np.float32)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"MTCNN takes an (H, W, 3) RGB image, not shape {image.shape}")
        none = Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                          np.zeros((0, 5, 2), np.float32))
        boxes = self._propose(image)
        if not len(boxes):
            return none
        boxes, *outputs = self._score(self.rnet, image, boxes, 24)
        if not len(boxes):
            return none
        offsets, probs = outputs
        keep = probs[:, 1] > self.thresholds[1]
        boxes = np.concatenate([boxes[keep, :4], probs[keep, 1:2]], 1)
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _rerec(_bbreg(boxes[pick], offsets[keep][pick]))
        if not len(boxes):
            return none
        boxes, *outputs = self._score(self.onet, image, boxes, 48)
        if not len(boxes):
            return none
        offsets, points, probs = outputs
        keep = probs[:, 1] > self.thresholds[2]
        boxes = np.concatenate([boxes[keep, :4], probs[keep, 1:2]], 1)
        points = points[keep]
        w = boxes[:, 2] - boxes[:, 0] + np.float32(1)
        h = boxes[:, 3] - boxes[:, 1] + np.float32(1)
        one = np.float32(1)
        landmarks = np.stack([w[:, None] * points[:, :5] + boxes[:, 0:1] - one,
                              h[:, None] * points[:, 5:] + boxes[:, 1:2] - one], -1)
        boxes = _bbreg(boxes, offsets[keep])
        pick = nms_min(boxes[:, :4], boxes[:, 4], 0.7)
        boxes, landmarks = boxes[pick], landmarks[pick]
        order = np.argsort((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[::-1]
        return Detections(boxes[order, :4], boxes[order, 4], landmarks[order])


WEIGHTS_SOURCE = "facenet-pytorch 2.6.0"
INSTALL_HINT = ("pip install --no-deps facenet-pytorch==2.6.0 (its wheel carries MTCNN's "
                "pretrained pnet.pt, rnet.pt and onet.pt, MIT licence; --no-deps because it "
                "pins torch<2.3), with torch installed for the one-time conversion")


class DetectorWeightsError(RuntimeError):
    """The pretrained detector weights are neither in the cache nor installed."""


def weights_file(cache: str | os.PathLike | None = None) -> Path:
    """Where the converted MTCNN weights live: ``<segface-jax cache>/mtcnn/facenet-pytorch-2.6.0
    .npz``."""
    from segface_jax.hub import cache_dir

    return Path(cache or cache_dir()) / "mtcnn" / "facenet-pytorch-2.6.0.npz"


def facenet_data() -> Path:
    """facenet-pytorch's folder of pretrained MTCNN files, or ``DetectorWeightsError``."""
    import importlib.util

    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorWeightsError(f"the face detector's weights are not converted yet and "
                                   f"{WEIGHTS_SOURCE} is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def networks_from_arrays(arrays: Mapping[str, Mapping[str, np.ndarray]]
                         ) -> dict[str, nnx.Module]:
    """PNet, RNet and ONet filled with converted arrays (``{"pnet": {path: array}, ...}``)."""
    from segface_jax.checkpoint import fill_module

    return {name: fill_module(abstract_network(name), dict(arrays[name])) for name in NETWORKS}


def pretrained(cache: str | os.PathLike | None = None, **options: Any) -> MTCNN:
    """MTCNN with facenet-pytorch 2.6.0's pretrained weights, converted once into the cache
    (that needs torch and the package; later runs need neither). ``options`` go to ``MTCNN``."""
    from segface_jax.checkpoint import CheckpointError
    from segface_jax.files import atomic_write

    path = weights_file(cache)
    if not path.exists():
        folder = facenet_data()
        try:
            from segface_jax.convert import ConversionError, convert_mtcnn

            flat = {f"{name}/{key}": value
                    for name, arrays in convert_mtcnn(folder).items()
                    for key, value in arrays.items()}
        except ImportError as e:
            raise DetectorWeightsError(f"converting the face detector's weights from {folder} "
                                       f"needs torch ({e}); install it once, or copy a "
                                       f"converted {path.name} from another machine to "
                                       f"{path}") from None
        except ConversionError as e:
            raise DetectorWeightsError(f"{e}; reinstall: {INSTALL_HINT}") from None
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(target: Path) -> None:
            with open(target, "wb") as f:  # a handle: np.savez would append ".npz" to a name
                np.savez(f, **flat)

        atomic_write(path, write)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays: dict[str, dict[str, np.ndarray]] = {name: {} for name in NETWORKS}
            for key in data.files:
                name, _, leaf = key.partition("/")
                arrays.setdefault(name, {})[leaf] = data[key]
        return MTCNN(networks_from_arrays(arrays), **options)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, CheckpointError) as e:
        raise DetectorWeightsError(f"{path}: the converted detector weights are unreadable "
                                   f"({e}); delete the file and run again to reconvert them "
                                   f"from {WEIGHTS_SOURCE}") from None
