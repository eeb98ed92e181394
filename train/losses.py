"""Upstream's training loss: 0.5 * cross-entropy + 0.5 * Dice, computed in float32 (float64
when the logits are).

Cross-entropy is torch's ``CrossEntropyLoss(ignore_index=255)``: the mean over every labelled
pixel (upstream's labels never hold 255, so it is upstream's plain mean there; a user's
dataset or a label mapping may mark pixels 255, which neither loss then sees). Dice is
upstream's: softmax probabilities p and one-hot targets t, per class
1 - (2 sum(p t) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5) with the sums over a whole (per-GPU)
batch, averaged over classes. Upstream trains with 4 images per GPU on 8 GPUs, so its Dice is
a mean over groups of 4; ``dice_group`` reproduces that on any mesh (the step's gradient is
then the same as upstream's data-parallel gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from segface_jax.models.layers import softmax, upcast

DICE_SMOOTH = 1e-5


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Mean over labelled pixels (label < C; 255 is ignored) of -log softmax(logits)[label];
    (N, H, W, C), (N, H, W) -> ()."""
    logp = jax.nn.log_softmax(upcast(logits), axis=-1)
    valid = labels < logits.shape[-1]
    index = jnp.where(valid, labels, 0)[..., None].astype(jnp.int32)
    picked = jnp.take_along_axis(logp, index, axis=-1)[..., 0]
    return -jnp.where(valid, picked, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def dice_loss(logits: jnp.ndarray, labels: jnp.ndarray, group: int | None = None) -> jnp.ndarray:
    """Upstream's multi-class Dice loss, averaged over groups of ``group`` images.

    (N, H, W, C) logits, (N, H, W) labels -> (). ``group=None``: one group (the whole batch).
    """
    n, c = logits.shape[0], logits.shape[-1]
    group = group or n
    if n % group:
        raise ValueError(f"batch {n} is not a multiple of the Dice group size {group}")
    groups = n // group
    p = softmax(upcast(logits), axis=-1)
    p = jnp.where((labels < c)[..., None], p, 0.0)  # ignored pixels (255) count nowhere
    t = jax.nn.one_hot(labels, c, dtype=p.dtype)  # all zeros at 255

    def per_group(x: jnp.ndarray) -> jnp.ndarray:  # (N, H, W, C) -> (groups, C) sums
        x = x.reshape(groups, -1, c)
        # One group (a device's whole batch, the usual case): sum every axis but the class
        # one. The same sums; written as a sum over axis 1 of (1, pixels, C), XLA:CPU's
        # YNNPACK reduction runs ~10x slower (bench/xla_cpu_reduce.py).
        return x.sum(1) if groups > 1 else x.sum((0, 1))[None]

    inter = per_group(p * t)
    dice = (2 * inter + DICE_SMOOTH) / (per_group(p * p) + per_group(t * t) + DICE_SMOOTH)
    return jnp.mean(1.0 - dice)


def segface_loss(logits: jnp.ndarray, labels: jnp.ndarray,
                 dice_group: int | None = None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """(0.5 * CE + 0.5 * Dice, {"ce": ..., "dice": ...})."""
    ce = cross_entropy(logits, labels)
    dice = dice_loss(logits, labels, dice_group)
    return 0.5 * ce + 0.5 * dice, {"ce": ce, "dice": dice}
