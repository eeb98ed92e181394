"""torch's AdamW and MultiStepLR as optax transformations, and frozen parts of the model.

``torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay)`` updates
p <- p * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps), which is optax's ``adamw`` with
``eps_root=0`` and decay on every parameter (upstream decays all of them). MultiStepLR steps
once per epoch: update k (counting from 0) uses lr * gamma^(number of milestones m with
k >= m * steps_per_epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

# What each ``freeze`` setting keeps fixed: top-level parts of ``SegFace`` (models/segface.py)
FREEZE: dict[str, tuple[str, ...]] = {
    "none": (),
    "encoder": ("backbone",),
    "encoder+fusion": ("backbone", "fusion"),
}


def multistep_schedule(lr: float, milestones: Sequence[int], gamma: float,
                       steps_per_epoch: int) -> optax.Schedule:
    """Learning rate of update ``count`` under torch's per-epoch ``MultiStepLR``."""
    bounds = jnp.asarray([m * steps_per_epoch for m in milestones], jnp.int32)

    def schedule(count):
        passed = jnp.sum(jnp.asarray(count, jnp.int32) >= bounds)
        return lr * gamma ** passed.astype(jnp.float32)

    return schedule


def adamw(lr: float | optax.Schedule, weight_decay: float, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8) -> optax.GradientTransformation:
    """torch's ``AdamW`` (decoupled decay on every parameter)."""
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, eps_root=0.0, weight_decay=weight_decay)


def freezing(tx: optax.GradientTransformation, freeze: str) -> optax.GradientTransformation:
    """``tx`` on the trained parameters; the parts that ``freeze`` names (``FREEZE``) get no
    update and the optimizer keeps no state for them (``optax.multi_transform`` with
    ``set_to_zero``). Like torch's ``requires_grad=False``, BatchNorm statistics of a frozen
    encoder still follow the batches in training mode."""
    if freeze not in FREEZE:
        raise ValueError(f"freeze must be one of {', '.join(FREEZE)}, not {freeze!r}")
    frozen = FREEZE[freeze]
    if not frozen:
        return tx

    def labels(params: Any) -> Any:  # the params' own tree (an nnx.State), labelled
        def label(path: tuple, _: Any) -> str:
            first = path[0]
            part = getattr(first, "key", getattr(first, "name", first))
            return "frozen" if part in frozen else "trained"

        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
