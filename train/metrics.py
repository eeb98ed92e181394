"""Upstream's evaluation metrics, from one confusion matrix over all test pixels.

Upstream's test protocol: logits at the model resolution, argmax, one confusion
matrix (rows: ground truth, columns: prediction) over every pixel whose label is not 255.
From it: per-class F1 = 2 TP / (2 TP + FP + FN), mean F1 over the classes except background,
pixel accuracy, mean accuracy, per-class IoU and mIoU; Helen adds merged eyes, brows, mouth
and overall F1. Accuracy and IoU divide by max(1, count) as upstream does, so a class absent
from both labels and predictions counts 0 in their means. Upstream's F1 of such a class is
0 / 0 (NaN, which makes its mean F1 NaN); here it is reported as null and left out of the mean
F1, which changes nothing on the benchmark test sets, where every class occurs.
All figures are percentages.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255

def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts [ground truth, prediction] over pixels whose label is not 255."""
    labels = np.asarray(labels).ravel().astype(np.int64)
    preds = np.asarray(preds).ravel().astype(np.int64)
    keep = labels != IGNORE_LABEL
    if np.any(labels[keep] >= num_classes) or np.any(labels[keep] < 0):
        bad = sorted(set(np.unique(labels[keep]).tolist()) - set(range(num_classes)))
        raise ValueError(f"labels hold values {bad} outside 0..{num_classes - 1} (and not 255)")
    index = labels[keep] * num_classes + preds[keep]
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def confusion_matrix_device(labels: jnp.ndarray, preds: jnp.ndarray,
                            num_classes: int) -> jnp.ndarray:
    """``confusion_matrix`` inside jit: int32 counts, label 255 (and anything >= C) ignored.

    int32 holds any batch below 2^31 pixels (e.g. 8192 images of 512 x 512).
    """
    labels = labels.reshape(-1).astype(jnp.int32)
    preds = preds.reshape(-1).astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    index = jnp.where(valid, labels * num_classes + preds, num_classes * num_classes)
    counts = jnp.bincount(index, length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes)


def _f1(cm: np.ndarray, gt: Sequence[int], pred: Sequence[int]) -> float | None:
    # upstream: A = rows of gt, B = columns of pred, F1 = 2 * intersection / (A + B)
    a = cm[list(gt), :].sum()
    b = cm[:, list(pred)].sum()
    inter = cm[np.ix_(list(gt), list(pred))].sum()
    return None if a + b == 0 else float(200.0 * inter / (a + b))


def summarize(cm: np.ndarray, class_names: Sequence[str],
              merged: Sequence[tuple[str, Sequence[str]]] = ()) -> dict:
    """Every upstream metric (percent) from a confusion matrix, as a JSON-ready dict; ``merged``
    adds the F1 of regions made of several classes (a dataset's ``merged_f1``: Helen's eyes,
    brows, mouth and overall) under ``"merged_f1"``."""
    cm = np.asarray(cm, np.float64)
    if cm.shape != (len(class_names),) * 2:
        raise ValueError(f"confusion matrix {cm.shape} does not fit {len(class_names)} classes")
    pos, res, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    iou = 100.0 * tp / np.maximum(1.0, pos + res - tp)
    f1 = {name: _f1(cm, [i], [i]) for i, name in enumerate(class_names)}
    defined = [v for name, v in list(f1.items())[1:] if v is not None]
    out = {
        "mean_f1": float(np.mean(defined)) if defined else None,
        "f1": f1,
        "pixel_accuracy": float(100.0 * tp.sum() / max(pos.sum(), 1.0)),
        "mean_accuracy": float(100.0 * (tp / np.maximum(1.0, pos)).mean()),
        "iou": {name: float(v) for name, v in zip(class_names, iou)},
        "miou": float(iou.mean()),
        "pixels": int(cm.sum()),
        "absent_classes": [name for name, v in f1.items() if v is None],
    }
    if merged:
        index = {name: i for i, name in enumerate(class_names)}
        out["merged_f1"] = {region: _f1(cm, [index[n] for n in names], [index[n] for n in names])
                            for region, names in merged}
    return out
